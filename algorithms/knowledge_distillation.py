"""Knowledge distillation from a frozen teacher, the core of USI (Ridnik et al., 2022).

The teacher sees exactly the batch the student trained on, after every input-changing
algorithm (MixUp/CutMix) ran, so its soft labels describe the mixed image. The loss becomes::

    loss = ce_weight * CE(student, targets) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T))

USI's values: ``alpha=5``, ``T=1``, ``ce_weight=1``. See ``algorithms/README.md``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from composer.core import Algorithm, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from torch import nn

__all__ = ["KnowledgeDistillation", "kd_loss"]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch.

    Computed in fp32 whatever dtype the logits come in: a bf16/fp16 softmax of large logits
    loses the tail of the distribution, which is what distillation transfers. The ``T^2``
    factor keeps the gradient scale independent of ``T`` (Hinton et al., 2015).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape: do the two models have the same classes?"
        )
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


class KnowledgeDistillation(Algorithm):
    """Adds ``alpha * kd_loss(student, teacher)`` to the loss, with a frozen ``teacher``.

    Runs on ``Event.AFTER_LOSS``: by then every ``BEFORE_FORWARD`` algorithm (MixUp/CutMix)
    has changed ``state.batch``, and the model's own loss is in ``state.loss``. The teacher's
    forward runs under ``no_grad`` and the trainer's precision; ``kd_loss`` runs in fp32.
    ``state.loss`` becomes ``{"total", "ce", "kd"}``, so Composer logs
    ``loss/train/{total,ce,kd}`` with its usual microbatch accounting and backpropagates
    ``total``. A non-finite total stops training with the batch number, instead of
    training on NaN.

    The teacher is held by the algorithm, not by the model: DDP/FSDP never wrap it, the
    optimizer never sees it and checkpoints do not store it again (the algorithm's
    ``state_dict()`` is only its ``repr``: it has no state of its own, and hyper-parameters
    come from the constructor, so a resumed run uses the config it is given).

    Args:
        teacher: any ``nn.Module`` mapping the student's input batch to logits of the same
            classes. It is frozen (``eval()``, ``requires_grad_(False)``) and moved to the
            trainer's device at ``Event.INIT``. Input normalization that differs from the
            student's belongs inside it (``usi_composer.teacher`` does that for timm models).
        alpha: weight of the KD term. USI: 5.
        temperature: softmax temperature ``T``. USI: 1.
        ce_weight: weight of the model's own loss; 0 distils from the teacher alone. USI: 1.
    """

    def __init__(
        self, teacher: nn.Module, alpha: float = 5.0, temperature: float = 1.0, ce_weight: float = 1.0
    ) -> None:
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if ce_weight < 0:
            raise ValueError(f"ce_weight must be >= 0, got {ce_weight}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.ce_weight = float(ce_weight)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(teacher=teacher, alpha={self.alpha}, "
            f"temperature={self.temperature}, ce_weight={self.ce_weight})"
        )

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.AFTER_LOSS)

    def apply(self, event: Event, state: State, logger: Logger) -> int | None:
        if event == Event.INIT:
            state.device.module_to_device(self.teacher)
            return None

        inputs = state.batch_get_item(0)
        with torch.no_grad(), get_precision_context(state.precision, state.precision_config):
            teacher_logits = self.teacher(inputs)
        kd = kd_loss(state.outputs, teacher_logits, self.temperature)
        ce = _total_loss(state.loss)
        total = self.ce_weight * ce + self.alpha * kd
        if not bool(torch.isfinite(total)):
            raise FloatingPointError(
                f"non-finite loss at batch {int(state.timestamp.batch)} (epoch {int(state.timestamp.epoch)}): "
                f"ce={float(ce):.4g}, kd={float(kd):.4g}. Lower the learning rate, check the inputs, "
                "or train in fp32/bf16 instead of fp16."
            )
        state.loss = {"total": total, "ce": ce.detach(), "kd": kd.detach()}
        return None


def _total_loss(loss: torch.Tensor | dict | tuple | list) -> torch.Tensor:
    """The model's loss as one scalar, the way Composer backpropagates it."""
    if isinstance(loss, torch.Tensor):
        return loss.mean()
    if isinstance(loss, dict):
        if "total" in loss:
            return loss["total"]
        return sum(v.mean() for v in loss.values())
    return sum(v.mean() for v in loss)
