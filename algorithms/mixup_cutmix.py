"""MixUp or CutMix, one of them per batch, with USI's switch semantics.

USI (after DeiT) always mixes: each batch gets MixUp (alpha 0.8) or CutMix (alpha 1.0),
chosen with probability ``switch_prob`` = 0.5, with timm's ``Mixup`` (batch mode)
distributions and math. The algorithm puts it at the right place in Composer's step:
``Event.BEFORE_FORWARD``, on the device batch, so that the model's loss and the teacher of
``KnowledgeDistillation`` both see the mixed batch. Targets become soft ``(N, num_classes)``
distributions, so the model's loss must accept soft targets (Composer's ``soft_cross_entropy`` does).

A batch's draws (whether to mix, MixUp or CutMix, the weight, the box) are a pure function of
(seed, global batch index, rank, microbatch): :func:`batch_rng`, a counter-based generator, not a
process-global RNG. So a run resumed mid-epoch mixes every batch as the uninterrupted run did.

``mixup_cutmix_batch`` is the same mixing as a function, for loops without the Trainer
(like Composer's ``mixup_batch`` / ``cutmix_batch``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from composer.core import Algorithm, Event, State
from composer.loggers import Logger
from composer.utils import dist
from timm.data.mixup import mixup_target

from ._hparams import hparams_state, warn_if_changed

__all__ = ["MixUpCutMix", "batch_rng", "mixup_cutmix_batch"]

BatchKey = str | int | tuple[Callable, Callable] | Any  # Composer's batch key: index, name, or (getter, setter)

# The high key word keeps these streams apart from other users of the same seed (the data's draws).
MIX_KEY_DOMAIN = 1


def batch_rng(seed: int, batch: int, rank: int = 0, microbatch: int = 0) -> np.random.Generator:
    """The generator of one microbatch's mixing draws: numpy's Philox (counter-based) keyed by
    ``seed``, its counter starting at ``(0, microbatch, batch, rank)``: a fixed stream per
    (seed, global batch index, rank, microbatch), distinct from every other's."""
    if min(seed, batch, rank, microbatch) < 0:
        raise ValueError(f"seed, batch, rank and microbatch must be >= 0, got {seed}, {batch}, {rank}, {microbatch}")
    key = [seed, MIX_KEY_DOMAIN]
    return np.random.Generator(np.random.Philox(key=key, counter=[0, microbatch, batch, rank]))


def mixup_cutmix_batch(
    inputs: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    prob: float = 1.0,
    label_smoothing: float = 0.0,
    *,
    batch_index: int,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixes one batch with MixUp or CutMix, as ``MixUpCutMix`` does in the Trainer.

    Args:
        inputs: images ``(N, C, H, W)``, N even (the batch is mixed with its own reverse).
            Mixed in place (timm's ``Mixup``), and returned.
        targets: integer class targets ``(N,)``.
        num_classes, mixup_alpha, cutmix_alpha, switch_prob, prob, label_smoothing: as in
            ``MixUpCutMix``.
        batch_index, seed: the draws come from ``batch_rng(seed, batch_index)``.

    Returns:
        The mixed images and their ``(N, num_classes)`` soft targets.
    """
    mixer = MixUpCutMix(num_classes, mixup_alpha, cutmix_alpha, switch_prob, prob, label_smoothing)
    return mixer.mix(inputs, targets, batch_rng(seed, batch_index))


class MixUpCutMix(Algorithm):
    """Mixes each training microbatch with MixUp or CutMix (timm ``Mixup`` in ``batch`` mode).

    Microbatch ``k`` of global batch ``b`` on rank ``r`` draws from
    ``batch_rng(state.rank_zero_seed, b, r, k)``.

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
        self._batch, self._microbatch = -1, 0  # which microbatch of which batch comes next

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
        batch = int(state.timestamp.batch)  # batches trained before this one: the global batch index
        self._microbatch = self._microbatch + 1 if batch == self._batch else 0
        self._batch = batch
        rng = batch_rng(state.rank_zero_seed, batch, dist.get_global_rank(), self._microbatch)
        inputs, targets = state.batch_get_item(self.input_key), state.batch_get_item(self.target_key)
        inputs, targets = self.mix(inputs, targets, rng)
        state.batch_set_item(self.input_key, inputs)
        state.batch_set_item(self.target_key, targets)

    def mix(
        self, inputs: torch.Tensor, targets: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and soft targets for one (micro)batch, drawn from ``rng`` (see ``mixup_cutmix_batch``)."""
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
        # timm's Mixup draws from numpy's global RNG inside its methods, which take no generator;
        # the draws (timm's _params_per_batch and rand_bbox arithmetic) and the in-place mixing
        # they feed (timm's _mix_batch, 3 lines) are therefore written here; timm's mixup_target
        # makes the soft targets. Host-side draws, Python-int slices: no device sync.
        lam = 1.0
        if rng.random() < self.prob:
            use_cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
            alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            lam = float(rng.beta(alpha, alpha))
            if use_cutmix:
                (top, bottom, left, right), lam = self._cutmix_box(inputs.shape[-2:], lam, rng)
                inputs[:, :, top:bottom, left:right] = inputs.flip(0)[:, :, top:bottom, left:right]
            else:
                flipped = inputs.flip(0).mul_(1.0 - lam)
                inputs.mul_(lam).add_(flipped)
        return inputs, mixup_target(targets, self.num_classes, lam, self.label_smoothing)

    @staticmethod
    def _cutmix_box(size: torch.Size, lam: float, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], float]:
        """timm's ``rand_bbox`` (a box of side ``sqrt(1 - lam)``, centered uniformly, clipped) and
        its ``correct_lam`` (lam from the clipped box's area): (top, bottom, left, right), lam."""
        height, width = int(size[0]), int(size[1])
        cut = math.sqrt(1 - lam)
        cut_h, cut_w = int(height * cut), int(width * cut)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
        left, right = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
        return (top, bottom, left, right), 1.0 - (bottom - top) * (right - left) / float(height * width)
