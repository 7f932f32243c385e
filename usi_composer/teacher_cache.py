"""A cache of the teacher's outputs, keyed by the exact view: the online teacher, computed once.

Since the input pipeline's draws are keyed (``data/draws.py``: a sample's view is a function of
(seed, epoch, sample index); ``algorithms/mixup_cutmix.py``: a microbatch's mixing of (seed, batch,
rank, microbatch)), two runs with the same data, seed, batch layout, image size and augmentation
feed the teacher bit-identical microbatches. Only the student and the KD hyper-parameters differ
between the points of a temperature, alpha, KD-only or backbone sweep; this module stores the
teacher's logits of one run and serves them to the others, so the teacher runs once per sweep.

Layout of a cache at ``URI`` (a local folder or any object store Composer's
``maybe_create_object_store_from_uri`` takes):

- ``cache.json``: the format, the layout (batches per epoch, microbatches, world size) and the
  :func:`fingerprint` of everything that shapes the teacher's inputs and outputs;
- ``rank{r}/ep{e}/ba{b}.safetensors``: the outputs of rank ``r``'s microbatches of global batch
  ``b`` (epoch ``e``), tensors named ``<part>.<microbatch>`` (:func:`encode`);
- ``rank{r}/written.json``: the batches whose outputs are stored (written at epoch ends, at the
  run's checkpoints and at the end), so a reader knows how long a run the cache serves.

``algorithms.distillation.cache_write: URI`` (or ``usi-cache-teacher``, which trains no student)
writes it; ``algorithms.distillation.cache: URI`` reads it instead of building and running the
teacher. Both plug into ``KnowledgeDistillation``'s generic seam (``teacher_outputs`` /
``on_teacher_outputs``); see ``algorithms/README.md`` for when a cache is exact.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, Event, State, Time, TimeUnit
from composer.loggers import Logger
from composer.models import ComposerModel
from composer.utils import create_interval_scheduler, dist, get_file, maybe_create_object_store_from_uri, parse_uri
from torch import nn

from usi_composer.algorithms import TeacherKey
from usi_composer.config import Config, ConfigError
from usi_composer.errors import SetupError

__all__ = [
    "CacheManifest",
    "CacheStore",
    "NullStudent",
    "TeacherCacheReader",
    "TeacherCacheWriter",
    "batches_per_epoch",
    "cache_covers",
    "decode",
    "encode",
    "fingerprint",
    "first_difference",
    "open_teacher_cache",
    "run_batches",
    "sweep_group",
]

log = logging.getLogger(__name__)

VERSION = 1  # of the layout above
MANIFEST = "cache.json"
READ_AHEAD = 4  # batches read ahead of the step
IO_THREADS = 2
MAX_PENDING_WRITES = 8  # batches waiting for storage before the step waits for them


# --------------------------------------------------------------------------- formats


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


# --------------------------------------------------------------------------- storage


class CacheStore:
    """A cache's location: a local folder, or a prefix in an object store (``s3://bucket/path``,
    ``gs://``, ``oci://``, ...: Composer's ``maybe_create_object_store_from_uri``)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri.rstrip("/") or uri
        try:
            self.remote = maybe_create_object_store_from_uri(self.uri)
        except NotImplementedError as e:
            raise SetupError(f"{uri}: not a local folder or an object store Composer can write ({e})") from None
        self.prefix = parse_uri(self.uri)[2].strip("/")

    def _object(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def read(self, name: str) -> bytes:
        """The object's bytes; ``FileNotFoundError`` where it is absent."""
        if self.remote is None:
            return Path(self.uri, name).read_bytes()
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "object")
            self.remote.download_object(self._object(name), local, overwrite=True)
            return Path(local).read_bytes()

    def read_json(self, name: str) -> Any | None:
        """A JSON object, or None where it is absent."""
        try:
            return json.loads(self.read(name))
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name``, replacing it whole (a local file is written beside and moved
        over it: a reader sees the old bytes or the new ones, never a part)."""
        if self.remote is None:
            path = Path(self.uri, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            return
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "object")
            Path(local).write_bytes(data)
            self.remote.upload_object(self._object(name), local)

    def write_json(self, name: str, value: Any) -> None:
        self.write(name, (json.dumps(value, indent=1) + "\n").encode())

    def holds_other_files(self) -> bool:
        """A local folder that exists with files in it (and no cache.json): someone else's data."""
        root = Path(self.uri)
        return self.remote is None and root.is_dir() and any(root.iterdir())


