"""The ``gpu`` input pipeline (``data.pipeline: gpu``): the loader workers only read samples, the
device does the pixel work.

Worker side (:class:`EncodedSample`, one sample): parse the image header, draw the sample's random
choices (``draws.draw_sample``: crop box, flip, interpolation, RandAugment) and hand on the encoded
bytes with one float32 *draw row* (layout below). :func:`collate_encoded` makes the batch
``(EncodedImages, labels)``: the bytes stay on the host (``decode_jpeg`` reads its input from host
memory, and Composer's ``batch_to_device`` leaves non-tensor, non-sequence objects where they are).

Device side (:class:`DeviceTransform`, Composer's ``microbatch_transforms``, run after the
microbatch is on the device): one batched ``torchvision.io.decode_jpeg`` (nvJPEG on CUDA, libjpeg on
CPU tensors), crop + antialiased resize per image (sizes differ: one ``interpolate`` each), flip and
RandAugment batched, then normalization and channels-last (:class:`DeviceNormalize`).

What ``decode_jpeg`` cannot read the same way as the CPU path is decided in the worker, from the
bytes, before the batch exists (so the device never fails mid-batch and the host never waits):
CMYK/YCCK JPEGs (PIL's CMYK conversion differs from libjpeg's), PNGs and other formats under a
``.JPEG`` name, and truncated files (no end-of-image marker after the last scan) are decoded in the
worker with the CPU path's own PIL decode, and handed on as RGB pixels. A corrupt file therefore
raises, in the worker, exactly what the CPU path raises for it. ``data.gpu_decode: false`` decodes
every sample this way, a training crop at a reduced DCT size (PIL ``draft``), an evaluation image at
full size (as the CPU path and timm's eval), and leaves the rest to the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from usi_composer.data.draws import draw_sample
from usi_composer.data.randaugment import DRAW_COLUMNS, apply_batch
from usi_composer.data.spec import TransformSpec
from usi_composer.data.transforms import DeviceNormalize, decode_rgb, open_image

__all__ = [
    "DeviceTransform",
    "EncodedImages",
    "EncodedSample",
    "collate_encoded",
    "num_samples",
    "split_encoded",
]

# The draw row: what the device needs to know of each sample, as float32 (exact for integers < 2**24).
KIND = 0  # KIND_JPEG: the payload is JPEG bytes; KIND_PIXELS: RGB pixels (HWC), decoded in the worker
HEIGHT, WIDTH = 1, 2  # the payload's decoded size
SOURCE_HEIGHT, SOURCE_WIDTH = 3, 4  # the image's full size (the crop box's coordinates)
TOP, LEFT, CROP_HEIGHT, CROP_WIDTH = 5, 6, 7, 8
FLIP = 9
INTERPOLATION = 10  # index into INTERPOLATIONS
RANDAUGMENT = 11  # then num_ops x DRAW_COLUMNS RandAugment draws (training with RandAugment only)
KIND_JPEG, KIND_PIXELS = 0.0, 1.0
INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


def device_decodable(img: Image.Image, data: bytes) -> bool:
    """Whether ``decode_jpeg`` gives the CPU path's RGB for these bytes: a complete JPEG in YCbCr,
    RGB or grayscale. A JPEG's entropy-coded data escapes every 0xFF, so the last start-of-scan
    (FFDA) and end-of-image (FFD9) markers in the file are the real ones: a truncated file has no
    FFD9 after its last FFDA."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and data.rfind(b"\xff\xd9") > data.rfind(b"\xff\xda")


