"""Every random draw of the input pipeline as a pure function of (seed, epoch, sample index).

A sample's view (crop box, resize interpolation, flip, RandAugment's ops and magnitudes) comes
from a counter-based generator keyed by the run's seed, the epoch and the sample's global index,
never from a process-global RNG. So the view does not depend on which loader worker, process or
device computes it, nor on what was drawn before it: a run resumed from a mid-epoch checkpoint
sees the same views as the uninterrupted run, and a cache keyed by (epoch, index) stays valid.

The distributions are timm's (``create_transform(..., is_training=True)`` with the settings of a
:class:`~usi_composer.data.spec.TransformSpec`); only where the random numbers come from differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from usi_composer.data.randaugment import draw_randaugment
from usi_composer.data.spec import TransformSpec

__all__ = ["SampleDraws", "draw_sample", "sample_rng"]

# timm's ``interpolation='random'``: one of these per sample (timm's _RANDOM_INTERPOLATION)
RANDOM_INTERPOLATION = ("bilinear", "bicubic")

# The counter's last word separates independent streams under one seed.
SAMPLE_STREAM = 0


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one sample's draws: numpy's Philox keyed by ``seed``, its counter starting
    at ``(0, index, epoch, SAMPLE_STREAM)``.

    Philox is counter-based: the stream of a (seed, epoch, index) is fixed and distinct from every
    other's (a sample's draws advance only the lowest counter word), and building one costs ~10 us.
    """
    if seed < 0 or epoch < 0 or index < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {seed}, {epoch}, {index}")
    return np.random.Generator(np.random.Philox(key=seed, counter=[0, index, epoch, SAMPLE_STREAM]))


@dataclass
class SampleDraws:
    """One sample's draws, in the order timm's training transform makes them."""

    crop: tuple[int, int, int, int]  # (top, left, height, width) in the source image's full-size pixels
    flip: bool
    interpolation: str  # the spec's; drawn when the spec's is 'random'
    randaugment: np.ndarray | None  # draw_randaugment(...) output, float32 [num_ops, 3]


def draw_sample(rng: np.random.Generator, source_size: tuple[int, int], spec: TransformSpec) -> SampleDraws:
    """Draw one sample's training view (``spec``'s scale, ratio, interpolation, hflip and RandAugment);
    ``source_size`` is ``(width, height)`` from the image header."""
    crop = _crop_box(rng, source_size, spec.scale, spec.ratio)
    interpolation = spec.interpolation
    if interpolation == "random":
        interpolation = RANDOM_INTERPOLATION[int(rng.integers(len(RANDOM_INTERPOLATION)))]
    flip = bool(rng.random() < spec.hflip)
    randaugment = draw_randaugment(rng, spec.randaugment) if spec.randaugment is not None else None
    return SampleDraws(crop, flip, interpolation, randaugment)


def _crop_box(
    rng: np.random.Generator, size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """timm's ``RandomResizedCropAndInterpolation.get_params`` with ``rng``'s numbers: up to 10
    tries of a uniform area fraction and a log-uniform aspect ratio, the box placed uniformly;
    if none fits, the largest central box within ``ratio``. timm draws from Python's global
    ``random`` inside the function, so it cannot take our generator; this is its arithmetic."""
    width, height = size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(*scale) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if w <= width and h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
