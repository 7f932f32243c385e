"""USI's image transforms (timm's factory) and the batched normalization that runs on the device.

The per-image pipeline stops at a uint8 CHW tensor (timm's ``use_prefetcher`` path): float
conversion and normalization run once per batch on the training device, as a Composer
``DataSpec`` microbatch transform, not per image on the CPU workers.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision.transforms import Compose, Resize
from torchvision.transforms.functional import pil_modes_mapping

__all__ = ["BytesTransform", "DeviceNormalize", "build_bytes_transform", "build_transform", "decode_rgb"]


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


# --------------------------------------------------------------------------- JPEG bytes -> uint8 CHW

# Pillow's two-step downscale in ``resize``: first an integer box reduction down to within this
# factor of the output, then the bicubic resample; 3.0 is indistinguishable from a plain resample.
REDUCING_GAP = 3.0


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded image bytes -> RGB PIL image, exactly as timm/torchvision's folder loader does it.

    Pillow sniffs the format from the bytes, so a PNG saved under a ``.JPEG`` name decodes too;
    grayscale, CMYK and palette images become 3-channel RGB.
    """
    img = Image.open(io.BytesIO(data))
    return img.convert("RGB")


class BytesTransform:
    """Encoded image bytes -> uint8 CHW tensor: the same timm pipeline as :func:`build_transform`.

    With ``fast=True`` two steps change how the pixels are computed, not what they show:

    * training: the RandomResizedCrop box is drawn by timm's own ``get_params`` from the image
      header (same random numbers, same box as timm); the JPEG is then decoded at the smallest
      DCT scale (1/2, 1/4, 1/8, PIL ``draft``) at which the box still has at least the output
      resolution in both directions, and crop + resize happen in one ``Image.resize(box=...)``
      call. The rest (flip, RandAugment, to-tensor) is timm's transform unchanged.
    * eval: the JPEG is decoded at the smallest DCT scale that still covers twice the resize target,
      then timm's eval transform runs unchanged.

    timm has no transform that starts from undecoded bytes, hence this class; everything it
    does not do itself is delegated to timm's transforms.
    """

    def __init__(self, transform: Any, is_training: bool, fast: bool = True) -> None:
        self.transform, self.is_training, self.fast = transform, is_training, fast
        steps = list(getattr(transform, "transforms", []))
        if is_training:
            if not steps or not isinstance(steps[0], RandomResizedCropAndInterpolation):
                raise TypeError(f"expected timm's RandomResizedCrop first in the training transform, got {steps[:1]}")
            self.crop, self.rest = steps[0], Compose(steps[1:])
        else:
            resize = next((s for s in steps if isinstance(s, Resize)), None)
            self.eval_size: int | None = None
            if resize is not None and isinstance(resize.size, int | list | tuple):
                size = resize.size if isinstance(resize.size, int) else max(resize.size)
                self.eval_size = int(size)

    def __call__(self, data: bytes) -> torch.Tensor:
        if not self.fast:
            return self.transform(decode_rgb(data))
        if self.is_training:
            return self.rest(self.random_resized_crop(data))
        img = Image.open(io.BytesIO(data))
        if self.eval_size is not None and img.format == "JPEG":
            # Both sides stay >= twice the resize target: the eval image is the reference, so the
            # bicubic antialiasing does the last 2x (at 1x the DCT scaling's aliasing shows).
            img.draft(None, (2 * self.eval_size, 2 * self.eval_size))
        return self.transform(img.convert("RGB"))

    def random_resized_crop(self, data: bytes) -> Image.Image:
        """timm's RandomResizedCrop on encoded bytes, with reduced-size decoding (see the class doc)."""
        img = Image.open(io.BytesIO(data))
        crop = self.crop
        top, left, height, width = crop.get_params(img, crop.scale, crop.ratio)  # reads only the header
        interpolation = crop.interpolation
        if isinstance(interpolation, list | tuple):  # timm's 'random' interpolation, drawn after the box
            interpolation = random.choice(interpolation)
        out_h, out_w = crop.size
        full_w, full_h = img.size
        if img.format == "JPEG":
            # Smallest decode at which the crop box keeps >= out_w x out_h pixels.
            img.draft(None, (math.ceil(full_w * out_w / width), math.ceil(full_h * out_h / height)))
        sx, sy = img.size[0] / full_w, img.size[1] / full_h
        box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
        if img.mode != "L":  # grayscale resamples as one channel and becomes RGB after (the same result)
            img = img.convert("RGB")
        resample = pil_modes_mapping[interpolation]
        out = img.resize((out_w, out_h), resample, box=box, reducing_gap=REDUCING_GAP)
        return out.convert("RGB")

    def __repr__(self) -> str:
        return f"BytesTransform(fast={self.fast}, transform={self.transform})"


def build_bytes_transform(image_size: int, is_training: bool, *, fast: bool = True, **kwargs: Any) -> BytesTransform:
    """:func:`build_transform` (same keyword arguments) applied to encoded image bytes."""
    return BytesTransform(build_transform(image_size, is_training, **kwargs), is_training, fast=fast)
