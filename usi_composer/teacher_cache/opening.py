"""Opening a run's teacher cache: the reader of ``algorithms.distillation.cache`` or the writer of
``cache_write``, after every check that can refuse it before step 1 (one line, exit 2)."""

from __future__ import annotations

import logging
import math
from typing import Any

from composer.core import Time, TimeUnit
from composer.utils import create_interval_scheduler, dist

from usi_composer.config import Config, ConfigError
from usi_composer.plan import RunPlan
from usi_composer.teacher_cache.fingerprint import (
    DATA_CONTENT,
    data_identity,
    fingerprint,
    first_difference,
    show,
    weights_identity,
)
from usi_composer.teacher_cache.format import MANIFEST, CacheManifest, merge_ranges, prefix_length, written_object
from usi_composer.teacher_cache.reader import TeacherCacheReader
from usi_composer.teacher_cache.store import CacheStore
from usi_composer.teacher_cache.writer import TeacherCacheWriter

__all__ = ["batches_per_epoch", "cache_covers", "open_teacher_cache", "read_manifest", "run_batches"]

log = logging.getLogger(__name__)


def read_manifest(store: CacheStore) -> CacheManifest | None:
    """The cache's ``cache.json``, None where there is none; a corrupt one is a one-line error."""
    doc = store.read_json(MANIFEST)
    return None if doc is None else CacheManifest.from_json(doc, store.where(MANIFEST))


def open_teacher_cache(cfg: Config, plan: RunPlan, loader: Any) -> TeacherCacheReader | TeacherCacheWriter | None:
    """The reader (``algorithms.distillation.cache``) or writer (``cache_write``) of ``cfg``'s run, or None.

    Checked before training, each a :class:`ConfigError`: a reader's cache must exist, have been written
    for the same teacher inputs and outputs (:func:`~.fingerprint.fingerprint`; the message names the
    first item that differs), in the format the config says, and hold the whole run; a writer's location
    must be empty or a cache of the same fingerprint and format (continued, e.g. after autoresume), never
    someone else's data. ``loader``: the training dataloader (its data's identity and length).
    """
    kd = cfg.algorithms.distillation
    if not kd.enabled or not (kd.cache or kd.cache_write):
        return None
    key = "algorithms.distillation.cache" if kd.cache else "algorithms.distillation.cache_write"
    uri = str(kd.cache or kd.cache_write)
    store = CacheStore(uri, key)
    weights = weights_identity(plan)
    if weights is None:
        log.info("teacher cache: the config names no teacher weights (teacher.checkpoint): their hash is not compared")
    data = data_identity(cfg, loader, content=kd.cache_verify_data)
    current = fingerprint(cfg, plan, data=data, teacher_weights=weights)
    layout = (batches_per_epoch(cfg, loader), plan.microbatches)
    stored = read_manifest(store)
    if stored is not None:
        skip = [*(() if weights else ("teacher weights",)), *(() if kd.cache_verify_data else (DATA_CONTENT,))]
        _check_stored(stored, current, uri, key, reading=bool(kd.cache), skip=skip)
    if kd.cache:
        return _open_reader(cfg, plan, store, stored, key, layout)
    return _open_writer(cfg, plan, store, stored, key, layout, current)


def _check_stored(
    stored: CacheManifest, current: dict[str, Any], uri: str, key: str, reading: bool, skip: list[str]
) -> None:
    """A cache found at ``uri`` written for the same teacher inputs and outputs."""
    difference = first_difference(stored.fingerprint, current, skip=skip)
    if difference is None:
        return
    item, there, here = difference
    if reading:
        message = (
            f"the teacher cache at {uri} was written with {item} = {show(there)}, this run has "
            f"{show(here)}: its teacher outputs are not this run's (write one for this config with "
            "usi-cache-teacher, or drop algorithms.distillation.cache to run the teacher)"
        )
    else:
        message = (
            f"{uri} holds the teacher outputs of another run ({item} = {show(there)} there, "
            f"{show(here)} here): write this run's to a new location"
        )
    raise ConfigError(key, message)


