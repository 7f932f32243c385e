"""Reading a teacher cache: each microbatch's teacher logits, read ahead of the step and verified."""

from __future__ import annotations

import concurrent.futures
import logging
import time
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger

from usi_composer.algorithms import TeacherKey
from usi_composer.teacher_cache.format import REPAIR, CacheManifest, CorruptCacheError, batch_object, decode, read_batch
from usi_composer.teacher_cache.store import CacheStore

__all__ = ["TeacherCacheReader"]

log = logging.getLogger(__name__)

READ_AHEAD = 4  # batches read ahead of the step
IO_THREADS = 2


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
            raise CorruptCacheError(
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
        """(On an I/O thread.) One batch file, verified (``format.read_batch``), pinned on CUDA."""
        name = batch_object(epoch, batch, rank)
        try:
            data = self.store.read(name)
        except FileNotFoundError:
            raise CorruptCacheError(f"teacher cache {self.store.uri}: {name} is missing; {REPAIR}") from None
        tensors = read_batch(data, self.store.where(name), epoch, batch, rank)
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
