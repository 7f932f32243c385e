"""USI's image transforms (timm's factory) and the batched normalization that runs on the device.

The per-image pipeline stops at a uint8 CHW tensor (timm's ``use_prefetcher`` path): float
conversion and normalization run once per batch on the training device, as a Composer
``DataSpec`` microbatch transform, not per image on the CPU workers.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_modes_mapping, pil_to_tensor, resized_crop

from usi_composer.data.draws import draw_sample
from usi_composer.data.randaugment import apply_pil
from usi_composer.data.spec import TransformSpec
from usi_composer.errors import CorruptSampleError, reason

__all__ = [
    "BytesTransform",
    "DeviceNormalize",
    "build_transform",
    "decode_rgb",
    "open_image",
    "transform_sample",
]


def build_transform(
    spec: TransformSpec, training: bool, *, use_prefetcher: bool = True
) -> Callable[[Any], torch.Tensor]:
    """timm's transform for ``spec``, PIL image -> uint8 CHW tensor. Training: RandomResizedCrop + flip +
    RandAugment; eval: resize the short side to ``spec.eval_size`` and center crop ``image_size``.
    ``use_prefetcher=False``: timm's standard output instead, a float tensor normalized per image."""
    return create_transform(
        spec.image_size,
        is_training=training,
        use_prefetcher=use_prefetcher,  # True: uint8 out, normalized on the device (DeviceNormalize)
        scale=spec.scale,
        ratio=spec.ratio,
        hflip=spec.hflip,
        vflip=0.0,
        color_jitter=None,  # USI: RandAugment only
        auto_augment=spec.auto_augment if training else None,
        interpolation=spec.interpolation if training else spec.fixed_interpolation,
        crop_pct=spec.crop_pct,
        mean=spec.mean,  # RandAugment fills with the mean color
        std=spec.std,
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


# What Pillow raises for bytes that are not a readable image: truncated or corrupt data
# (OSError, UnidentifiedImageError), a broken header (SyntaxError), a decompression bomb.
UNREADABLE_IMAGE = (OSError, SyntaxError, Image.DecompressionBombError)


class ImageTooLargeError(ValueError):
    """An image with more pixels than allowed, refused from its header before it is decoded."""


def open_image(data: bytes, max_pixels: int | None) -> Image.Image:
    """PIL's lazy open (the header only), refusing an image over ``max_pixels`` (width x height)
    before a pixel is decoded: a decompression bomb, or a huge scan decoded at full size on the device."""
    img = Image.open(io.BytesIO(data))
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{width} x {height} = {width * height:,} pixels, over data.max_image_pixels={max_pixels:,} "
            "(refused before decoding; raise the limit to use it)"
        )
    return img


