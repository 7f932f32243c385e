"""Knowledge distillation from a frozen teacher, the core of USI (Ridnik et al., 2022).

The teacher sees exactly the batch the student trained on, after every input-changing
algorithm (MixUp/CutMix) ran, so its soft labels describe the mixed image. The loss becomes::

    loss = ce_weight * CE(student, targets) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))

USI's values: ``alpha=5``, ``T=1``, ``ce_weight=1``. See ``algorithms/README.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from composer.core import Algorithm, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from composer.utils import dist
from torch import nn

from ._hparams import HparamsMixin, Range, declare_ranges

__all__ = ["KnowledgeDistillation", "TeacherKey", "kd_loss"]

# Which teacher outputs a microbatch needs: (epoch, global batch index, rank, microbatch), the
# coordinates the keyed draws of the data and of MixUp/CutMix are functions of.
TeacherKey = tuple[int, int, int, int]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch.

    Computed in fp32 whatever dtype the logits come in: a bf16/fp16 softmax of large logits
    loses the tail of the distribution, which is what distillation transfers. The ``T^2``
    factor keeps the gradient scale independent of ``T`` (Hinton et al., 2015). The teacher's
    logits are the target, a constant: the gradient flows to the student's logits only, even
    where the teacher's came with a graph.
    """
    KnowledgeDistillation.ranges["temperature"].check("temperature", temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape: do the two models have the same classes?"
        )
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


