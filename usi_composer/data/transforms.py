"""USI's image transforms (timm's factory) and the batched normalization that runs on the device.

The per-image pipeline stops at a uint8 CHW tensor (timm's ``use_prefetcher`` path): float
conversion and normalization run once per batch on the training device, as a Composer
``DataSpec`` microbatch transform, not per image on the CPU workers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from timm.data import create_transform

__all__ = ["DeviceNormalize", "build_transform"]


def build_transform(
    image_size: int,
    is_training: bool,
    *,
    crop_pct: float = 0.95,
    interpolation: str = "bicubic",
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    auto_augment: str | None = "rand-m7-mstd0.5-inc1",
    mean: Sequence[float] = (0.485, 0.456, 0.406),
) -> Callable[[Any], torch.Tensor]:
    """PIL image -> uint8 CHW tensor. Training: bicubic RandomResizedCrop + flip + RandAugment;
    eval: resize to ``image_size / crop_pct`` and center crop."""
    return create_transform(
        image_size,
        is_training=is_training,
        use_prefetcher=True,  # uint8 out; normalization happens on the device
        scale=tuple(scale),
        ratio=tuple(ratio),
        hflip=hflip,
        vflip=0.0,
        color_jitter=None,  # USI: RandAugment only
        auto_augment=auto_augment if is_training else None,
        interpolation=interpolation,
        crop_pct=crop_pct,
        mean=tuple(mean),  # RandAugment fills with the mean color
    )


class DeviceNormalize:
    """uint8 images -> normalized float, for ``DataSpec(microbatch_transforms=...)``.

    Composer applies it after moving each microbatch to the device.

    ``(x / 255 - mean) / std`` as one multiply-add per element, on whatever device the batch
    is, optionally in channels-last layout for channels-last models.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], channels_last: bool = False) -> None:
        self.mean, self.std, self.channels_last = tuple(mean), tuple(std), channels_last
        self._scale = torch.tensor([1 / (255 * s) for s in std]).view(1, 3, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)]).view(1, 3, 1, 1)

    def __call__(self, batch: Any) -> Any:
        images, targets = batch
        scale = self._scale.to(images.device)
        shift = self._shift.to(images.device)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return torch.addcmul(shift, images.float(), scale), targets

    def __repr__(self) -> str:
        return f"DeviceNormalize(mean={self.mean}, std={self.std}, channels_last={self.channels_last})"
