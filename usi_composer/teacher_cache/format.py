"""What a teacher cache stores, byte for byte: the manifest, the batch files and their checksums.

A batch file (``rank{r}/ep{e}/ba{b}.safetensors``) holds the encoded outputs of one rank's
microbatches of one global batch, tensors named ``<part>.<microbatch>`` (:func:`encode`), and in its
safetensors metadata the batch it is (epoch, batch, rank) and the checksum of its tensors
(:func:`checksum`: their names, dtypes, shapes and bytes). :func:`read_batch` verifies both before a
tensor of it reaches a step; anything else is a :class:`CorruptCacheError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from usi_composer.errors import CorruptFileError

__all__ = [
    "MANIFEST",
    "VERSION",
    "CacheManifest",
    "CorruptCacheError",
    "batch_object",
    "checksum",
    "decode",
    "encode",
    "merge_ranges",
    "prefix_length",
    "read_batch",
    "serialize_batch",
    "written_object",
]

VERSION = 2  # 2: batch files carry a checksum of their tensors
MANIFEST = "cache.json"
REPAIR = "write the cache again (usi-cache-teacher with the run's config, --out at it and --overwrite)"


class CorruptCacheError(CorruptFileError):
    """A teacher cache's file that is not what was written: unreadable, cut short, or other bytes."""


# --------------------------------------------------------------------------- the outputs' encodings


def encode(logits: torch.Tensor, fmt: str, k: int | None = None) -> dict[str, torch.Tensor]:
    """One microbatch's teacher logits ``(N, C)`` as the tensors a cache stores (on their device).

    ``full``: ``logits``, every logit in the teacher's output dtype (read back bit for bit).
    ``topk``: ``values`` (the k largest logits, in the teacher's dtype), ``indices`` (int16 where
    the classes fit, else int32) and ``tail_lse``, the log-sum-exp (fp32) of the other C - k logits:
    their total probability at T = 1. :func:`decode` gives those classes one shared logit carrying
    that mass, so the top-k probabilities and the tail's total are the teacher's own.
    """
    if fmt == "full":
        return {"logits": logits.detach()}
    if fmt != "topk" or k is None or not 0 < k < logits.shape[-1]:
        raise ValueError(f"format must be full, or topk with 0 < k < {logits.shape[-1]}; got {fmt}, k={k}")
    values, indices = logits.detach().topk(k, dim=-1)
    others = logits.detach().float().scatter(-1, indices, -math.inf)
    index_dtype = torch.int16 if logits.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32
    return {"values": values, "indices": indices.to(index_dtype), "tail_lse": torch.logsumexp(others, dim=-1)}


def decode(parts: dict[str, torch.Tensor], fmt: str, num_classes: int) -> torch.Tensor:
    """Logits ``(N, C)`` from what :func:`encode` stored: ``full`` as stored; ``topk`` in fp32, the
    top k logits as stored and every other class at ``tail_lse - log(C - k)``, so that at T = 1
    the top-k probabilities are exact and the rest of the mass is spread evenly (FKD's uniform
    tail); at another temperature the tail still stays one logit, below the top k."""
    if fmt == "full":
        return parts["logits"]
    values, indices, tail_lse = parts["values"].float(), parts["indices"].long(), parts["tail_lse"]
    k = values.shape[-1]
    tail = (tail_lse - math.log(num_classes - k)).unsqueeze(-1)
    # a teacher whose top k hold all the mass in fp32 has tail_lse = -inf: keep the tail finite
    # (kd_loss's KL would be 0 * -inf there), far below any stored logit
    tail = torch.maximum(tail, values.min(dim=-1, keepdim=True).values - 1e4)
    return tail.expand(values.shape[0], num_classes).clone().scatter_(-1, indices, values)


# --------------------------------------------------------------------------- layout


def batch_object(epoch: int, batch: int, rank: int) -> str:
    return f"rank{rank}/ep{epoch}/ba{batch}.safetensors"


def written_object(rank: int) -> str:
    return f"rank{rank}/written.json"


def merge_ranges(ranges: Iterable[Iterable[int]]) -> list[list[int]]:
    """Half-open [start, stop) batch ranges, sorted and merged."""
    merged: list[list[int]] = []
    for start, stop in sorted((int(a), int(b)) for a, b in ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return merged


def prefix_length(ranges: list[list[int]]) -> int:
    """How many batches from batch 0 on the ranges hold without a gap."""
    return ranges[0][1] if ranges and ranges[0][0] == 0 else 0


@dataclass
class CacheManifest:
    """``cache.json``: what a cache holds and for which run."""

    format: str  # full | topk
    k: int | None  # topk's k
    num_classes: int
    batches_per_epoch: int  # per rank
    microbatches: int  # per batch, per rank
    world_size: int
    fingerprint: dict[str, Any]
    version: int = VERSION

    @classmethod
    def from_json(cls, doc: Any, where: str) -> CacheManifest:
        """The manifest in ``doc`` (``cache.json`` parsed); ``where`` names it in errors."""
        try:
            manifest = cls(**doc)
        except TypeError:
            raise CorruptCacheError(f"{where} is not a teacher cache manifest; {REPAIR}") from None
        if manifest.version != VERSION:
            raise CorruptCacheError(
                f"{where} is a teacher cache of layout version {manifest.version}, this is {VERSION}: {REPAIR}"
            )
        return manifest

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- batch files


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """blake2b-128 of the (host) tensors' names, dtypes, shapes and bytes, in name order: what a batch
    file must give back. blake2b: fast in software on every CPU, and read on a background thread."""
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        digest.update(f"{name}|{tensor.dtype}|{list(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def serialize_batch(tensors: dict[str, torch.Tensor], epoch: int, batch: int, rank: int) -> bytes:
    """A batch file's bytes: safetensors with the batch's key and :func:`checksum` in its metadata."""
    from safetensors.torch import save

    tensors = {name: t.contiguous() for name, t in tensors.items()}
    meta = {"epoch": str(epoch), "batch": str(batch), "rank": str(rank), "checksum": checksum(tensors)}
    return save(tensors, metadata=meta)


def read_batch(data: bytes, where: str, epoch: int, batch: int, rank: int) -> dict[str, torch.Tensor]:
    """The tensors of a batch file's ``data``, verified: readable safetensors, of this batch, with the
    checksum it was written with. Else a one-line :class:`CorruptCacheError` naming ``where``."""
    from safetensors.torch import load

    try:
        size = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
        tensors = load(data)
    except Exception as e:  # safetensors and json raise several types for cut or foreign bytes
        what = "empty" if not data else f"not a complete batch file ({type(e).__name__}: {str(e)[:120]})"
        raise CorruptCacheError(f"teacher cache file {where} is {what}; {REPAIR}") from None
    if (meta.get("epoch"), meta.get("batch"), meta.get("rank")) != (str(epoch), str(batch), str(rank)):
        raise CorruptCacheError(f"teacher cache file {where} holds another batch ({meta}); {REPAIR}")
    if meta.get("checksum") != checksum(tensors):
        raise CorruptCacheError(
            f"teacher cache file {where} does not match its checksum (its bytes changed after it was written); {REPAIR}"
        )
    return tensors
