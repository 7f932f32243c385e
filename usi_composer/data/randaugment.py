"""timm's RandAugment (``rand-m7-mstd0.5-inc1`` for USI) with its random draws separated from their application.

timm's ``RandAugment`` draws from the process-global ``random``/``np.random`` while it transforms an
image. Here the draws are a plain array (:func:`draw_randaugment`, from a ``np.random.Generator`` the
caller keys by seed/epoch/sample), and the same draws can be applied two ways:

* :func:`apply_pil`: one PIL image, with timm's own op functions (the CPU pipeline);
* :func:`apply_batch`: a uint8 image batch on any device, all samples at once (the GPU pipeline).

The draw distribution is timm's: ``num_ops`` ops chosen uniformly with replacement, each applied with
probability ``prob``, its magnitude ``gauss(magnitude, magnitude_std)`` clipped to
``[0, magnitude_max]``, and a random sign for the ops timm negates at random.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import LEVEL_TO_ARG, NAME_TO_OP, rand_augment_transform
from timm.data.transforms import str_to_pil_interp

__all__ = ["DRAW_COLUMNS", "RAND_OPS", "RandAugmentSpec", "apply_batch", "apply_pil", "draw_randaugment"]

# timm's level scale: a magnitude m maps to the fraction m / 10 of each op's range.
_LEVEL_DENOM = 10.0
# timm's TranslateXRel/YRel range (its ``translate_pct`` hparam, which create_transform leaves at 0.45).
_TRANSLATE_PCT = 0.45


def _timm_rand_augment(config_str: str):
    """timm's own RandAugment for ``config_str``: the spec is read from it, so it is parsed as timm parses it."""
    if config_str.split("-")[0] != "rand":
        raise ValueError(f"not a timm RandAugment config (must start with 'rand'): {config_str!r}")
    try:
        return rand_augment_transform(config_str, {})
    except (AssertionError, KeyError, ValueError) as err:
        raise ValueError(f"not a timm RandAugment config: {config_str!r} ({err})") from err


# timm's increasing-severity op set (``_RAND_INCREASING_TRANSFORMS``), in timm's order.
RAND_OPS: tuple[str, ...] = tuple(op.name for op in _timm_rand_augment("rand-inc1").ops)

# One row per op slot: (index into spec.ops, or -1 when the slot is skipped by ``prob``;
# magnitude after the noise and clip; sign +1/-1 for the ops timm negates at random).
DRAW_COLUMNS = 3

_LUT_OPS = frozenset(
    {"AutoContrast", "Equalize", "Invert", "Posterize", "PosterizeIncreasing", "Solarize", "SolarizeIncreasing"}
    | {"SolarizeAdd", "Contrast", "ContrastIncreasing", "Brightness", "BrightnessIncreasing"}
)
_BLEND_OPS = frozenset({"Color", "ColorIncreasing", "Sharpness", "SharpnessIncreasing"})
_AFFINE_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
_SUPPORTED_OPS = _LUT_OPS | _BLEND_OPS | _AFFINE_OPS


@dataclass(frozen=True)
class RandAugmentSpec:
    """What the draws and the ops need from a timm RandAugment config string (:meth:`parse`; USI's
    is ``data.auto_augment``'s default, stated there alone)."""

    num_ops: int
    magnitude: float
    magnitude_std: float  # inf: uniform in [0, magnitude], as timm's mstd > 100
    magnitude_max: float
    prob: float
    ops: tuple[str, ...]

    @classmethod
    def parse(cls, config_str: str) -> RandAugmentSpec:
        """timm's config string (``"rand-m7-mstd0.5-inc1"``); ValueError for what timm rejects or we do not batch."""
        ra = _timm_rand_augment(config_str)
        if ra.choice_weights is not None:
            raise ValueError(f"{config_str!r}: weighted op choice (timm's 't' section) is not supported")
        names = tuple(op.name for op in ra.ops)
        unsupported = sorted(set(names) - _SUPPORTED_OPS)
        if unsupported:
            raise ValueError(f"{config_str!r}: ops {unsupported} are not supported")
        first = ra.ops[0]
        return cls(
            num_ops=int(ra.num_layers),
            magnitude=float(first.magnitude),
            magnitude_std=float(first.magnitude_std),
            magnitude_max=float(first.magnitude_max or _LEVEL_DENOM),  # timm: ``magnitude_max or 10``
            prob=float(first.prob),
            ops=names,
        )


