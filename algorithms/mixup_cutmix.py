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

``mixup_cutmix_batch`` is the mixing itself, a function of the batch and a generator, which
``MixUpCutMix.apply`` calls (as Composer's ``MixUp.apply`` calls ``mixup_batch``); loops without
the Trainer call it too.
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

from ._hparams import HparamsMixin, Range, declare_ranges

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
    rng: np.random.Generator,
    *,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    prob: float = 1.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixes one batch with MixUp or CutMix, its draws from ``rng``: what ``MixUpCutMix`` applies.

    With probability ``prob`` the batch is mixed with its own reverse, by CutMix with probability
    ``switch_prob`` (when both alphas are > 0), else MixUp; the weight or box area ~
    Beta(alpha, alpha), as timm's ``Mixup`` in batch mode. ``MixUpCutMix`` passes
    ``batch_rng(seed, batch, rank, microbatch)``; outside the Trainer, pass ``batch_rng(seed, step)``
    for draws that are a function of the step (or any ``np.random.Generator``).

    Args:
        inputs: images ``(N, C, H, W)``, N even. Mixed in place (as timm's ``Mixup``), and returned.
        targets: integer class targets ``(N,)``.
        num_classes: number of classes of the soft targets.
        rng: the generator of this batch's draws (whether to mix, which, the weight, the box).
        mixup_alpha, cutmix_alpha, switch_prob, prob, label_smoothing: as in ``MixUpCutMix``,
            checked as it checks them (``ValueError``).

    Returns:
        The mixed images and their ``(N, num_classes)`` soft targets.
    """
    _check_batch(inputs, targets)
    given = dict(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, switch_prob=switch_prob, prob=prob)
    for name, value in {**given, "label_smoothing": label_smoothing}.items():
        MixUpCutMix.ranges[name].check(name, value)
    if (message := MixUpCutMix.alphas_violation(mixup_alpha, cutmix_alpha)) is not None:
        raise ValueError(message)
    # timm's Mixup draws from numpy's global RNG inside its methods, which take no generator;
    # the draws (timm's _params_per_batch and rand_bbox arithmetic) and the in-place mixing
    # they feed (timm's _mix_batch, 3 lines) are therefore written here; timm's mixup_target
    # makes the soft targets. Host-side draws, Python-int slices: no device sync.
    lam = 1.0
    if rng.random() < prob:
        use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or rng.random() < switch_prob)
        alpha = cutmix_alpha if use_cutmix else mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if use_cutmix:
            (top, bottom, left, right), lam = _cutmix_box(inputs.shape[-2:], lam, rng)
            inputs[:, :, top:bottom, left:right] = inputs.flip(0)[:, :, top:bottom, left:right]
        else:
            flipped = inputs.flip(0).mul_(1.0 - lam)
            inputs.mul_(lam).add_(flipped)
    return inputs, mixup_target(targets, num_classes, lam, label_smoothing)


def _check_batch(inputs: torch.Tensor, targets: torch.Tensor) -> None:
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


class MixUpCutMix(HparamsMixin, Algorithm):
    """Mixes each training microbatch with MixUp or CutMix (timm ``Mixup`` in ``batch`` mode).

    ``apply`` is ``mixup_cutmix_batch`` on ``state.batch`` at ``Event.BEFORE_FORWARD``, the draws
    of microbatch ``k`` of global batch ``b`` on rank ``r`` from
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

    ``ValueError`` for a value outside ``MixUpCutMix.ranges`` (the alphas >= 0, the probabilities
    and ``label_smoothing`` in [0, 1]) or for two zero alphas (``MixUpCutMix.alphas_violation``).
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
    ranges = declare_ranges(
        mixup_alpha=Range.at_least(0),
        cutmix_alpha=Range.at_least(0),
        switch_prob=Range.closed(0, 1),
        prob=Range.closed(0, 1),
        label_smoothing=Range.closed(0, 1),
    )

    @staticmethod
    def alphas_violation(mixup_alpha: float, cutmix_alpha: float) -> str | None:
        """The rule across the two alphas (each one's own range is in ``ranges``): the message
        when both are 0 (nothing to mix), else None."""
        return "one of mixup_alpha and cutmix_alpha must be > 0" if mixup_alpha == 0 and cutmix_alpha == 0 else None

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
        self.num_classes = num_classes
        self.mixup_alpha = float(mixup_alpha)
        self.cutmix_alpha = float(cutmix_alpha)
        self.switch_prob = float(switch_prob)
        self.prob = float(prob)
        self.label_smoothing = float(label_smoothing)
        self.input_key, self.target_key = input_key, target_key
        self.check_ranges()
        if (message := self.alphas_violation(self.mixup_alpha, self.cutmix_alpha)) is not None:
            raise ValueError(message)
        self._batch, self._microbatch = -1, 0  # which microbatch of which batch comes next

    def match(self, event: Event, state: State) -> bool:
        return event == Event.BEFORE_FORWARD

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        batch = int(state.timestamp.batch)  # batches trained before this one: the global batch index
        self._microbatch = self._microbatch + 1 if batch == self._batch else 0
        self._batch = batch
        rng = batch_rng(state.rank_zero_seed, batch, dist.get_global_rank(), self._microbatch)
        inputs, targets = mixup_cutmix_batch(
            state.batch_get_item(self.input_key),
            state.batch_get_item(self.target_key),
            self.num_classes,
            rng,
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            switch_prob=self.switch_prob,
            prob=self.prob,
            label_smoothing=self.label_smoothing,
        )
        state.batch_set_item(self.input_key, inputs)
        state.batch_set_item(self.target_key, targets)
