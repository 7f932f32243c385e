"""streaming's override: ``StreamingDatasetFixes``, the dataset the data layer's MDS reader subclasses.
Imports streaming alone (not Composer's Trainer, checkpoints or the config)."""

from __future__ import annotations

from typing import Any

from streaming import StreamingDataset

from usi_composer.errors import SetupError
from usi_composer.patches import CHECKED, installed_version

__all__ = ["StreamingDatasetFixes"]


class StreamingDatasetFixes(StreamingDataset):
    """streaming's ``StreamingDataset`` (0.13.0) with two private hooks:

    - :meth:`on_epoch` is called in each loader worker at each epoch start, with the epoch it
      iterates, counted up from 0 or the checkpoint's on resume (streaming learns it in
      ``_resume_incr_epoch``, from its resume state in shared memory): the keyed draws need it;
    - streaming's download threads count themselves out (``it.on_exit()``) only when they return
      normally; one that raises is never counted, and the epoch's final ``it.exit()`` then waits
      forever. A failed thread is counted out too, so a dead server ends in an error, never a hang.
    """

    def on_epoch(self, epoch: int) -> None:
        """The epoch this worker process starts iterating (override)."""

    @property
    def parallel_world(self) -> Any:
        """streaming's view of the job (nodes, ranks per node, workers): ``_parallel_rank_world``."""
        world = getattr(self, "_parallel_rank_world", None)
        if world is None:
            raise SetupError(
                f"streaming {installed_version('streaming')}: StreamingDataset._parallel_rank_world is gone "
                f"(checked against {CHECKED['streaming']}); update usi_composer/patches/streaming_dataset.py"
            )
        return world

    def _resume_incr_epoch(self) -> tuple[int, int]:
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self.on_epoch(epoch)
        return epoch, sample_in_epoch

    def _prepare_thread(self, it: Any) -> None:
        try:
            super()._prepare_thread(it)
        except BaseException:
            it.on_exit()
            raise

    def _ready_thread(self, it: Any) -> None:
        try:
            super()._ready_thread(it)
        except BaseException:
            it.on_exit()
            raise
