"""Writing a teacher cache: each microbatch's teacher logits, stored off the step's critical path."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger

from usi_composer.algorithms import TeacherKey
from usi_composer.errors import SetupError
from usi_composer.teacher_cache.format import (
    CacheManifest,
    batch_object,
    encode,
    merge_ranges,
    prefix_length,
    serialize_batch,
    written_object,
)
from usi_composer.teacher_cache.store import CacheStore

__all__ = ["TeacherCacheWriter"]

IO_THREADS = 2
MAX_PENDING_WRITES = 8  # batches waiting for storage before the step waits for them


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
        written = store.read_json(written_object(rank)) or {}
        self._ranges = merge_ranges(written.get("batches", []))
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
        return prefix_length(self._ranges)

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
        if event is not None:
            event.synchronize()
        data = serialize_batch(parts, epoch, batch, self.rank)
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
        self._ranges = merge_ranges([*self._ranges, [batch, batch + 1]])

    def flush(self) -> None:
        """Wait until every batch so far is stored, then record them in ``rank{r}/written.json``."""
        self._submit()
        while self._pending:
            self._finish(*self._pending.pop(0))
        self.store.write_json(written_object(self.rank), {"batches": self._ranges})

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
