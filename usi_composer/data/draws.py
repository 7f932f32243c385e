"""Every random draw of the input pipeline as a pure function of (seed, epoch, sample index).

A sample's view (crop box, resize interpolation, flip, RandAugment's ops and magnitudes) comes
from a counter-based generator keyed by the run's seed, the epoch and the sample's global index,
never from a process-global RNG. So the view does not depend on which loader worker, process or
device computes it, nor on what was drawn before it: a run resumed from a mid-epoch checkpoint
sees the same views as the uninterrupted run, and a cache keyed by (epoch, index) stays valid.

The distributions are timm's (``create_transform(..., is_training=True)`` with USI's settings);
only where the random numbers come from differs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from usi_composer.data.randaugment import RandAugmentSpec, draw_randaugment

__all__ = ["INTERPOLATIONS", "SampleDraws", "TrainDrawSpec", "draw_sample", "sample_rng"]

# timm's ``interpolation='random'``: one of these per sample (timm's _RANDOM_INTERPOLATION)
RANDOM_INTERPOLATION = ("bilinear", "bicubic")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")

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


@dataclass(frozen=True)
class TrainDrawSpec:
    """What the training draws need: the ``data.*`` keys of the same names (timm's meanings).

    ``interpolation='random'`` draws bilinear or bicubic per sample, as timm does.
    ``auto_augment`` is timm's RandAugment string (``rand-m7-mstd0.5-inc1``) or None.
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    interpolation: str = "bicubic"
    auto_augment: str | None = "rand-m7-mstd0.5-inc1"
    randaugment: RandAugmentSpec | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _pair("scale", self.scale))
        object.__setattr__(self, "ratio", _pair("ratio", self.ratio))
        if self.interpolation != "random" and self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be 'random' or one of {INTERPOLATIONS}, got {self.interpolation!r}")
        spec = RandAugmentSpec.parse(self.auto_augment) if self.auto_augment else None
        object.__setattr__(self, "randaugment", spec)


def _pair(name: str, values: Sequence[float]) -> tuple[float, float]:
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got {tuple(values)}")
    return float(values[0]), float(values[1])


@dataclass
class SampleDraws:
    """One sample's draws, in the order timm's training transform makes them."""

    crop: tuple[int, int, int, int]  # (top, left, height, width) in the source image's full-size pixels
    flip: bool
    interpolation: str  # 'bicubic' for USI; drawn when the spec's is 'random'
    randaugment: np.ndarray | None  # draw_randaugment(...) output, float32 [num_ops, 3]


def draw_sample(rng: np.random.Generator, source_size: tuple[int, int], spec: TrainDrawSpec) -> SampleDraws:
    """Draw one sample's view; ``source_size`` is ``(width, height)`` from the image header."""
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