def _open_reader(
    cfg: Config, plan: RunPlan, store: CacheStore, stored: CacheManifest | None, key: str, layout: tuple[int, int]
) -> TeacherCacheReader:
    """The reader of a cache that exists, holds the config's format, has this run's batch layout and
    holds the whole run."""
    uri, kd = store.uri, cfg.algorithms.distillation
    if stored is None:
        raise ConfigError(
            key,
            f"no teacher cache at {uri} (no {MANIFEST}): fill it with usi-cache-teacher YAML [key=value ...] "
            f"--out {uri}, or with algorithms.distillation.cache_write={uri} in a training run",
        )
    wanted = (kd.cache_format, kd.cache_topk if kd.cache_format == "topk" else None)
    if (stored.format, stored.k) != wanted:  # the format is training math: the config must say it
        holds = f"the top {stored.k} logits" if stored.format == "topk" else "every logit"
        fix = (
            f"algorithms.distillation.cache_format=topk algorithms.distillation.cache_topk={stored.k}"
            if stored.format == "topk"
            else "algorithms.distillation.cache_format=full"
        )
        raise ConfigError(
            "algorithms.distillation.cache_format", f"the teacher cache at {uri} holds {holds}: set {fix}"
        )
    per_epoch, microbatches = layout
    if (stored.batches_per_epoch, stored.microbatches) != layout:
        raise ConfigError(
            key,
            f"the teacher cache at {uri} has {stored.batches_per_epoch} batches per epoch of "
            f"{stored.microbatches} microbatches, this run {per_epoch} of {microbatches}",
        )
    needed = run_batches(cfg.trainer.max_duration, per_epoch, cfg.trainer.global_batch_size)
    held = stored_batches(store, plan.world_size)
    if needed is None or needed > held:
        duration = cfg.trainer.max_duration
        run = _describe(needed, per_epoch) if needed else "not counted in batches"
        raise ConfigError(
            "trainer.max_duration",
            f"is {duration}: {run}, the teacher cache at {uri} holds {_describe(held, per_epoch)}: shorten the "
            f"run, or fill a cache for {duration} (usi-cache-teacher ... trainer.max_duration={duration})",
        )
    holds = f"the top {stored.k} logits" if stored.format == "topk" else "every logit (exact)"
    log.info("teacher cache: reading %s from %s; the teacher is not built", holds, uri)
    return TeacherCacheReader(store, stored, needed)


def _open_writer(
    cfg: Config,
    plan: RunPlan,
    store: CacheStore,
    stored: CacheManifest | None,
    key: str,
    layout: tuple[int, int],
    current: dict[str, Any],
) -> TeacherCacheWriter:
    """The writer into an empty location, or into a cache of the same fingerprint and format (continued)."""
    kd, uri = cfg.algorithms.distillation, store.uri
    fmt, k = kd.cache_format, kd.cache_topk if kd.cache_format == "topk" else None
    if stored is not None and (stored.format, stored.k) != (fmt, k):
        raise ConfigError(
            key,
            f"{uri} holds a {stored.format} cache{f' (k={stored.k})' if stored.k else ''}, this run writes "
            f"{fmt}{f' (k={k})' if k else ''}: write to a new location",
        )
    manifest = CacheManifest(fmt, k, cfg.data.num_classes, *layout, plan.world_size, current)
    if dist.get_global_rank() == 0 and stored is None:
        if store.holds_other_files():
            raise ConfigError(key, f"{uri} is a folder with other files in it, not a teacher cache: name a new one")
        store.write_json(MANIFEST, manifest.to_json())
    dist.barrier()  # every rank writes into a cache whose manifest is in place
    trainer = cfg.trainer
    flush_at = create_interval_scheduler(trainer.save_interval) if trainer.save_folder else None
    return TeacherCacheWriter(store, manifest, dist.get_global_rank(), flush_at)


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


def stored_batches(store: CacheStore, world_size: int) -> int:
    """Batches from 0 on stored by every rank, without a gap."""
    prefixes = []
    for rank in range(world_size):
        written = store.read_json(written_object(rank)) or {}
        prefixes.append(prefix_length(merge_ranges(written.get("batches", []))))
    return min(prefixes) if prefixes else 0


def cache_covers(uri: str, max_duration: str, global_batch: int) -> bool:
    """Whether the cache at ``uri`` holds a run of ``max_duration`` (usi-ablate: may its points read it)."""
    store = CacheStore(uri)
    manifest = read_manifest(store)
    if manifest is None:
        return False
    needed = run_batches(max_duration, manifest.batches_per_epoch, global_batch)
    return needed is not None and stored_batches(store, manifest.world_size) >= needed


def _describe(batches: int, per_epoch: int) -> str:
    return f"{batches} batches ({batches / per_epoch:g} epochs)" if per_epoch else f"{batches} batches"
