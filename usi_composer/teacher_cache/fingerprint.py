"""A teacher cache's fingerprint: everything that shapes the teacher's inputs and outputs.

It is a query on roles, not a list: every config key declared ``teacher_input`` that applies to the
run (``usi_composer/config/schema.py``), the run plan's ``teacher_input`` fields (the resolved device,
precision, compilation, world layout, microbatch, normalizations, teacher size; ``plan.py``), the
training data's identity and the teacher weights' identity. A key added to the schema as
``teacher_input`` is in every new fingerprint without touching this module.

Not in it (their roles say so): the student, the KD hyper-parameters, the optimizer and schedule,
``max_duration`` (a cache serves any run up to its length), EMA, evaluation, checkpointing, logging,
and MixUp/CutMix's ``label_smoothing`` (it changes the targets, not the images).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

from composer.core import Time

from usi_composer import storage
from usi_composer.config import TEACHER_INPUT, Config, ConfigError, leaf_fields, value_at
from usi_composer.plan import RunPlan, resolve

__all__ = ["data_identity", "fingerprint", "first_difference", "show", "sweep_group", "weights_identity"]

DATA_CONTENT = "data content"  # the folder's bytes' hash (algorithms.distillation.cache_verify_data)


def fingerprint(cfg: Config, plan: RunPlan, data: dict[str, str], teacher_weights: str | None) -> dict[str, Any]:
    """The items a cache written for ``cfg`` must match, in the order a difference is named: ``data``
    (:func:`data_identity`), the config's and the plan's ``teacher_input`` fields, ``teacher_weights``
    (:func:`weights_identity`; None where the config names no weights: not compared then)."""
    items: dict[str, Any] = dict(data)
    for leaf in leaf_fields(cfg):
        if leaf.role == TEACHER_INPUT and leaf.applies(cfg):
            items[leaf.key] = value_at(cfg, leaf.key)
    items.update({f"plan.{name}": value for name, value in plan.teacher_inputs(cfg).items()})
    items["teacher weights"] = teacher_weights
    return json.loads(json.dumps(items))  # as stored: lists, plain numbers


def weights_identity(plan: RunPlan) -> str | None:
    """The teacher's weights by content: the sha256 of ``teacher.checkpoint`` (read from an object store
    where it is a URI), timm's source of its pretrained weights, or None where there are none."""
    source = plan.teacher_weights
    if source is None or source.startswith("timm:"):
        return source
    if not storage.is_remote(source) and not os.path.isfile(source):
        raise ConfigError("teacher.checkpoint", f"checkpoint not found: {source}")
    digest = hashlib.sha256()
    if storage.is_remote(source):
        digest.update(storage.read(source))
    else:
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def data_identity(cfg: Config, loader: Any, content: bool = False) -> dict[str, str]:
    """The training data's identity, where it lives aside: for MDS, each shard's name, size, sample count
    and hashes from the split's index.json (the sha1s usi-convert-imagenet writes); for a folder, every
    file's path relative to ``data.train_dir``, size and modification time, and with ``content`` the
    sha256 of their bytes too (:data:`DATA_CONTENT`)."""
    dataset = loader.dataset
    shards = getattr(dataset, "shards", None)
    if shards is not None:  # a StreamingDataset: its index, already read
        listing = []
        for shard in shards:
            info = getattr(shard, "raw_data", None) or getattr(shard, "zip_data", None)
            hashes = dict(sorted((info.hashes or {}).items())) if info is not None else {}
            listing.append([info.basename if info else None, info.bytes if info else None, shard.samples, hashes])
        return {"data": f"mds:{_sha256_json(listing)}"}
    root = str(cfg.data.train_dir)
    files = []
    for path, _ in dataset.samples:
        status = os.stat(path)
        files.append([os.path.relpath(path, root), status.st_size, status.st_mtime_ns])
    identity = {"data": f"folder:{_sha256_json(files)}"}
    if content:
        digest = hashlib.sha256()
        for path, _ in dataset.samples:
            with open(path, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
        identity[DATA_CONTENT] = f"sha256:{digest.hexdigest()}"
    return identity


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


def show(value: Any) -> str:
    """A fingerprint's value as a message says it (YAML's spelling of null and booleans)."""
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def sweep_group(cfg: Config, plan: RunPlan | None = None) -> str | None:
    """For ``usi-ablate``: a digest of :func:`fingerprint` from the config alone (the data and the
    teacher's weights by where they are), plus the unit of ``max_duration``. Points with the same one
    feed their teacher the same inputs and can share a cache. None for a point that does not distil, or
    that sets ``algorithms.distillation.cache``/``cache_write`` itself."""
    kd = cfg.algorithms.distillation
    if not kd.enabled or kd.cache or kd.cache_write:
        return None
    plan = plan or resolve(cfg)
    d = cfg.data
    location = json.dumps([d.remote, None if d.remote else d.local, d.train_dir])
    items = fingerprint(cfg, plan, data={"data": location}, teacher_weights=plan.teacher_weights)
    items["max_duration's unit"] = Time.from_timestring(cfg.trainer.max_duration).unit.value
    return _sha256_json(items)[:16]
