"""The one resolved description of the input pipeline's pixels (timm's data config, for this recipe).

timm resolves one data config (``resolve_data_config``) and hands it to one factory
(``create_transform``). Here :class:`TransformSpec` is that config: built once from ``cfg.data`` and
the student's normalization (``builders.build_dataloaders``), it drives the CPU transform
(``transforms.BytesTransform``, timm's eval transform), the keyed draws (``draws.draw_sample``) and
the GPU pipeline (``gpu_pipeline.EncodedSample``, ``DeviceTransform``). Its fields have no defaults:
USI's are ``DataConfig``'s (the schema, documented in ``yamls/usi.yaml``), and what follows from the
fields (the eval resize size, RandAugment's fill colour, ...) is derived here once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from timm.data import resolve_data_config, str_to_interp_mode

from usi_composer.data.randaugment import RandAugmentSpec

if TYPE_CHECKING:
    from usi_composer.config import DataConfig

__all__ = ["TransformSpec"]


@dataclass(frozen=True)
class TransformSpec:
    """Everything a sample's pixels depend on, named as the ``data.*`` keys (timm's meanings).

    ``interpolation``: timm's name (``bicubic``, ...) or ``random`` (bilinear or bicubic drawn per
    sample, as timm does). ``auto_augment``: timm's RandAugment string (``rand-m7-mstd0.5-inc1``) or
    None; parsed once into ``randaugment``. ``mean``/``std``: the student's normalization (the device
    normalizes; the mean is also RandAugment's fill colour). ``max_image_pixels``: larger images are
    refused from their header (``transforms.open_image``); None: no limit.

    Build it with :meth:`from_data`; the constructor validates and normalizes to tuples.
    """

    image_size: int
    crop_pct: float
    interpolation: str
    scale: tuple[float, float]
    ratio: tuple[float, float]
    hflip: float
    auto_augment: str | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_image_pixels: int | None
    randaugment: RandAugmentSpec | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _pair("scale", self.scale))
        object.__setattr__(self, "ratio", _pair("ratio", self.ratio))
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if self.interpolation != "random":
            try:
                str_to_interp_mode(self.interpolation)  # timm's names
            except KeyError:
                raise ValueError(
                    f"interpolation must be 'random' or one of timm's (bicubic, bilinear, nearest, ...), "
                    f"got {self.interpolation!r}"
                ) from None
        spec = RandAugmentSpec.parse(self.auto_augment) if self.auto_augment else None
        object.__setattr__(self, "randaugment", spec)

    @classmethod
    def from_data(
        cls, data: DataConfig, *, mean: Sequence[float] | None = None, std: Sequence[float] | None = None
    ) -> TransformSpec:
        """The spec of a ``data`` config section; tests and benchmarks start from its defaults
        (``DataConfig(image_size=24, hflip=0.0)``). ``mean``/``std``: the student's normalization
        (``builders.student_normalization``); None: ``data.mean``/``data.std``, else timm's ImageNet
        defaults, as ``resolve_data_config`` resolves them without a model."""
        resolved = resolve_data_config({"mean": data.mean, "std": data.std})
        return cls(
            image_size=data.image_size,
            crop_pct=data.crop_pct,
            interpolation=data.interpolation,
            scale=tuple(data.scale),  # a (min, max) pair: checked by __post_init__
            ratio=tuple(data.ratio),
            hflip=data.hflip,
            auto_augment=data.auto_augment,
            mean=resolved["mean"] if mean is None else mean,
            std=resolved["std"] if std is None else std,
            max_image_pixels=data.max_image_pixels,
        )

    @property
    def eval_size(self) -> int:
        """The eval resize target of the short side, ``floor(image_size / crop_pct)`` (timm's
        ``scale_size`` in ``transforms_imagenet_eval``); then the center crop to ``image_size``."""
        return math.floor(self.image_size / self.crop_pct)

    @property
    def fixed_interpolation(self) -> str:
        """Where one interpolation serves every sample (the eval resize, and the GPU pipeline's
        RandAugment, batched): ``interpolation``, bicubic where that is ``random`` (a per-sample
        draw, for training crops; timm's eval transform has no 'random')."""
        return "bicubic" if self.interpolation == "random" else self.interpolation

    @property
    def fill(self) -> tuple[int, ...]:
        """RandAugment's fill colour: the mean colour in 0..255, timm's ``img_mean`` (``create_transform``)."""
        return tuple(min(255, round(255 * m)) for m in self.mean)


def _pair(name: str, values: Sequence[float]) -> tuple[float, float]:
    if len(values) != 2 or not 0 < values[0] <= values[1]:
        raise ValueError(f"{name} must be (min, max) with 0 < min <= max, got {tuple(values)}")
    return float(values[0]), float(values[1])