class EncodedSample:
    """The worker's sample transform: ``(encoded bytes, rng) -> (uint8 payload, float32 draw row)``.

    ``training``: draw the sample's view from ``spec`` (``draws.draw_sample``); else evaluation, the
    whole image, no randomness. ``spec.image_size`` sets the reduced decode size of the training samples
    decoded in the worker (the quirky ones, or all with ``decode_on_device=False``); evaluation decodes
    them at full size.
    """

    def __init__(self, spec: TransformSpec, training: bool, *, decode_on_device: bool = True) -> None:
        self.spec, self.training, self.decode_on_device = spec, training, decode_on_device
        ra = spec.randaugment if training else None
        self.row_size = RANDAUGMENT + (ra.num_ops * DRAW_COLUMNS if ra is not None else 0)

    def __call__(self, data: bytes, rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        img = open_image(data, self.spec.max_image_pixels)  # the header only; the CPU path's error for a non-image
        width, height = img.size
        row = np.zeros(self.row_size, np.float32)
        row[[SOURCE_HEIGHT, SOURCE_WIDTH]] = height, width
        if not self.training:
            row[[TOP, LEFT, CROP_HEIGHT, CROP_WIDTH]] = 0, 0, height, width
        else:
            if rng is None:
                raise TypeError("the training transform needs the sample's rng: transform(data, rng)")
            draws = draw_sample(rng, (width, height), self.spec)
            row[[TOP, LEFT, CROP_HEIGHT, CROP_WIDTH]] = draws.crop
            row[FLIP] = draws.flip
            row[INTERPOLATION] = INTERPOLATIONS.index(draws.interpolation)
            if draws.randaugment is not None:
                row[RANDAUGMENT:] = draws.randaugment.reshape(-1)
        if self.decode_on_device and device_decodable(img, data):
            payload = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            row[[KIND, HEIGHT, WIDTH]] = KIND_JPEG, height, width
        else:
            pixels = self._decode(img, row)
            payload = torch.from_numpy(pixels.reshape(-1))
            row[[KIND, HEIGHT, WIDTH]] = KIND_PIXELS, pixels.shape[0], pixels.shape[1]
        return payload, torch.from_numpy(row)

    def _decode(self, img: Image.Image, row: np.ndarray) -> np.ndarray:
        """The CPU path's PIL decode (``decode_rgb``'s conversion); for a training crop at a reduced JPEG
        size (DCT scaling, PIL ``draft``) that keeps both sides of the crop box >= twice the output: the
        device crops whole pixels of the reduced image, and at 2x the rounded box is off by <= 1/4 output
        pixel. Evaluation decodes at full size, as the CPU path and timm's eval do."""
        if img.format == "JPEG" and self.training:
            scale = 2 * self.spec.image_size / row[[CROP_WIDTH, CROP_HEIGHT]]
            img.draft(None, (math.ceil(img.size[0] * scale[0]), math.ceil(img.size[1] * scale[1])))
        return np.array(img.convert("RGB"))  # HWC uint8; raises the CPU path's error for a corrupt file

    def __repr__(self) -> str:
        return f"EncodedSample(training={self.training}, decode_on_device={self.decode_on_device}, {self.spec})"


class EncodedImages:
    """A (micro)batch's payloads and draw rows, on the host.

    Deliberately not a sequence: Composer's ``batch_to_device`` moves the tensors of sequences
    and mappings to the device, and ``decode_jpeg`` wants its input in host memory.
    """

    def __init__(self, payloads: list[torch.Tensor], rows: torch.Tensor) -> None:
        self.payloads, self.rows = payloads, rows

    def __len__(self) -> int:
        return len(self.payloads)

    def __getitem__(self, index: slice) -> EncodedImages:
        return EncodedImages(self.payloads[index], self.rows[index])

    def pin_memory(self) -> EncodedImages:
        """The DataLoader's pin-memory thread: page-locked draw rows and pixel payloads copy to the
        device asynchronously; JPEG bytes are read by the host (nvJPEG's Huffman stage), not copied."""
        kinds = self.rows[:, KIND].tolist()
        payloads = [p.pin_memory() if k == KIND_PIXELS else p for p, k in zip(self.payloads, kinds, strict=True)]
        return EncodedImages(payloads, self.rows.pin_memory())


def collate_encoded(samples: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], int]]) -> tuple[EncodedImages, Any]:
    """The loader's ``collate_fn`` for :class:`EncodedSample` outputs: ``(EncodedImages, labels)``."""
    payloads = [payload for (payload, _), _ in samples]
    rows = torch.stack([row for (_, row), _ in samples])
    return EncodedImages(payloads, rows), torch.tensor([label for _, label in samples])


def split_encoded(batch: tuple[EncodedImages, torch.Tensor], microbatch_size: int) -> list[tuple[Any, Any]]:
    """``DataSpec(split_batch=...)``: microbatches of ``(EncodedImages, labels)``."""
    images, labels = batch
    return [
        (images[start : start + microbatch_size], labels[start : start + microbatch_size])
        for start in range(0, len(labels), microbatch_size)
    ]


def num_samples(batch: tuple[Any, Any]) -> int:
    """``DataSpec(get_num_samples_in_batch=...)``: the batch's length, read from the host labels."""
    return len(batch[1])


