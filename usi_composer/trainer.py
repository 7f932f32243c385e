"""Composer's ``Trainer`` without two of its per-step host syncs.

Every ``.item()`` on a GPU tensor waits for the queue of kernels to drain, and the CPU cannot
queue the next kernels meanwhile. Composer 0.32's step reads values back nine times; two of
those reads are not needed by this recipe, and nothing Composer offers turns them off:

- the optimizer closure ends in ``loss.item()``, a wait between the backward pass and the
  optimizer step. torch's own optimizers only call a closure to return its loss, so this recipe
  runs them without one, as Composer itself does under fp16 AMP;
- the sample/token/time accounting moves three numbers to the device, reduces them over the
  ranks and reads each back (three waits). With one process there is nothing to reduce; with
  several, one reduction of the three numbers and one read do.

What stays: the end-of-data flag, the batch size and the logged loss (three reads, the same
count as timm's loop). Both overrides replace private methods of the pinned Composer (0.32.1);
``tests/test_benchmarks.py`` pins the resulting count, so an upgrade that moves them shows.
"""

from __future__ import annotations

import datetime

import composer
import torch
from composer.utils import dist, ensure_tuple

__all__ = ["Trainer"]


class Trainer(composer.Trainer):
    """``composer.Trainer`` with the optimizer closure's and the time accounting's host syncs removed."""

    def _use_closures(self) -> bool:
        optimizers = ensure_tuple(self.state.optimizers)
        if optimizers and all(type(o).__module__.startswith("torch.optim.") for o in optimizers):
            return False  # torch's optimizers call a closure only to return its loss
        return super()._use_closures()

    def _accumulate_time_across_ranks(
        self, num_samples: int | float, num_tokens: int, batch_time: datetime.timedelta
    ) -> tuple[int, int, datetime.timedelta]:
        if isinstance(num_samples, float):  # sequence parallelism: Composer's own checks
            return super()._accumulate_time_across_ranks(num_samples, num_tokens, batch_time)
        if dist.get_world_size() == 1:
            return int(num_samples), int(num_tokens), batch_time
        # Samples and tokens are summed over the ranks, the batch time is rank 0's: one reduction.
        seconds = batch_time.total_seconds() if dist.get_global_rank() == 0 else 0.0
        values = self.state.device.tensor_to_device(
            torch.tensor([num_samples, num_tokens, seconds], dtype=torch.float64)
        )
        dist.all_reduce(values, reduce_operation="SUM")
        samples, tokens, seconds = values.tolist()
        return round(samples), round(tokens), datetime.timedelta(seconds=seconds)