def transform_sample(
    transform: Callable[[bytes, np.random.Generator], Any],
    data: bytes,
    rng: np.random.Generator,
    where: Callable[[], str],
) -> Any:
    """``transform(data, rng)``, where a sample that does not decode, or is too large to, raises
    :class:`CorruptSampleError` naming it (``where()``: its file, or its MDS key and shard), printed
    as one line even when it is raised in a loader worker; the same for both pipelines, which decode
    or sniff in the worker."""
    try:
        return transform(data, rng)
    except ImageTooLargeError as e:
        raise CorruptSampleError(f"{where()} is {e}") from None
    except UNREADABLE_IMAGE as e:
        why = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "(its bytes)", reason(e, None))  # PIL names the buffer
        raise CorruptSampleError(f"cannot decode {where()}: {why}") from None


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded image bytes -> RGB PIL image, exactly as timm/torchvision's folder loader does it.

    Pillow sniffs the format from the bytes, so a PNG saved under a ``.JPEG`` name decodes too;
    grayscale, CMYK and palette images become 3-channel RGB.
    """
    img = Image.open(io.BytesIO(data))
    return img.convert("RGB")


class BytesTransform:
    """``(encoded image bytes, rng) -> uint8 CHW tensor``: the timm transform of ``spec``
    (:func:`build_transform`) with every random draw taken from ``rng``
    (:func:`~usi_composer.data.draws.sample_rng` of the sample's seed, epoch and index), so a sample's
    view is a pure function of those. Images over ``spec.max_image_pixels`` are refused from their
    header (:func:`open_image`). The eval transform (``training=False``) ignores ``rng`` and ``fast``.

    Training: the crop box, interpolation, flip and RandAugment ops are drawn by
    :func:`~usi_composer.data.draws.draw_sample` (timm's distributions) from the image header,
    before any pixel is decoded. With ``fast=True`` (the default) the JPEG is then decoded at
    the smallest DCT scale (1/2, 1/4, 1/8, PIL ``draft``) at which the box still has at least the
    output resolution in both directions, and crop + resize happen in one ``Image.resize(box=...)``
    call; ``fast=False`` decodes at full size and crops + resizes with torchvision's
    ``resized_crop``, timm's own call. Then flip, RandAugment (timm's PIL ops, ``apply_pil``) and
    the conversion to a uint8 tensor (timm's ``use_prefetcher`` output).

    Eval: a full-size decode (:func:`decode_rgb`), then timm's eval transform unchanged, so the pixels
    are those of timm's eval of an export (``create_transform(**resolve_data_config(model=m))``) at any
    size: the numbers users compare. A reduced-size decode changes them (at 64 px, by up to 13/255).

    timm has no transform that starts from undecoded bytes or takes a generator, hence this class.
    """

    def __init__(self, spec: TransformSpec, training: bool, *, fast: bool = True) -> None:
        self.spec, self.training, self.fast = spec, training, fast
        if not training:
            self.eval_transform = build_transform(spec, False)

    def __call__(self, data: bytes, rng: np.random.Generator) -> torch.Tensor:
        spec = self.spec
        img = open_image(data, spec.max_image_pixels)
        if not self.training:
            return self.eval_transform(_rgb(img))  # full size: timm's pixels (the class doc)
        draws = draw_sample(rng, img.size, spec)
        img = self.resized_crop(img, draws.crop, draws.interpolation)
        if draws.flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if draws.randaugment is not None:
            assert spec.randaugment is not None
            # timm gives RandAugment the transform's interpolation ('random': its own draw per op;
            # here the sample's drawn one)
            img = apply_pil(img, draws.randaugment, spec.randaugment, fill=spec.fill, interpolation=draws.interpolation)
        return pil_to_tensor(img)

    def resized_crop(self, img: Image.Image, box: tuple[int, int, int, int], interpolation: str) -> Image.Image:
        """``img`` (opened, not yet decoded) cropped to ``box`` = (top, left, height, width) in full-size
        pixels and resized to the output size, as RGB (see the class doc for ``fast``)."""
        top, left, height, width = box
        size = self.spec.image_size
        if not self.fast:
            mode = InterpolationMode(interpolation)
            return resized_crop(img.convert("RGB"), top, left, height, width, [size, size], mode)
        full_w, full_h = img.size
        if img.format == "JPEG":
            # Smallest decode at which the crop box keeps >= size x size pixels.
            img.draft(None, (math.ceil(full_w * size / width), math.ceil(full_h * size / height)))
        sx, sy = img.size[0] / full_w, img.size[1] / full_h
        scaled_box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
        if img.mode != "L":  # grayscale resamples as one channel and becomes RGB after (the same result)
            img = _rgb(img)
        resample = pil_modes_mapping[InterpolationMode(interpolation)]
        out = img.resize((size, size), resample, box=scaled_box, reducing_gap=REDUCING_GAP)
        return _rgb(out)

    def __repr__(self) -> str:
        return f"BytesTransform(training={self.training}, fast={self.fast}, {self.spec})"


def _rgb(img: Image.Image) -> Image.Image:
    """``img.convert("RGB")`` without its copy of an image that is RGB already (~1 ms a decoded image)."""
    return img if img.mode == "RGB" else img.convert("RGB")