class KnowledgeDistillation(HparamsMixin, Algorithm):
    """Adds ``alpha * kd_loss(student, teacher)`` to the loss, with a frozen ``teacher``.

    Runs on ``Event.AFTER_LOSS``: by then every ``BEFORE_FORWARD`` algorithm (MixUp/CutMix)
    has changed ``state.batch``, and the model's own loss is in ``state.loss``. The teacher's
    forward runs under ``no_grad`` and the trainer's precision; ``kd_loss`` runs in fp32.
    ``state.loss`` becomes the total, which Composer backpropagates and logs as
    ``loss/train/total`` every batch.

    Nothing in the step reads a value back to the host (on a GPU each read stalls the queue of
    kernels). The two parts of the loss and a non-finite flag are kept on the device and read
    in one transfer every ``log_interval`` batches and at the end of each epoch and of
    ``fit()``: ``loss/train/ce`` and ``loss/train/kd`` are logged then, as means over the
    batches since the last read (over all ranks), and a non-finite total stops training with
    the number of the batch where it first happened. So training stops at most
    ``log_interval`` batches after the loss went non-finite; checkpoints saved at epoch ends
    (the recipe's) never hold diverged weights, since the epoch-end read comes first.

    The teacher is held by the algorithm, not by the model: DDP/FSDP never wrap it, the
    optimizer never sees it and checkpoints do not store it again. The algorithm's
    ``state_dict()`` records its hyper-parameters as values; they still come from the
    constructor on resumption (a resumed run uses the config it is given, with a warning
    where it differs from the checkpoint's).

    Args:
        teacher: any ``nn.Module`` mapping the student's input batch to logits of the same
            classes. It is frozen (``eval()``, ``requires_grad_(False)``) and moved to the
            trainer's device at ``Event.INIT``. Input normalization that differs from the
            student's belongs inside it (``usi_composer.teacher`` does that for timm models).
        alpha: weight of the KD term. USI: 5.
        temperature: softmax temperature ``T``. USI: 1.
        ce_weight: weight of the model's own loss; 0 distils from the teacher alone. USI: 1.
        log_interval: batches between the host's reads of the distillation statistics (one
            host sync each): the logged ce/kd means and the non-finite check.
        teacher_outputs: instead of a ``teacher``, where its outputs come from: called with each
            microbatch's :data:`TeacherKey` ``(epoch, batch, rank, microbatch)``, it returns the
            teacher's logits for that microbatch on the trainer's device (e.g. read from a cache
            of an earlier run's outputs: ``usi_composer.teacher_cache``). Exactly one of
            ``teacher`` and ``teacher_outputs``.
        on_teacher_outputs: with a ``teacher``, called with each microbatch's key and the
            teacher's logits (detached, in the teacher's output dtype), e.g. to store them.

    ``ValueError`` for a value outside ``KnowledgeDistillation.ranges`` (``alpha >= 0``,
    ``temperature > 0``, ``ce_weight >= 0``, ``log_interval >= 1``), and unless exactly one of
    ``teacher`` and ``teacher_outputs`` is given.
    """

    hparams = ("alpha", "temperature", "ce_weight", "log_interval")
    repr_by_name = ("teacher",)
    ranges = declare_ranges(
        alpha=Range.at_least(0),
        temperature=Range.above(0),
        ce_weight=Range.at_least(0),
        log_interval=Range.at_least(1),
    )

    def __init__(
        self,
        teacher: nn.Module | None = None,
        alpha: float = 5.0,
        temperature: float = 1.0,
        ce_weight: float = 1.0,
        log_interval: int = 100,
        *,
        teacher_outputs: Callable[[TeacherKey], torch.Tensor] | None = None,
        on_teacher_outputs: Callable[[TeacherKey, torch.Tensor], None] | None = None,
    ) -> None:
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)
        self.log_interval = int(log_interval)
        self.check_ranges()
        if (teacher is None) == (teacher_outputs is None):
            raise ValueError("give exactly one of teacher and teacher_outputs")
        if on_teacher_outputs is not None and teacher is None:
            raise ValueError("on_teacher_outputs needs a teacher (it receives the teacher's outputs)")
        self.teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.teacher_outputs, self.on_teacher_outputs = teacher_outputs, on_teacher_outputs
        self._batch, self._microbatch = -1, 0  # which microbatch of which batch comes next (as MixUpCutMix)
        # On the device since the last read: sample-weighted sums of ce, kd and of non-finite
        # totals, and the first batch with one (-1: none). Samples are counted on the host.
        self._stats: torch.Tensor | None = None
        self._first_non_finite: torch.Tensor | None = None
        self._samples = 0

    def match(self, event: Event, state: State) -> bool:
        if event == Event.BATCH_END:
            return int(state.timestamp.batch) % self.log_interval == 0
        return event in (Event.INIT, Event.AFTER_LOSS, Event.EPOCH_END, Event.FIT_END)

    def apply(self, event: Event, state: State, logger: Logger) -> int | None:
        if event == Event.INIT:
            if self.teacher is not None:
                state.device.module_to_device(self.teacher)
            return None
        if event != Event.AFTER_LOSS:
            self._read_stats(state, logger)
            return None

        inputs = state.batch_get_item(0)
        batch = int(state.timestamp.batch)
        self._microbatch = self._microbatch + 1 if batch == self._batch else 0
        self._batch = batch
        key = (int(state.timestamp.epoch), batch, dist.get_global_rank(), self._microbatch)
        if self.teacher_outputs is not None:
            teacher_logits = self.teacher_outputs(key)
        else:
            assert self.teacher is not None
            with torch.no_grad(), get_precision_context(state.precision, state.precision_config):
                teacher_logits = self.teacher(inputs)
            if self.on_teacher_outputs is not None:
                self.on_teacher_outputs(key, teacher_logits.detach())
        kd = kd_loss(state.outputs, teacher_logits, self.temperature)
        ce = _total_loss(state.loss)
        total = self.ce_weight * ce + self.alpha * kd
        self._record(ce, kd, total, batch, inputs.shape[0])
        state.loss = total
        return None

    def _record(self, ce: torch.Tensor, kd: torch.Tensor, total: torch.Tensor, batch: int, samples: int) -> None:
        """Adds this microbatch to the device-side statistics (a few scalar kernels, no host sync)."""
        if self._stats is None:
            self._stats = torch.zeros(3, dtype=torch.float64, device=total.device)
            self._first_non_finite = torch.full((), -1, dtype=torch.long, device=total.device)
        assert self._first_non_finite is not None
        non_finite = torch.isfinite(total).logical_not_()
        self._stats.add_(torch.stack([ce.detach().float(), kd.detach(), non_finite]), alpha=samples)
        first = non_finite.logical_and_(self._first_non_finite.lt(0))
        self._first_non_finite = torch.where(first, batch, self._first_non_finite)
        self._samples += samples

    def _read_stats(self, state: State, logger: Logger) -> None:
        """The host's read (one sync): log the ce/kd means since the last read, stop on a non-finite loss."""
        if self._stats is None or self._first_non_finite is None or not self._samples:
            return
        values = torch.cat([self._stats, self._stats.new_tensor([self._samples]), self._first_non_finite.view(1)])
        dist.all_reduce(values[:4])  # the sums over ranks (every rank reads at the same batches)
        ce_sum, kd_sum, non_finite, samples, first_here = values.tolist()
        self._stats.zero_()
        self._samples = 0
        if non_finite:
            where = f"at batch {int(first_here)}" if first_here >= 0 else "on another rank"
            raise FloatingPointError(
                f"non-finite loss {where} (found at batch {int(state.timestamp.batch)}, "
                f"epoch {int(state.timestamp.epoch)}). Lower the learning rate, check the inputs, "
                "or train in fp32/bf16 instead of fp16."
            )
        logger.log_metrics({"loss/train/ce": ce_sum / samples, "loss/train/kd": kd_sum / samples})


def _total_loss(loss: torch.Tensor | dict | tuple | list) -> torch.Tensor:
    """The model's loss as one scalar, the way Composer backpropagates it."""
    if isinstance(loss, torch.Tensor):
        return loss.mean()
    if isinstance(loss, dict):
        if "total" in loss:
            return loss["total"]
        return sum(v.mean() for v in loss.values())
    return sum(v.mean() for v in loss)