def batch_object(epoch: int, batch: int, rank: int) -> str:
    return f"rank{rank}/ep{epoch}/ba{batch}.safetensors"


def _written_object(rank: int) -> str:
    return f"rank{rank}/written.json"


def _header(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes (an 8-byte little-endian length, then a JSON header)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]).get("__metadata__", {})


def _merge(ranges: Iterable[Iterable[int]]) -> list[list[int]]:
    """Half-open [start, stop) batch ranges, sorted and merged."""
    merged: list[list[int]] = []
    for start, stop in sorted((int(a), int(b)) for a, b in ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return merged


def _prefix(ranges: list[list[int]]) -> int:
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
    def read(cls, store: CacheStore) -> CacheManifest | None:
        doc = store.read_json(MANIFEST)
        if doc is None:
            return None
        try:
            return cls(**doc)
        except TypeError:
            raise SetupError(f"{store.uri}/{MANIFEST}: not a teacher cache manifest of this version") from None


# --------------------------------------------------------------------------- fingerprint


def fingerprint(
    cfg: Config,
    *,
    mean: Iterable[float],
    std: Iterable[float],
    device: str,
    precision: str,
    compile: bool,
    world_size: int,
    ranks_per_node: int,
    data: str,
    teacher_weights: str | None,
) -> dict[str, Any]:
    """Everything that shapes the teacher's inputs and outputs, in the order a difference is named.

    Keys are the config's where one exists. ``data``: the training data's identity
    (:func:`data_identity`: the shards' hashes, or the folder's listing). ``mean``/``std``: the
    student's normalization (the data is normalized for the student; the teacher re-normalizes
    from it, so its input bits depend on it). ``teacher_weights``: :func:`teacher_weights`; None
    where the config names no weights (then that item is not compared). The device type and the
    torch version are in because kernels differ between them in their last bits, and a cache is
    meant to be exactly the online teacher. Not in: the student, the KD hyper-parameters, the
    optimizer and schedule, ``max_duration`` (a cache serves any run up to its length), EMA,
    evaluation, checkpointing, and MixUp/CutMix's ``label_smoothing`` (it changes the targets,
    not the images).
    """
    items = {
        **_data_items(cfg, data, ranks_per_node),
        **_view_items(cfg, world_size, mean, std),
        **_teacher_items(cfg, mean, std, teacher_weights),
        "trainer.compile": compile,
        "trainer.precision": precision,
        "trainer.device": device,
        "torch": torch.__version__,
    }
    return json.loads(json.dumps(items))  # as stored: lists, plain numbers


MIX_KEYS = ("mixup_alpha", "cutmix_alpha", "switch_prob", "prob")


def _data_items(cfg: Config, data: str, ranks_per_node: int) -> dict[str, Any]:
    """Which samples, in which order: the data's identity, the seed and streaming's shuffle."""
    d, t, s = cfg.data, cfg.trainer, cfg.data.streaming
    items: dict[str, Any] = {"data": data, "data.num_classes": d.num_classes, "trainer.seed": t.seed}
    if d.remote or d.local:  # streaming's shuffle (a folder's is torch's DistributedSampler, by seed alone)
        items.update(
            {
                "data.streaming.train_split": s.train_split,
                "data.streaming.shuffle_algo": s.shuffle_algo,
                "data.streaming.shuffle_seed": t.seed if s.shuffle_seed is None else s.shuffle_seed,
                "data.streaming.shuffle_block_size": s.shuffle_block_size,
                "data.streaming.num_canonical_nodes": s.num_canonical_nodes,
                "processes per node": ranks_per_node,  # streaming partitions by nodes and ranks
            }
        )
    return items


def _view_items(cfg: Config, world_size: int, mean: Iterable[float], std: Iterable[float]) -> dict[str, Any]:
    """How the samples become the teacher's input tensors: the batch layout, the views, the mixing."""
    d, t, s, mix = cfg.data, cfg.trainer, cfg.data.streaming, cfg.algorithms.mixup_cutmix
    per_process = t.global_batch_size // world_size
    items: dict[str, Any] = {
        "trainer.global_batch_size": t.global_batch_size,
        "world size": world_size,
        "trainer.microbatch_size": t.microbatch_size or per_process,
        "trainer.train_subset_num_batches": t.train_subset_num_batches,
        "data.image_size": d.image_size,
        "data.interpolation": d.interpolation,
        "data.scale": list(d.scale),
        "data.ratio": list(d.ratio),
        "data.hflip": d.hflip,
        "data.auto_augment": d.auto_augment,
        "data.mean (the student's normalization)": [float(m) for m in mean],
        "data.std (the student's normalization)": [float(v) for v in std],
        "data.pipeline": d.pipeline,
        "data.gpu_decode": d.gpu_decode if d.pipeline == "gpu" else None,
        "data.streaming.fast_decode": s.fast_decode if d.pipeline == "cpu" else None,
        "algorithms.channels_last": cfg.algorithms.channels_last,  # the batch's memory format
        "algorithms.progressive_resizing": cfg.algorithms.progressive_resizing,
        "algorithms.mixup_cutmix.enabled": mix.enabled,
    }
    if mix.enabled:
        items.update({f"algorithms.mixup_cutmix.{k}": getattr(mix, k) for k in MIX_KEYS})
    return items


def _teacher_items(
    cfg: Config, mean: Iterable[float], std: Iterable[float], teacher_weights: str | None
) -> dict[str, Any]:
    """Which teacher computes the outputs, and how its input is prepared."""
    d, teacher = cfg.data, cfg.teacher
    teacher_mean, teacher_std = teacher_normalization(cfg, mean, std)
    return {
        "teacher.name": teacher.name,
        "teacher weights": teacher_weights,
        "teacher.img_size": teacher.img_size or d.image_size,
        "teacher.mean": teacher_mean,
        "teacher.std": teacher_std,
        "teacher.fold_bn": teacher.fold_bn,
        "teacher.channels_last": teacher.channels_last,
        "teacher.kwargs": dict(teacher.kwargs),
    }


def teacher_normalization(cfg: Config, mean: Iterable[float], std: Iterable[float]) -> tuple[list[float], list[float]]:
    """The teacher's input normalization as ``build_teacher`` resolves it (teacher.mean/std, else its
    timm pretrained cfg's, else the student's), without building the teacher."""
    from timm.models import resolve_pretrained_cfg, split_model_name_tag

    t = cfg.teacher
    if t.mean and t.std:
        return [float(m) for m in t.mean], [float(s) for s in t.std]
    architecture, tag = split_model_name_tag(str(t.name))
    overlay = dict(t.kwargs.get("pretrained_cfg_overlay") or {})
    pretrained = resolve_pretrained_cfg(architecture, t.kwargs.get("pretrained_cfg") or tag or None, overlay)
    resolved_mean = t.mean or getattr(pretrained, "mean", None) or list(mean)
    resolved_std = t.std or getattr(pretrained, "std", None) or list(std)
    return [float(m) for m in resolved_mean], [float(s) for s in resolved_std]


def teacher_weights(cfg: Config) -> str | None:
    """The teacher's weights' identity: the sha256 of ``teacher.checkpoint`` (downloaded where it is a
    URI), timm's source of its pretrained weights, or None where the config names no weights."""
    t = cfg.teacher
    if t.checkpoint:
        return f"sha256:{_file_sha256(t.checkpoint)}"
    if t.pretrained:
        from timm.models import resolve_pretrained_cfg, split_model_name_tag

        architecture, tag = split_model_name_tag(str(t.name))
        pretrained = resolve_pretrained_cfg(architecture, tag or None)
        return f"timm:{pretrained.hf_hub_id or pretrained.url or t.name}"
    return None


def _file_sha256(path: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        local = path
        if "://" in path:
            local = os.path.join(tmp, "weights")
            get_file(path, local, progress_bar=False)
        elif not os.path.isfile(path):
            raise ConfigError("", "teacher.checkpoint", f"checkpoint not found: {path}")
        digest = hashlib.sha256()
        with open(local, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def data_identity(cfg: Config, loader: Any) -> str:
    """The training data's identity: for MDS, each shard's name, size, sample count and hashes from
    the split's index.json (the sha1s usi-convert-imagenet writes); for a folder, every file's path
    relative to ``data.train_dir`` and its size. Where the data lives is not part of it."""
    dataset = loader.dataset
    shards = getattr(dataset, "shards", None)
    if shards is not None:  # a StreamingDataset: its index, already read
        listing = []
        for shard in shards:
            info = getattr(shard, "raw_data", None) or getattr(shard, "zip_data", None)
            hashes = dict(sorted((info.hashes or {}).items())) if info is not None else {}
            listing.append([info.basename if info else None, info.bytes if info else None, shard.samples, hashes])
        return f"mds:{_sha256_json(listing)}"
    root = str(cfg.data.train_dir)
    files = [[os.path.relpath(path, root), os.path.getsize(path)] for path, _ in dataset.samples]
    return f"folder:{_sha256_json(files)}"


def _sha256_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, separators=(",", ":")).encode()).hexdigest()


def first_difference(
    stored: dict[str, Any], current: dict[str, Any], skip: Iterable[str] = ()
) -> tuple[str, Any, Any] | None:
    """The first item (in ``stored``'s order, then ``current``'s new ones) whose value differs, with
    both values (``unset`` where one side lacks it); the items in ``skip`` are not compared."""
    skipped = set(skip)
    for key in [*stored, *(k for k in current if k not in stored)]:
        if key not in skipped and stored.get(key, "unset") != current.get(key, "unset"):
            return key, stored.get(key, "unset"), current.get(key, "unset")
    return None


def _show(value: Any) -> str:
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def sweep_group(cfg: Config) -> str | None:
    """For ``usi-ablate``: a digest of :func:`fingerprint` read from the config alone (the data and the
    teacher's weights by where they are; the student's normalization from its timm config, on the
    meta device), plus the unit of ``max_duration``. Points with the same one feed their teacher the
    same inputs and can share a cache. None for a point that does not distil, or that sets
    ``algorithms.distillation.cache``/``cache_write`` itself."""
    from usi_composer.builders import resolve_device_and_precision, student_normalization
    from usi_composer.compilation import resolve_compile

    kd = cfg.algorithms.distillation
    if not kd.enabled or kd.cache or kd.cache_write:
        return None
    mean, std = student_normalization(cfg)
    device, precision = resolve_device_and_precision(cfg, warn=False)  # the point's own run warns
    d, t = cfg.data, cfg.teacher
    items = fingerprint(
        cfg,
        mean=mean,
        std=std,
        device=device,
        precision=precision,
        compile=resolve_compile(cfg.trainer.compile, device),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        ranks_per_node=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        data=json.dumps([d.remote, None if d.remote else d.local, d.train_dir]),
        teacher_weights=t.checkpoint or (f"pretrained {t.name}" if t.pretrained else None),
    )
    items["max_duration's unit"] = Time.from_timestring(cfg.trainer.max_duration).unit.value
    return _sha256_json(items)[:16]


# --------------------------------------------------------------------------- how long a run is


def batches_per_epoch(cfg: Config, loader: Any) -> int:
    """Training batches per epoch per rank, as Composer counts them (``train_subset_num_batches``)."""
    n = len(loader)
    subset = cfg.trainer.train_subset_num_batches
    return min(n, subset) if subset > 0 else n


def run_batches(max_duration: str, per_epoch: int, global_batch: int) -> int | None:
    """The batches a run of ``max_duration`` trains (None: a unit not counted in batches)."""
    duration = Time.from_timestring(max_duration)
    if duration.unit == TimeUnit.EPOCH:
        return int(duration.value) * per_epoch
    if duration.unit == TimeUnit.BATCH:
        return int(duration.value)
    if duration.unit == TimeUnit.SAMPLE:
        return math.ceil(int(duration.value) / global_batch)
    return None


def _stored_batches(store: CacheStore, world_size: int) -> int:
    """Batches from 0 on stored by every rank, without a gap."""
    prefixes = []
    for rank in range(world_size):
        written = store.read_json(_written_object(rank)) or {}
        prefixes.append(_prefix(_merge(written.get("batches", []))))
    return min(prefixes) if prefixes else 0


def cache_covers(uri: str, max_duration: str, global_batch: int) -> bool:
    """Whether the cache at ``uri`` holds a run of ``max_duration`` (usi-ablate: may its points read it)."""
    store = CacheStore(uri)
    manifest = CacheManifest.read(store)
    if manifest is None:
        return False
    needed = run_batches(max_duration, manifest.batches_per_epoch, global_batch)
    return needed is not None and _stored_batches(store, manifest.world_size) >= needed


def _describe(batches: int, per_epoch: int) -> str:
    return f"{batches} batches ({batches / per_epoch:g} epochs)" if per_epoch else f"{batches} batches"


# --------------------------------------------------------------------------- reading


class TeacherCacheReader(Callback):
    """``KnowledgeDistillation(teacher_outputs=reader)``: each microbatch's teacher logits, read from a cache.

    The step never waits on storage: batches are read ahead (``READ_AHEAD`` of them, on
    ``IO_THREADS`` background threads) from wherever the run starts, batch 0 or a resumed batch,
    and on CUDA into pinned host memory, copied to the device without blocking. ``wait_s``: the
    seconds the step still waited (logged as ``teacher_cache/wait_s`` at each epoch end).
    """

    def __init__(self, store: CacheStore, manifest: CacheManifest, total_batches: int) -> None:
        self.store, self.manifest, self.total_batches = store, manifest, total_batches
        self.wait_s = 0.0
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._ahead: dict[int, concurrent.futures.Future] = {}
        self._batch = -1
        self._parts: dict[str, torch.Tensor] = {}
        self._device: Any = None
        self._pin = False

    def init(self, state: State, logger: Logger) -> None:
        self._device = state.device
        self._pin = state.device.name == "gpu"

    def __call__(self, key: TeacherKey) -> torch.Tensor:
        epoch, batch, rank, microbatch = key
        if batch != self._batch:
            self._parts = self._take(epoch, batch, rank)
            self._batch = batch
        m = self.manifest
        if m.format == "full":
            parts = {"logits": self._parts[f"logits.{microbatch}"]}
        else:
            parts = {name: self._parts[f"{name}.{microbatch}"] for name in ("values", "indices", "tail_lse")}
        return decode(parts, m.format, m.num_classes)

    def _take(self, epoch: int, batch: int, rank: int) -> dict[str, torch.Tensor]:
        per_epoch = self.manifest.batches_per_epoch
        if epoch != batch // per_epoch:
            raise SetupError(
                f"teacher cache {self.store.uri}: batch {batch} falls in epoch {batch // per_epoch} of the cache "
                f"({per_epoch} batches per epoch), this run is in epoch {epoch}"
            )
        future = self._ahead.pop(batch, None)
        if future is None:  # the first batch of this fit (0 or the resumed one), or a jump: read from here
            for pending in self._ahead.values():
                pending.cancel()
            self._ahead.clear()
            future = self._submit(batch, rank)
        for ahead in range(batch + 1, min(batch + 1 + READ_AHEAD, self.total_batches)):
            if ahead not in self._ahead:
                self._ahead[ahead] = self._submit(ahead, rank)
        start = time.perf_counter()
        host = future.result()
        self.wait_s += time.perf_counter() - start
        return {name: self._device.tensor_to_device(t) for name, t in host.items()}  # non-blocking from pinned

    def _submit(self, batch: int, rank: int) -> concurrent.futures.Future:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(IO_THREADS, thread_name_prefix="teacher-cache-read")
        return self._pool.submit(self._read, batch // self.manifest.batches_per_epoch, batch, rank)

    def _read(self, epoch: int, batch: int, rank: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        name = batch_object(epoch, batch, rank)
        try:
            data = self.store.read(name)
        except FileNotFoundError:
            raise SetupError(f"teacher cache {self.store.uri}: {name} is missing (the cache is incomplete)") from None
        meta = _header(data)
        if (meta.get("epoch"), meta.get("batch"), meta.get("rank")) != (str(epoch), str(batch), str(rank)):
            raise SetupError(f"teacher cache {self.store.uri}: {name} holds another batch ({meta})")
        tensors = load(data)
        return {k: v.pin_memory() for k, v in tensors.items()} if self._pin else tensors

    def epoch_end(self, state: State, logger: Logger) -> None:
        logger.log_metrics({"teacher_cache/wait_s": self.wait_s})

    def fit_end(self, state: State, logger: Logger) -> None:
        log.info("teacher cache %s: the step waited %.3f s for storage in all", self.store.uri, self.wait_s)
        self._stop()

    def close(self, state: State, logger: Logger) -> None:
        self._stop()

    def _stop(self) -> None:
        for pending in self._ahead.values():
            pending.cancel()
        self._ahead.clear()
        self._batch = -1
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


# --------------------------------------------------------------------------- writing


class TeacherCacheWriter(Callback):
    """``KnowledgeDistillation(teacher, on_teacher_outputs=writer)``: stores each microbatch's logits.

    A batch's outputs are encoded on the device (:func:`encode`), copied to the host without
    blocking the step (pinned memory and an event on CUDA), serialized and stored on
    ``IO_THREADS`` background threads; the step waits only when ``MAX_PENDING_WRITES`` batches are
    still waiting for storage. ``rank{r}/written.json`` is brought up to date at each epoch end,
    at the run's checkpoints (``flush_at``: its save interval) and at the end, after the batches
    before it are stored: a resumed run (autoresume) continues it.
    """

    def __init__(
        self,
        store: CacheStore,
        manifest: CacheManifest,
        rank: int,
        flush_at: Callable[[State, Event], bool] | None = None,
    ) -> None:
        self.store, self.manifest, self.rank, self.flush_at = store, manifest, rank, flush_at
        written = store.read_json(_written_object(rank)) or {}
        self._ranges = _merge(written.get("batches", []))
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._pending: list[tuple[int, concurrent.futures.Future]] = []
        self._batch, self._epoch = -1, -1
        self._parts: dict[str, torch.Tensor] = {}
        self._samples = 0
        self.samples = 0  # written by this run
        self.payload_bytes = 0  # the tensors' bytes
        self.stored_bytes = 0  # the objects' bytes (tensors and headers)

    @property
    def stored_batches(self) -> int:
        """Batches from 0 on that this rank has stored, without a gap."""
        return _prefix(self._ranges)

    def __call__(self, key: TeacherKey, logits: torch.Tensor) -> None:
        epoch, batch, _, microbatch = key  # the rank is this writer's
        if batch != self._batch:
            self._submit()  # the previous batch is complete
            self._batch, self._epoch = batch, epoch
        for name, tensor in encode(logits, self.manifest.format, self.manifest.k).items():
            self._parts[f"{name}.{microbatch}"] = tensor
        self._samples += logits.shape[0]

    def _submit(self) -> None:
        if not self._parts:
            return
        parts, samples = self._parts, self._samples
        self._parts, self._samples = {}, 0
        event = None
        if any(t.is_cuda for t in parts.values()):
            pinned = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for n, t in parts.items()}
            parts = {n: pinned[n].copy_(t, non_blocking=True) for n, t in parts.items()}
            event = torch.cuda.Event()
            event.record()
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(IO_THREADS, thread_name_prefix="teacher-cache-write")
        future = self._pool.submit(self._write, self._epoch, self._batch, parts, samples, event)
        self._pending.append((self._batch, future))
        while len(self._pending) > MAX_PENDING_WRITES:  # storage is slower than the step: wait for it
            self._finish(*self._pending.pop(0))

    def _write(
        self, epoch: int, batch: int, parts: dict[str, torch.Tensor], samples: int, event: Any
    ) -> tuple[int, int, int]:
        """(On an I/O thread.) Store one batch; return its samples, tensor bytes and object bytes."""
        from safetensors.torch import save

        if event is not None:
            event.synchronize()
        meta = {"epoch": str(epoch), "batch": str(batch), "rank": str(self.rank)}
        data = save({n: t.contiguous() for n, t in parts.items()}, metadata=meta)
        self.store.write(batch_object(epoch, batch, self.rank), data)
        return samples, sum(t.numel() * t.element_size() for t in parts.values()), len(data)

    def _finish(self, batch: int, future: concurrent.futures.Future) -> None:
        try:
            samples, payload, stored = future.result()
        except Exception as e:
            raise SetupError(f"cannot write the teacher cache at {self.store.uri}: {type(e).__name__}: {e}") from e
        self.samples += samples
        self.payload_bytes += payload
        self.stored_bytes += stored
        self._ranges = _merge([*self._ranges, [batch, batch + 1]])

    def flush(self) -> None:
        """Wait until every batch so far is stored, then record them in ``rank{r}/written.json``."""
        self._submit()
        while self._pending:
            self._finish(*self._pending.pop(0))
        self.store.write_json(_written_object(self.rank), {"batches": self._ranges})

    def batch_end(self, state: State, logger: Logger) -> None:
        self._submit()

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.flush_at is not None and self.flush_at(state, Event.BATCH_CHECKPOINT):
            self.flush()

    def epoch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.flush_at is not None and self.flush_at(state, Event.EPOCH_CHECKPOINT):
            self.flush()

    def epoch_end(self, state: State, logger: Logger) -> None:
        self.flush()

    def fit_end(self, state: State, logger: Logger) -> None:
        self.flush()
        self._stop()

    def close(self, state: State, logger: Logger) -> None:
        self._stop()

    def _stop(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


# --------------------------------------------------------------------------- opening a cache for a run


def open_teacher_cache(
    cfg: Config,
    loader: Any,
    *,
    mean: list[float],
    std: list[float],
    device: str,
    precision: str,
    compile: bool,
) -> TeacherCacheReader | TeacherCacheWriter | None:
    """The reader (``algorithms.distillation.cache``) or writer (``cache_write``) of ``cfg``'s run, or None.

    Checked before training, each a :class:`ConfigError` (one line, exit 2): a reader's cache must
    exist, have been written for the same teacher inputs and outputs (:func:`fingerprint`; the
    message names the first item that differs) and hold the whole run; a writer's location must be
    empty or a cache of the same fingerprint and format (continued, e.g. after autoresume), never
    someone else's data. ``loader``: the training dataloader (its data's identity and length).
    """
    kd = cfg.algorithms.distillation
    if not kd.enabled or not (kd.cache or kd.cache_write):
        return None
    key = "algorithms.distillation.cache" if kd.cache else "algorithms.distillation.cache_write"
    uri = str(kd.cache or kd.cache_write)
    try:
        store = CacheStore(uri)
    except SetupError as e:
        raise ConfigError("", key, str(e)) from None
    world_size, per_epoch = dist.get_world_size(), batches_per_epoch(cfg, loader)
    weights = teacher_weights(cfg)
    if weights is None:
        log.info("teacher cache: the config names no teacher weights (teacher.checkpoint): their hash is not compared")
    current = fingerprint(
        cfg,
        mean=mean,
        std=std,
        device=device,
        precision=precision,
        compile=compile,
        world_size=world_size,
        ranks_per_node=dist.get_local_world_size(),
        data=data_identity(cfg, loader),
        teacher_weights=weights,
    )
    per_process = cfg.trainer.global_batch_size // world_size
    microbatches = math.ceil(per_process / (cfg.trainer.microbatch_size or per_process))
    stored = CacheManifest.read(store)
    if stored is not None:
        _check_stored(stored, current, uri, key, reading=bool(kd.cache), skip=() if weights else ("teacher weights",))
    if kd.cache:
        return _open_reader(cfg, store, stored, uri, key, (per_epoch, microbatches), world_size)
    return _open_writer(cfg, store, stored, uri, key, (per_epoch, microbatches), world_size, current)


def _check_stored(
    stored: CacheManifest, current: dict[str, Any], uri: str, key: str, reading: bool, skip: tuple[str, ...]
) -> None:
    """A cache found at ``uri`` of this layout version, written for the same teacher inputs and outputs."""
    if stored.version != VERSION:
        raise ConfigError("", key, f"{uri} is a teacher cache of layout version {stored.version}, this is {VERSION}")
    difference = first_difference(stored.fingerprint, current, skip=skip)
    if difference is None:
        return
    item, there, here = difference
    if reading:
        message = (
            f"the teacher cache at {uri} was written with {item} = {_show(there)}, this run has "
            f"{_show(here)}: its teacher outputs are not this run's (write one for this config with "
            "usi-cache-teacher, or drop algorithms.distillation.cache to run the teacher)"
        )
    else:
        message = (
            f"{uri} holds the teacher outputs of another run ({item} = {_show(there)} there, "
            f"{_show(here)} here): write this run's to a new location"
        )
    raise ConfigError("", key, message)


def _open_reader(
    cfg: Config,
    store: CacheStore,
    stored: CacheManifest | None,
    uri: str,
    key: str,
    layout: tuple[int, int],
    world_size: int,
) -> TeacherCacheReader:
    """The reader of a cache that exists, has this run's batch layout and holds the whole run."""
    if stored is None:
        raise ConfigError(
            "",
            key,
            f"no teacher cache at {uri} (no {MANIFEST}): fill it with usi-cache-teacher YAML [key=value ...] "
            f"--out {uri}, or with algorithms.distillation.cache_write={uri} in a training run",
        )
    per_epoch, microbatches = layout
    if (stored.batches_per_epoch, stored.microbatches) != layout:
        raise ConfigError(
            "",
            key,
            f"the teacher cache at {uri} has {stored.batches_per_epoch} batches per epoch of "
            f"{stored.microbatches} microbatches, this run {per_epoch} of {microbatches}",
        )
    needed = run_batches(cfg.trainer.max_duration, per_epoch, cfg.trainer.global_batch_size)
    held = _stored_batches(store, world_size)
    if needed is None or needed > held:
        duration = cfg.trainer.max_duration
        run = _describe(needed, per_epoch) if needed else "not counted in batches"
        raise ConfigError(
            "",
            "trainer.max_duration",
            f"is {duration}: {run}, the teacher cache at {uri} holds {_describe(held, per_epoch)}: shorten the "
            f"run, or fill a cache for {duration} (usi-cache-teacher ... trainer.max_duration={duration})",
        )
    fmt = f"top-{stored.k} logits" if stored.format == "topk" else "every logit (exact)"
    log.info("teacher cache: reading %s from %s; the teacher is not built", fmt, uri)
    return TeacherCacheReader(store, stored, needed)


def _open_writer(
    cfg: Config,
    store: CacheStore,
    stored: CacheManifest | None,
    uri: str,
    key: str,
    layout: tuple[int, int],
    world_size: int,
    current: dict[str, Any],
) -> TeacherCacheWriter:
    """The writer into an empty location, or into a cache of the same fingerprint and format (continued)."""
    kd = cfg.algorithms.distillation
    fmt, k = kd.cache_format, kd.cache_topk if kd.cache_format == "topk" else None
    if stored is not None and (stored.format, stored.k) != (fmt, k):
        raise ConfigError(
            "",
            key,
            f"{uri} holds a {stored.format} cache{f' (k={stored.k})' if stored.k else ''}, this run writes "
            f"{fmt}{f' (k={k})' if k else ''}: write to a new location",
        )
    manifest = CacheManifest(fmt, k, cfg.data.num_classes, *layout, world_size, current)
    if dist.get_global_rank() == 0 and stored is None:
        if store.holds_other_files():
            raise ConfigError("", key, f"{uri} is a folder with other files in it, not a teacher cache: name a new one")
        store.write_json(MANIFEST, asdict(manifest))
    dist.barrier()  # every rank writes into a cache whose manifest is in place
    t = cfg.trainer
    flush_at = create_interval_scheduler(t.save_interval) if t.save_folder else None
    return TeacherCacheWriter(store, manifest, dist.get_global_rank(), flush_at)


# --------------------------------------------------------------------------- a run with no student


class NullStudent(ComposerModel):
    """What ``usi-cache-teacher`` trains in place of the student: nothing worth computing.

    Its outputs are zeros of the classes' shape, from one parameter, so the loss, backward pass
    and optimizer step of Composer's loop run as in training (and cost nothing), while the data,
    the microbatching, the device transforms, MixUp/CutMix and the teacher run exactly as they do
    in a training run: the teacher's inputs are a training run's by construction.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.module = nn.Module()
        self.module.register_parameter("weight", nn.Parameter(torch.zeros(())))

    def forward(self, batch: Any) -> torch.Tensor:
        inputs = batch[0]
        return self.module.weight.expand(inputs.shape[0], self.num_classes)

    def loss(self, outputs: torch.Tensor, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return outputs.sum() * 0.0

    def get_metrics(self, is_train: bool = False) -> dict[str, Any]:
        return {}