def draw_randaugment(rng: np.random.Generator, spec: RandAugmentSpec) -> np.ndarray:
    """One image's RandAugment draws: float32 ``[spec.num_ops, DRAW_COLUMNS]`` (see ``DRAW_COLUMNS``).

    The same distribution as timm's ``RandAugment`` + ``AugmentOp``: ops uniformly with replacement,
    skipped when ``u > prob`` (never when ``prob >= 1``), magnitude ``gauss(m, std)`` (uniform(0, m) for
    an infinite std) clipped to ``[0, magnitude_max]``, sign -1 when ``u > 0.5``.
    """
    n = spec.num_ops
    ops = rng.integers(0, len(spec.ops), size=n)
    skipped = rng.random(n) > spec.prob if spec.prob < 1.0 else np.zeros(n, dtype=bool)
    if math.isinf(spec.magnitude_std):
        magnitude = rng.uniform(0.0, spec.magnitude, size=n)
    elif spec.magnitude_std > 0:
        magnitude = rng.normal(spec.magnitude, spec.magnitude_std, size=n)
    else:
        magnitude = np.full(n, spec.magnitude)
    magnitude = np.clip(magnitude, 0.0, spec.magnitude_max)
    sign = np.where(rng.random(n) > 0.5, -1.0, 1.0)
    return np.stack([np.where(skipped, -1, ops), magnitude, sign], axis=1).astype(np.float32)


# --------------------------------------------------------------------------- level -> op argument
#
# timm's ``LEVEL_TO_ARG`` (timm/data/auto_augment.py) maps an op's magnitude ("level") to its
# argument. For the ops it negates at random, its maps call ``_randomly_negate`` (a draw from the
# global ``random``) inside, so those maps are written here, timm's arithmetic in its order, with OUR
# drawn sign: ``_SIGNED_LEVEL_TO_ARG``, on Python floats (apply_pil) and float64 tensors (apply_batch).
# ``_TENSOR_LEVEL_TO_ARG`` is timm's map of every other op, on float64 tensors for apply_batch
# (``trunc`` for timm's ``int()``: the same integers); apply_pil uses timm's own ``LEVEL_TO_ARG``.


def _negated(scale: float) -> Callable:
    """timm's ``_rotate``/``_shear``/``_translate_rel_level_to_arg``: ``(level / 10) * scale``, signed."""
    return lambda level, sign: sign * ((level / _LEVEL_DENOM) * scale)


def _enhance_increasing(level, sign):
    """timm's ``_enhance_increasing_level_to_arg``: the no-change factor 1.0 +- up to 0.9, kept >= 0.1."""
    factor = 1.0 + sign * ((level / _LEVEL_DENOM) * 0.9)
    return factor.clamp(min=0.1) if isinstance(factor, torch.Tensor) else max(0.1, factor)


def _enhance_level(level: torch.Tensor) -> torch.Tensor:
    """timm's ``_enhance_level_to_arg``: a factor in [0.1, 1.9]."""
    return (level / _LEVEL_DENOM) * 1.8 + 0.1


def _posterize(level: torch.Tensor) -> torch.Tensor:
    """timm's ``_posterize_level_to_arg``: bits to keep, 0..4."""
    return torch.trunc((level / _LEVEL_DENOM) * 4)


def _solarize(level: torch.Tensor) -> torch.Tensor:
    """timm's ``_solarize_level_to_arg``: the threshold, 0..256."""
    return torch.trunc((level / _LEVEL_DENOM) * 256).clamp(max=256)


_SIGNED_LEVEL_TO_ARG: dict[str, Callable] = {
    "Rotate": _negated(30.0),  # degrees
    "ShearX": _negated(0.3),
    "ShearY": _negated(0.3),
    "TranslateXRel": _negated(_TRANSLATE_PCT),  # fraction of the image size
    "TranslateYRel": _negated(_TRANSLATE_PCT),
    "ColorIncreasing": _enhance_increasing,
    "ContrastIncreasing": _enhance_increasing,
    "BrightnessIncreasing": _enhance_increasing,
    "SharpnessIncreasing": _enhance_increasing,
}
_TENSOR_LEVEL_TO_ARG: dict[str, Callable[[torch.Tensor], torch.Tensor] | None] = {
    "AutoContrast": None,  # no argument
    "Equalize": None,
    "Invert": None,
    "Posterize": _posterize,
    "PosterizeIncreasing": lambda level: 4 - _posterize(level),
    "Solarize": _solarize,
    "SolarizeIncreasing": lambda level: 256 - _solarize(level),
    "SolarizeAdd": lambda level: torch.trunc((level / _LEVEL_DENOM) * 110).clamp(max=128),
    "Color": _enhance_level,
    "Contrast": _enhance_level,
    "Brightness": _enhance_level,
    "Sharpness": _enhance_level,
}