class DeviceTransform:
    """``(EncodedImages, labels)`` -> ``(normalized float images [B,3,S,S], labels)`` on the labels' device.

    Training: crop the drawn box, resize to ``spec.image_size`` (antialiased, the drawn interpolation),
    flip, RandAugment (``randaugment.apply_batch``), normalize. Evaluation (``training=False``): resize
    the short side to ``spec.eval_size`` with ``spec.fixed_interpolation`` and center-crop
    ``image_size`` (timm's eval).
    The pixels are rounded to uint8 after each resize, as the CPU path's PIL images are.
    """

    def __init__(self, spec: TransformSpec, training: bool, *, channels_last: bool = False) -> None:
        self.spec, self.training = spec, training
        self.normalize = DeviceNormalize(spec.mean, spec.std, channels_last=channels_last)

    def __call__(self, batch: tuple[EncodedImages, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded, labels = batch
        device = labels.device
        rows = encoded.rows.tolist()  # host values: the geometry of each image, no device sync
        images = decode_images(encoded.payloads, rows, device)
        if not self.training:
            return self.normalize((self._resize_center_crop(images), labels))
        spec = self.spec
        size = spec.image_size
        out = torch.empty(len(images), 3, size, size, device=device)
        for i, (image, row) in enumerate(zip(images, rows, strict=True)):
            # The box is in full-size pixels; a payload decoded at reduced size maps it to its own.
            sy, sx = image.shape[1] / row[SOURCE_HEIGHT], image.shape[2] / row[SOURCE_WIDTH]
            top, left = round(row[TOP] * sy), round(row[LEFT] * sx)
            height, width = max(1, round(row[CROP_HEIGHT] * sy)), max(1, round(row[CROP_WIDTH] * sx))
            crop = image[:, top : top + height, left : left + width]
            out[i] = _resize(crop, (size, size), INTERPOLATIONS[int(row[INTERPOLATION])])
        x = _to_uint8(out)
        draws = encoded.rows.to(device, non_blocking=True)
        x = torch.where(draws[:, FLIP, None, None, None] > 0.5, x.flip(-1), x)
        if spec.randaugment is not None:
            ra = draws[:, RANDAUGMENT:].reshape(len(images), spec.randaugment.num_ops, DRAW_COLUMNS)
            # one interpolation for the batch's geometric ops (the CPU path: each sample's drawn one)
            x = apply_batch(x, ra, spec.randaugment, fill=spec.fill, interpolation=spec.fixed_interpolation)
        return self.normalize((x, labels))

    def _resize_center_crop(self, images: list[torch.Tensor]) -> torch.Tensor:
        size, eval_size, out = self.spec.image_size, self.spec.eval_size, []
        for image in images:
            h, w = image.shape[1:]
            # torchvision's Resize(int): the short side to eval_size, the long side truncated
            new_h, new_w = (eval_size, int(eval_size * w / h)) if h <= w else (int(eval_size * h / w), eval_size)
            top, left = round((new_h - size) / 2.0), round((new_w - size) / 2.0)  # CenterCrop's rounding
            resized = _resize(image, (new_h, new_w), self.spec.fixed_interpolation)
            out.append(resized[:, top : top + size, left : left + size])
        return _to_uint8(torch.stack(out))

    def __repr__(self) -> str:
        return f"DeviceTransform(training={self.training}, {self.normalize}, {self.spec})"


def decode_images(payloads: list[torch.Tensor], rows: list[list[float]], device: torch.device) -> list[torch.Tensor]:
    """uint8 [3,H,W] images on ``device``: the JPEGs in one ``decode_jpeg`` call, pixels copied."""
    images: list[torch.Tensor | None] = [None] * len(payloads)
    jpegs = [i for i, row in enumerate(rows) if row[KIND] == KIND_JPEG]
    if jpegs:
        _drain_for_nvjpeg(device)
        try:
            decoded = decode_jpeg([payloads[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one the worker's checks let through: find it, decode it as the CPU path does
            decoded = [_decode_one(payloads[i], device) for i in jpegs]
        for i, image in zip(jpegs, decoded, strict=True):
            images[i] = image
    for i, row in enumerate(rows):
        if row[KIND] == KIND_PIXELS:
            pixels = payloads[i].view(int(row[HEIGHT]), int(row[WIDTH]), 3)
            images[i] = pixels.to(device, non_blocking=True).permute(2, 0, 1)
    return images  # type: ignore[return-value]


def _drain_for_nvjpeg(device: torch.device) -> None:
    """Wait for the work queued on ``device``'s current stream before a CUDA ``decode_jpeg``.

    torchvision's nvJPEG decode (batched since 0.19; unchanged through at least 0.28) allocates
    its outputs on the caller's stream but writes them from a private stream that never waits for
    the caller's, so it can overwrite memory that kernels still queued on the caller's stream read
    or write (the allocator hands out a block freed by Python at once): pytorch/vision#9606,
    reproduced on H100s. The wait costs nothing in Composer's training and eval loops, which read
    a device value just before each batch (Composer 0.32.1, ``Trainer._iter_dataloader``); it
    matters where kernels are still queued: a second microbatch, a loop without host reads
    (``BestOfEMAAndRaw``'s evaluation of the raw weights, a benchmark's).
    """
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _decode_one(payload: torch.Tensor, device: torch.device) -> torch.Tensor:
    try:
        _drain_for_nvjpeg(device)
        return decode_jpeg(payload, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # the CPU path's decode: its image, or its error
        pixels = np.array(decode_rgb(payload.numpy().tobytes()))
        return torch.from_numpy(pixels).to(device).permute(2, 0, 1)


def _resize(image: torch.Tensor, size: tuple[int, int], interpolation: str) -> torch.Tensor:
    """uint8 [3,h,w] -> float [3,*size]; antialiased as PIL's resize (torch's antialias follows PIL)."""
    x = image[None].float()
    if interpolation == "nearest":
        return F.interpolate(x, size=size, mode="nearest-exact")[0]
    return F.interpolate(x, size=size, mode=interpolation, align_corners=False, antialias=True)[0]


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    return x.round_().clamp_(0, 255).to(torch.uint8)
