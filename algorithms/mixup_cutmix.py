"""MixUp or CutMix, one of them per batch, with USI's switch semantics.

USI (after DeiT) always mixes: each batch gets MixUp (alpha 0.8) or CutMix (alpha 1.0),
chosen with probability ``switch_prob`` = 0.5. timm's ``Mixup`` does the sampling; this
algorithm only puts it at the right place in Composer's step: ``Event.BEFORE_FORWARD``, on
the device batch, so that the model's loss and the teacher of ``KnowledgeDistillation``
both see the mixed batch. Targets become soft ``(N, num_classes)`` distributions, so the
model's loss must accept soft targets (Composer's ``soft_cross_entropy`` does).

``mixup_cutmix_batch`` is the same mixing as a function, for loops without the Trainer
(like Composer's ``mixup_batch`` / ``cutmix_batch``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from timm.data import Mixup

from ._hparams import hparams_state, warn_if_changed

__all__ = ["MixUpCutMix", "mixup_cutmix_batch"]

BatchKey = str | int | tuple[Callable, Callable] | Any  # Composer's batch key: index, name, or (getter, setter)


def mixup_cutmix_batch(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    prob: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixes one batch with MixUp or CutMix, as ``MixUpCutMix`` does in the Trainer.

    Args:
        inputs: images ``(N, C, H, W)``, N even (the batch is mixed with its own reverse).
            Mixed in place (timm's ``Mixup``), and returned.
        targets: integer class targets ``(N,)``.
        num_classes, mixup_alpha, cutmix_alpha, switch_prob, prob, label_smoothing: as in
            ``MixUpCutMix``.

    Returns:
        The mixed images and their ``(N, num_classes)`` soft targets. Sampling uses numpy's
        global RNG (timm's), so seed it for repeatable mixing.
    """
    mixer = MixUpCutMix(num_classes, mixup_alpha, cutmix_alpha, switch_prob, prob, label_smoothing)
    return mixer.mix(inputs, targets)


class MixUpCutMix(Algorithm):
    """Mixes each training microbatch with MixUp or CutMix (timm ``Mixup`` in ``batch`` mode).

    Args:
        num_classes: number of classes, to turn integer targets into distributions.
        mixup_alpha: Beta(alpha, alpha) for the MixUp weight; 0 disables MixUp. USI: 0.8.
        cutmix_alpha: Beta(alpha, alpha) for the CutMix area; 0 disables CutMix. USI: 1.0.
        switch_prob: probability of CutMix rather than MixUp when both are on. USI: 0.5.
        prob: probability that a batch is mixed at all. USI: 1.0.
        label_smoothing: smoothing folded into the mixed targets. USI: 0.0.
        input_key: where the images are in the batch, as in Composer's ``MixUp``/``CutMix``:
            an index, a key, or a ``(getter, setter)`` pair. Default 0.
        target_key: where the integer targets are, likewise. Default 1.

    The microbatch size must be even (the batch is mixed with its own reverse).
    """

    hparams = (
        "num_classes",
        "mixup_alpha",
        "cutmix_alpha",
        "switch_prob",
        "prob",
        "label_smoothing",
        "input_key",
        "target_key",
    )

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        switch_prob: float = 0.5,
        prob: float = 1.0,
        label_smoothing: float = 0.0,
        input_key: BatchKey = 0,
        target_key: BatchKey = 1,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        if mixup_alpha == 0 and cutmix_alpha == 0:
            raise ValueError("one of mixup_alpha and cutmix_alpha must be > 0")
        for name, value in (("switch_prob", switch_prob), ("prob", prob), ("label_smoothing", label_smoothing)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.num_classes = num_classes
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.switch_prob = float(switch_prob)
        self.prob = float(prob)
        self.label_smoothing = float(label_smoothing)
        self.input_key, self.target_key = input_key, target_key
        self._mixup = Mixup(
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            prob=self.prob,
            switch_prob=self.switch_prob,
            mode="batch",
            label_smoothing=self.label_smoothing,
            num_classes=num_classes,
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, "
            f"cutmix_alpha={self.cutmix_alpha}, switch_prob={self.switch_prob}, prob={self.prob}, "
            f"label_smoothing={self.label_smoothing}, input_key={self.input_key!r}, target_key={self.target_key!r})"
        )

    def state_dict(self) -> dict:
        return hparams_state(self, self.hparams)

    def load_state_dict(self, state: dict) -> None:
        warn_if_changed(self, state, self.hparams)

    def match(self, event: Event, state: State) -> bool:
        return event == Event.BEFORE_FORWARD

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        inputs, targets = state.batch_get_item(self.input_key), state.batch_get_item(self.target_key)
        inputs, targets = self.mix(inputs, targets)
        state.batch_set_item(self.input_key, inputs)
        state.batch_set_item(self.target_key, targets)

    def mix(self, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and soft targets for one (micro)batch (see ``mixup_cutmix_batch``)."""
        if targets.ndim != 1:
            raise ValueError(
                f"MixUpCutMix expects integer class targets of shape (N,), got {tuple(targets.shape)}: "
                "is another mixing algorithm enabled too?"
            )
        if inputs.shape[0] % 2:
            raise ValueError(
                f"MixUpCutMix needs an even microbatch size, got {inputs.shape[0]}: "
                "use an even batch size per device and drop the last incomplete batch."
            )
        # timm's Mixup samples with numpy's global RNG, which Composer checkpoints and restores.
        return self._mixup(inputs, targets)