def _batch_level_to_arg(name: str, level: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """The op's argument for a float64 batch of levels and signs (the level itself for an op without one)."""
    if name in _SIGNED_LEVEL_TO_ARG:
        return _SIGNED_LEVEL_TO_ARG[name](level, sign)
    level_to_arg = _TENSOR_LEVEL_TO_ARG[name]
    return level if level_to_arg is None else level_to_arg(level)


# --------------------------------------------------------------------------- PIL (CPU pipeline)


def apply_pil(
    img: Image.Image,
    draws: np.ndarray,
    spec: RandAugmentSpec,
    *,
    fill: tuple[int, int, int],
    interpolation: str = "bicubic",
) -> Image.Image:
    """Apply one image's draws with timm's own op functions (``NAME_TO_OP``) and level maps.

    ``fill`` is timm's ``img_mean`` (0..255 ints), ``interpolation`` the geometric ops' resample
    (timm: the transform's interpolation; for timm's ``'random'`` pass the one drawn for the sample).
    """
    resample = str_to_pil_interp(interpolation)
    for op_index, level, sign in np.asarray(draws, dtype=np.float64):
        if op_index < 0:
            continue
        name = spec.ops[int(op_index)]
        if name in _SIGNED_LEVEL_TO_ARG:
            args: tuple = (_SIGNED_LEVEL_TO_ARG[name](float(level), float(sign)),)
        elif LEVEL_TO_ARG[name] is not None:
            args = LEVEL_TO_ARG[name](float(level), {})
        else:
            args = ()
        img = NAME_TO_OP[name](img, *args, fillcolor=tuple(fill), resample=resample)
    return img


# --------------------------------------------------------------------------- batched (GPU pipeline)
#
# Each sample draws at most one op per slot, so a slot is three passes, one per op family, each with
# per-sample parameters (the identity for the samples that drew another family), merged per sample:
#
# * per-channel lookup tables (AutoContrast, Equalize, Invert, Posterize, Solarize, SolarizeAdd,
#   Contrast, Brightness): every one of these maps each channel's value through a 256-entry table
#   (PIL computes them that way too; Contrast's and Brightness' blends have a constant degenerate
#   image), so together they cost one gather;
# * blends with a per-pixel degenerate image (Color: PIL's 'L' gray; Sharpness: PIL's SMOOTH filter);
# * one affine_grid/grid_sample for Rotate, ShearX/Y and TranslateX/YRel, with per-sample matrices.
#
# On CUDA each pass covers the whole batch and torch.where keeps the samples that drew the family.
# index_select of just those samples would need their count on the host (nonzero, .item()), which
# stalls the host until the GPU has run everything queued before it (the GPU then idles while the
# host refills its queue), every slot of every batch. A full-batch pass is memory-bound (256x3x224x224
# float32 is 154 MB: ~0.1 ms at an H100's ~3 TB/s, an estimate), so three passes per slot cost
# little, and the cost does not grow with the number of ops. On the CPU reading the mask is free, so
# each pass runs only on the samples that drew its family (index_select + index_copy).


def _pil_blend(degenerate: torch.Tensor, image: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, image, factor)`` (ImageEnhance): float32, clipped, truncated."""
    return (degenerate + factor * (image - degenerate)).clamp(0, 255).trunc()


def _histogram(index: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel 256-bin histograms [B * 3, 256] (int64) of the values ``index`` [B * 3, H * W]."""
    counts = torch.zeros(index.shape[0], 256, dtype=torch.int64, device=index.device)
    return counts.scatter_add_(1, index, torch.ones((), dtype=torch.int64, device=index.device).expand_as(index))


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> 'L' conversion (ITU-R 601-2 luma in 16-bit fixed point), [B, 1, H, W] int32."""
    xi = x.int()
    return (xi[:, 0:1] * 19595 + xi[:, 1:2] * 38470 + xi[:, 2:3] * 7471 + 0x8000) >> 16


def _smooth(xf: torch.Tensor) -> torch.Tensor:
    """PIL's ImageFilter.SMOOTH (3x3, centre 5, others 1, /13, rounded; border pixels kept) on float32.

    Shifted adds rather than conv2d: the sums are exact integers, which a TF32 convolution is not.
    """
    rows = xf[..., :-2] + xf[..., 1:-1] + xf[..., 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    inner = torch.floor((box + 4 * xf[..., 1:-1, 1:-1]) / 13 + 0.5)
    out = xf.clone()
    out[..., 1:-1, 1:-1] = inner
    return out


def _autocontrast_lut(hist: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast (no cutoff): each channel's [lo, hi] stretched to [0, 255]; identity if flat."""
    present = hist > 0
    lo = present.int().argmax(-1, keepdim=True)
    hi = 255 - present.flip(-1).int().argmax(-1, keepdim=True)
    span = (hi - lo).clamp(min=1).double()
    scale = torch.full_like(span, 255.0) / span  # not `255.0 / span`: torch computes that as 255 * (1 / span)
    lut = torch.trunc(i * scale + (-lo * scale)).clamp(0, 255).long()
    return torch.where(hi > lo, lut, i)


def _equalize_lut(hist: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """ImageOps.equalize per channel: the cumulative histogram in steps of (all but the last used bin) // 255."""
    present = hist > 0
    last = 255 - present.flip(-1).int().argmax(-1, keepdim=True)
    step = (hist.sum(-1, keepdim=True) - hist.gather(-1, last)) // 255
    before = hist.cumsum(-1) - hist  # pixels below each value
    lut = ((step // 2 + before) // step.clamp(min=1)).clamp(max=255)  # PIL's point() clips the table
    identity = (present.sum(-1, keepdim=True) <= 1) | (step == 0)
    return torch.where(identity, i, lut)


def _lut(name: str, arg: torch.Tensor, i: torch.Tensor, hist, gray_mean) -> torch.Tensor:
    """The op's lookup table, broadcastable to [B, 3, 256] (int64); ``arg`` [B] float64 from the level map."""
    a = arg.view(-1, 1, 1)
    if name == "AutoContrast":
        return _autocontrast_lut(hist, i)
    if name == "Equalize":
        return _equalize_lut(hist, i)
    if name == "Invert":
        return 255 - i
    if name.startswith("Posterize"):  # keep the top `bits` bits (none when bits <= 0, all when >= 8)
        shift = (8 - a).clamp(0, 9).long()
        return (i >> shift) << shift
    if name.startswith("Solarize") and name != "SolarizeAdd":
        return torch.where(i < a, i, 255 - i)
    if name == "SolarizeAdd":  # timm: threshold 128
        return torch.where(i < 128, (i + a.long()).clamp(max=255), i)
    factor = a.float()
    if name.startswith("Brightness"):  # blend with black
        return _pil_blend(torch.zeros((), device=i.device), i.float(), factor).long()
    # Contrast: blend with the mean of the 'L' image, as an int (ImageEnhance.Contrast)
    mean = gray_mean.view(-1, 1, 1).float()
    return _pil_blend(mean, i.float(), factor).long()


def _affine_data(name: str, arg: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """PIL's affine ``data`` (a, b, c, d, e, f: output pixel centre -> input point), [B, 6] float64."""
    one, zero = torch.ones_like(arg), torch.zeros_like(arg)
    if name == "ShearX":
        return torch.stack([one, arg, zero, zero, one, zero], 1)
    if name == "ShearY":
        return torch.stack([one, zero, zero, arg, one, zero], 1)
    if name == "TranslateXRel":
        return torch.stack([one, zero, arg * width, zero, one, zero], 1)
    if name == "TranslateYRel":
        return torch.stack([one, zero, zero, zero, one, arg * height], 1)
    # Rotate: Image.rotate(degrees) about (w / 2, h / 2), Pillow's matrix and rounding
    angle = -torch.remainder(arg, 360.0) * (math.pi / 180.0)
    cos, sin = torch.round(torch.cos(angle), decimals=15), torch.round(torch.sin(angle), decimals=15)
    cx, cy = width / 2.0, height / 2.0
    return torch.stack([cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy], 1)


def _theta(data: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """PIL affine data (pixel coordinates, pixel centres at i + 0.5) -> affine_grid's theta (align_corners=False)."""
    a, b, c, d, e, f = data.unbind(1)
    b_, d_ = b * (height / width), d * (width / height)
    row_x = torch.stack([a, b_, a + b_ + 2 * c / width - 1], 1)
    row_y = torch.stack([d_, e, d_ + e + 2 * f / height - 1], 1)
    return torch.stack([row_x, row_y], 1)


def _warp(xf: torch.Tensor, theta: torch.Tensor, fill: torch.Tensor, interpolation: str) -> torch.Tensor:
    """PIL's ``Image.transform(AFFINE)``: taps clamped at the border, points outside the image get ``fill``.

    PIL truncates the interpolated value to uint8; the small margin keeps exact pixel hits (float32
    grid coordinates land a hair off the pixel centre PIL hits exactly) from truncating one level down.
    """
    grid = F.affine_grid(theta.float(), list(xf.shape), align_corners=False)
    out = F.grid_sample(xf, grid, mode=interpolation, padding_mode="border", align_corners=False)
    inside = ((grid >= -1) & (grid < 1)).all(-1).unsqueeze(1)
    return torch.where(inside, out, fill).clamp(0, 255).add(1e-3).trunc()


# Devices where a family runs only on the samples that drew it (see the section comment).
_SUBSET_DEVICES = ("cpu",)


def _rows(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The given samples of ``t`` (all of them for None)."""
    return t if rows is None else t.index_select(0, rows)


def _update(
    out: torch.Tensor, drew: torch.Tensor, compute: Callable[[torch.Tensor | None], torch.Tensor]
) -> torch.Tensor:
    """``out`` with the samples that drew an op family replaced by ``compute``'s output for them."""
    if out.device.type in _SUBSET_DEVICES:
        rows = drew.nonzero().squeeze(1)
        return out.index_copy(0, rows, compute(rows)) if len(rows) else out
    return torch.where(drew.view(-1, 1, 1, 1), compute(None), out)


def _device_vector(values: Sequence[float], device: torch.device) -> torch.Tensor:
    """A small float32 vector built on the device from Python numbers (a host tensor's copy would sync)."""
    out = torch.empty(len(values), dtype=torch.float32, device=device)
    for k, v in enumerate(values):
        out[k] = float(v)
    return out


def apply_batch(
    images: torch.Tensor,
    draws: torch.Tensor,
    spec: RandAugmentSpec,
    *,
    fill: Sequence[float],
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Apply per-sample draws (float32 ``[B, num_ops, DRAW_COLUMNS]``) to a uint8 ``[B, 3, H, W]`` batch.

    Any device, contiguous or channels-last (the output keeps the input's layout); no host syncs.
    ``fill`` is timm's ``img_mean`` (0..255), ``interpolation`` the geometric ops' ('bicubic' for USI;
    'bilinear', 'nearest'). The ops are PIL's/timm's computed on tensors; see the section comment.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 [B, 3, H, W] images, got {images.dtype} {tuple(images.shape)}")
    if draws.shape != (images.shape[0], spec.num_ops, DRAW_COLUMNS):
        raise ValueError(
            f"expected draws of shape {(images.shape[0], spec.num_ops, DRAW_COLUMNS)}, got {tuple(draws.shape)}"
        )
    if interpolation not in ("bicubic", "bilinear", "nearest"):
        raise ValueError(f"interpolation must be bicubic, bilinear or nearest, got {interpolation!r}")
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    x = images.contiguous()
    fill_t = _device_vector(fill, x.device).view(1, 3, 1, 1)
    for slot in range(spec.num_ops):
        x = _apply_slot(x, draws[:, slot], spec, fill_t, interpolation)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class _SlotDraws:
    """One op slot's per-sample parameters, family by family (the identity for the samples that drew
    another op or none)."""

    tables: list[tuple[str, torch.Tensor, torch.Tensor]]  # (op, drew, arg) of the lookup-table ops
    remapped: torch.Tensor  # [B] bool: drew a lookup-table op
    blended: torch.Tensor  # drew a blend op (Color, Sharpness) ...
    use_gray: torch.Tensor  # ... towards grayscale (Color) rather than the smoothed image
    factor: torch.Tensor  # the blend factor
    warped: torch.Tensor  # drew an affine op
    data: torch.Tensor  # [B, 6] the affine matrices, in PIL's convention


def _slot_draws(x: torch.Tensor, draw: torch.Tensor, spec: RandAugmentSpec) -> _SlotDraws:
    batch, _, height, width = x.shape
    device = x.device
    op, level, sign = draw[:, 0].round().long(), draw[:, 1].double(), draw[:, 2].double()
    no = torch.zeros(batch, dtype=torch.bool, device=device)
    data = torch.zeros(batch, 6, dtype=torch.float64, device=device)
    data[:, 0] = data[:, 4] = 1.0  # identity
    slot = _SlotDraws([], no, no, no, torch.ones(batch, dtype=torch.float64, device=device), no, data)
    for k, name in enumerate(spec.ops):
        drew = op == k
        arg = _batch_level_to_arg(name, level, sign)
        if name in _LUT_OPS:
            slot.remapped = slot.remapped | drew
            slot.tables.append((name, drew, arg))
        elif name in _BLEND_OPS:
            slot.blended, slot.factor = slot.blended | drew, torch.where(drew, arg, slot.factor)
            if name.startswith("Color"):
                slot.use_gray = slot.use_gray | drew
        else:
            slot.warped = slot.warped | drew
            slot.data = torch.where(drew.view(-1, 1), _affine_data(name, arg, width, height), slot.data)
    return slot


def _apply_slot(
    x: torch.Tensor, draw: torch.Tensor, spec: RandAugmentSpec, fill: torch.Tensor, interpolation: str
) -> torch.Tensor:
    """One op slot over the batch: ``draw`` [B, 3] (op index or -1, magnitude, sign), in three passes:
    the lookup-table ops, the blends, the affine warps; each over the samples that drew it."""
    slot = _slot_draws(x, draw, spec)
    names = set(spec.ops)
    out = x
    if slot.tables:
        out = _update(out, slot.remapped, lambda rows: _remap(x, rows, slot, names))
    if names & _BLEND_OPS:
        out = _update(out, slot.blended, lambda rows: _blend_enhance(x, rows, slot, names))
    if names & _AFFINE_OPS:
        theta = _theta(slot.data, x.shape[3], x.shape[2])
        out = _update(
            out,
            slot.warped,
            lambda rows: _warp(_rows(x, rows).float(), _rows(theta, rows), fill, interpolation).to(torch.uint8),
        )
    return out


def _remap(x: torch.Tensor, rows: torch.Tensor | None, slot: _SlotDraws, names: set[str]) -> torch.Tensor:
    """The lookup-table ops of ``rows`` (None: all) of ``x``: one table per sample, then one gather."""
    xs = _rows(x, rows)
    height, width = x.shape[2:]
    index = xs.reshape(-1, height * width).long()  # pixel values as gather/scatter indices
    hist = _histogram(index).view(-1, 3, 256) if names & {"AutoContrast", "Equalize"} else None
    gray_mean = None
    if any(n.startswith("Contrast") for n in names):  # ImageEnhance.Contrast: the mean of the 'L' image, rounded
        gray_mean = torch.floor(_grayscale(xs).sum((1, 2, 3)).double() / (height * width) + 0.5)
    i = torch.arange(256, device=x.device)
    lut = i.expand(xs.shape[0], 3, 256)
    for name, drew, arg in slot.tables:
        table = _lut(name, _rows(arg, rows), i, hist, gray_mean)
        lut = torch.where(_rows(drew, rows).view(-1, 1, 1), table, lut)
    return lut.to(torch.uint8).reshape(-1, 256).gather(1, index).view_as(xs)


def _blend_enhance(x: torch.Tensor, rows: torch.Tensor | None, slot: _SlotDraws, names: set[str]) -> torch.Tensor:
    """The blend ops of ``rows``: PIL's ImageEnhance towards grayscale (Color) or the smoothed image (Sharpness)."""
    xs = _rows(x, rows)
    xf = xs.float()
    gray = _grayscale(xs).float() if any(n.startswith("Color") for n in names) else None
    smooth = _smooth(xf) if any(n.startswith("Sharpness") for n in names) else None
    if gray is None or smooth is None:
        degenerate = smooth if gray is None else gray
    else:
        degenerate = torch.where(_rows(slot.use_gray, rows).view(-1, 1, 1, 1), gray, smooth)
    return _pil_blend(degenerate, xf, _rows(slot.factor, rows).float().view(-1, 1, 1, 1)).to(torch.uint8)
