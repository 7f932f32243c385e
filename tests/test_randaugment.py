"""The batched RandAugment against timm's: each op's pixels, apply_pil's composition, the draw distribution."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats  # scipy comes with scikit-learn, a dependency
from timm.data import auto_augment as timm_aa
from timm.data.auto_augment import AugmentOp, RandAugment
from timm.data.transforms import str_to_pil_interp

from usi_composer.config import DataConfig
from usi_composer.data import randaugment
from usi_composer.data.randaugment import (
    DRAW_COLUMNS,
    RAND_OPS,
    RandAugmentSpec,
    apply_batch,
    apply_pil,
    draw_randaugment,
)
from usi_composer.data.spec import TransformSpec
from usi_composer.data.transforms import build_transform

SIZE = 64
TRANSFORM = TransformSpec.from_data(DataConfig(image_size=SIZE))  # USI's, timm's ImageNet mean
FILL = TRANSFORM.fill  # timm's img_mean (test_apply_pil_is_timm_randaugment checks it against timm's)
USI = RandAugmentSpec.parse(DataConfig().auto_augment)  # the recipe's default, rand-m7-mstd0.5-inc1
# The ops of both timm op sets (inc1 and the original inc0); the tests run them all.
ALL_OPS = tuple(dict.fromkeys(RAND_OPS + RandAugmentSpec.parse("rand-inc0").ops))
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"} | {
    n for n in ALL_OPS if n.endswith("Increasing") and not n.startswith(("Posterize", "Solarize"))
}
GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}

# Mean |apply_batch - timm's PIL op| (0..255 scale) over 4 real 64 px images x 3 magnitudes x both signs,
# bound = a bit above the measured value (in the comment).
# Color ops compute what PIL computes (the same integer / float32 arithmetic): measured 0 for all.
# Geometric ops: grid_sample's bicubic is Keys' a=-0.75 where PIL's transform uses a=-1 (edges differ
# by a few levels); its bilinear is PIL's kernel (left: float32 vs float64 coordinates).
COLOR_BOUND = 0.001
GEOMETRIC_BOUND = {
    ("Rotate", "bicubic"): 0.8,  # 0.652
    ("ShearX", "bicubic"): 0.5,  # 0.399
    ("ShearY", "bicubic"): 0.5,  # 0.416
    ("TranslateXRel", "bicubic"): 0.5,  # 0.419
    ("TranslateYRel", "bicubic"): 0.5,  # 0.429
    ("Rotate", "bilinear"): 0.005,  # 0.0010
    ("ShearX", "bilinear"): 0.005,  # 0.0004
    ("ShearY", "bilinear"): 0.005,  # 0.0004
    ("TranslateXRel", "bilinear"): 0.02,  # 0.0098
    ("TranslateYRel", "bilinear"): 0.02,  # 0.0103
}
MAGNITUDES = (1.5, 5.0, 9.5)


@pytest.fixture(scope="module")
def images(imagenet_sample) -> list[Image.Image]:
    """Four real ImageNet photos of different classes, resized to SIZE x SIZE."""
    classes = sorted(p for p in imagenet_sample.iterdir() if p.is_dir())[::250]
    return [
        Image.open(next(c.iterdir())).convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC) for c in classes
    ]


def to_batch(imgs: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in imgs])


class ScriptedRandom:
    """Stands in for the ``random`` module inside timm's auto_augment: returns scripted values, in order."""

    def __init__(self, values=()) -> None:
        self.values = deque(values)

    def random(self) -> float:
        return self.values.popleft()

    def gauss(self, mu: float, sigma: float) -> float:
        return self.values.popleft()


def timm_op(name: str, level: float, sign: float, img: Image.Image, interpolation: str, monkeypatch) -> Image.Image:
    """timm's own AugmentOp at a fixed level, its random negation forced to ``sign``."""
    hparams = {"img_mean": FILL, "interpolation": str_to_pil_interp(interpolation)}
    op = AugmentOp(name, prob=1.0, magnitude=level, hparams=hparams)
    scripted = ScriptedRandom([1.0 if sign < 0 else 0.0] if name in SIGNED else [])
    monkeypatch.setattr(timm_aa, "random", scripted)
    out = op(img)
    assert not scripted.values, "timm drew fewer random numbers than expected"
    return out


CASES = [(n, "bicubic") for n in ALL_OPS] + [(n, "bilinear") for n in ALL_OPS if n in GEOMETRIC]


@pytest.mark.parametrize(("name", "interpolation"), CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_op_matches_timm(images, name, interpolation, monkeypatch) -> None:
    spec = replace(USI, num_ops=1, ops=ALL_OPS)
    k = ALL_OPS.index(name)
    settings = [(m, s) for m in MAGNITUDES for s in (1.0, -1.0)]
    # one batch holding every (image, magnitude, sign): per-sample parameters side by side
    draws = torch.tensor([[[k, m, s]] for m, s in settings for _ in images], dtype=torch.float32)
    ours = apply_batch(to_batch(images * len(settings)), draws, spec, fill=FILL, interpolation=interpolation)
    ref = to_batch([timm_op(name, m, s, im, interpolation, monkeypatch) for m, s in settings for im in images])
    diff = (ours.int() - ref.int()).abs().float().mean().item()
    bound = GEOMETRIC_BOUND[(name, interpolation)] if name in GEOMETRIC else COLOR_BOUND
    print(f"{name} {interpolation}: mean abs diff {diff:.4f} (bound {bound})")
    assert diff <= bound


def test_apply_pil_is_timm_randaugment(images, monkeypatch) -> None:
    """USI's timm transform (create_transform's hparams) forced to our draws gives apply_pil's pixels exactly."""
    ra = next(t for t in build_transform(TRANSFORM, True).transforms if isinstance(t, RandAugment))
    assert ra.ops[0].kwargs["fillcolor"] == FILL
    rng = np.random.default_rng(0)
    for trial in range(40):
        img = images[trial % len(images)]
        draws = draw_randaugment(rng, USI)
        script, chosen = [], []
        for op_index, level, sign in draws.astype(np.float64):
            if op_index < 0:  # skipped: timm draws u > prob, whichever op it chose
                chosen.append(ra.ops[0])
                script.append(1.0)
                continue
            chosen.append(ra.ops[int(op_index)])
            script += [0.0, level] + ([1.0 if sign < 0 else 0.0] if USI.ops[int(op_index)] in SIGNED else [])
        scripted = ScriptedRandom(script)
        monkeypatch.setattr(timm_aa, "random", scripted)
        monkeypatch.setattr(np.random, "choice", lambda *a, _c=chosen, **k: list(_c))
        expected = ra(img)
        assert not scripted.values
        assert np.array_equal(np.asarray(apply_pil(img, draws, USI, fill=FILL)), np.asarray(expected)), draws


def timm_draws(n_images: int, seed: int, monkeypatch) -> list[dict]:
    """What timm's own RandAugment (USI's config) draws for ``n_images`` images, read off its ops as they run."""
    ra = timm_aa.rand_augment_transform("rand-m7-mstd0.5-inc1", {})
    records: list[dict] = []
    original_call = AugmentOp.__call__

    def recording_call(self, img):
        records.append({"name": self.name, "applied": False, "level": None, "arg": None})
        return original_call(self, img)

    def recording_fns(op):
        level_fn = op.level_fn

        def record_level(level, hparams):
            args = level_fn(level, hparams)
            records[-1].update(level=level, arg=args[0])
            return args

        def record_apply(img, *args, **kwargs):
            records[-1]["applied"] = True
            return img

        return (record_level if level_fn else None), record_apply

    for op in ra.ops:
        op.level_fn, op.aug_fn = recording_fns(op)
    monkeypatch.setattr(AugmentOp, "__call__", recording_call)
    monkeypatch.setattr(timm_aa, "random", random.Random(seed))
    monkeypatch.setattr(np.random, "choice", np.random.RandomState(seed).choice)
    img = Image.new("RGB", (4, 4))
    for _ in range(n_images):
        ra(img)
    monkeypatch.undo()
    return records


def test_draws_follow_timm_distribution(monkeypatch) -> None:
    """Op choice + apply prob (chi-square), magnitudes (KS) and signs (chi-square) against timm's own draws."""
    n = 4000
    timm = timm_draws(n, seed=0, monkeypatch=monkeypatch)
    assert len(timm) == 2 * n
    timm_ops = np.array([USI.ops.index(r["name"]) if r["applied"] else -1 for r in timm])
    timm_levels = np.array([r["level"] for r in timm if r["applied"] and r["level"] is not None])
    signed = [r for r in timm if r["applied"] and r["name"] in SIGNED]
    timm_signs = np.array(
        [1.0 if r["arg"] > (1.0 if r["name"].endswith("Increasing") else 0.0) else -1.0 for r in signed]
    )

    def ours(spec: RandAugmentSpec) -> np.ndarray:
        rng = np.random.default_rng(1)
        return np.concatenate([draw_randaugment(rng, spec) for _ in range(n)])

    def p_values(d: np.ndarray) -> tuple[float, float, float]:
        op, level, sign = d[:, 0].astype(int), d[:, 1], d[:, 2]
        cats = np.arange(-1, len(USI.ops))
        table = np.stack([[(timm_ops == c).sum() for c in cats], [(op == c).sum() for c in cats]])
        p_ops = stats.chi2_contingency(table).pvalue
        p_levels = stats.ks_2samp(timm_levels, level[op >= 0]).pvalue
        our_signs = sign[(op >= 0) & np.isin(op, [USI.ops.index(s) for s in SIGNED if s in USI.ops])]
        signs = np.array([[(timm_signs == s).sum(), (our_signs == s).sum()] for s in (-1.0, 1.0)])
        p_signs = stats.chi2_contingency(signs).pvalue
        return p_ops, p_levels, p_signs

    draws = ours(USI)
    assert draws.shape == (2 * n, DRAW_COLUMNS) and draws.dtype == np.float32
    assert draws[:, 1].min() >= 0 and draws[:, 1].max() <= USI.magnitude_max
    p_ops, p_levels, p_signs = p_values(draws)
    print(f"p-values: ops+prob {p_ops:.3f}, magnitudes {p_levels:.3f}, signs {p_signs:.3f}")
    assert min(p_ops, p_levels, p_signs) > 0.01
    # the tests can tell: a 0.6 apply prob, a 0.7 magnitude std, or biased ops are rejected
    assert p_values(ours(replace(USI, prob=0.6)))[0] < 1e-6
    assert p_values(ours(replace(USI, magnitude_std=0.7)))[1] < 1e-6
    biased = ours(replace(USI, ops=(*USI.ops, "Rotate")))  # Rotate twice as likely, 16 -> 15 categories
    biased[:, 0] = np.where(biased[:, 0] == len(USI.ops), USI.ops.index("Rotate"), biased[:, 0])
    assert p_values(biased)[0] < 1e-6


def test_parse() -> None:
    assert (USI.num_ops, USI.magnitude, USI.magnitude_std, USI.magnitude_max, USI.prob) == (2, 7.0, 0.5, 10.0, 0.5)
    assert USI.ops == RAND_OPS and len(RAND_OPS) == 15
    other = RandAugmentSpec.parse("rand-m9-n3-mstd101-mmax15-p0.7")  # timm: mstd > 100 is uniform
    assert (other.num_ops, other.magnitude, other.magnitude_max, other.prob) == (3, 9.0, 15.0, 0.7)
    assert other.magnitude_std == float("inf") and "Posterize" in other.ops
    for bad in ("rand-m7-x1", "augmix-m3", "rand-tweights", "rand-t3a"):
        with pytest.raises(ValueError, match="rand"):
            RandAugmentSpec.parse(bad)


def test_uniform_magnitude_and_always_apply() -> None:
    spec = RandAugmentSpec.parse("rand-m6-mstd101-p1.0")
    d = np.concatenate([draw_randaugment(np.random.default_rng(i), spec) for i in range(500)])
    assert (d[:, 0] >= 0).all()
    assert stats.kstest(d[:, 1], stats.uniform(0, 6).cdf).pvalue > 0.01


def random_draws(batch: int, seed: int, spec: RandAugmentSpec = USI) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(np.stack([draw_randaugment(rng, spec) for _ in range(batch)]))


@pytest.mark.parametrize(
    ("size", "interpolation", "bound"),
    [
        ((64, 64), "bilinear", 0.01),
        ((64, 64), "bicubic", 0.3),
        ((64, 40), "bilinear", 0.01),
    ],  # measured 0.0022, 0.233, 0.0020
)
@pytest.mark.parametrize("subset_devices", [("cpu",), ()], ids=["subsets", "full-batch"])
def test_apply_batch_matches_apply_pil(images, size, interpolation, bound, subset_devices, monkeypatch) -> None:
    """Whole draws (two ops, random magnitudes) on real images, square and not: batched vs timm's PIL ops,
    computing each op family on the samples that drew it (CPU) or on all and selecting (CUDA's way)."""
    monkeypatch.setattr(randaugment, "_SUBSET_DEVICES", subset_devices)
    imgs = [im.resize(size, Image.Resampling.BICUBIC) for im in images] * 8
    draws = random_draws(len(imgs), seed=3, spec=replace(USI, prob=1.0))
    ours = apply_batch(to_batch(imgs), draws, USI, fill=FILL, interpolation=interpolation)
    ref = to_batch(
        [
            apply_pil(im, d.numpy(), USI, fill=FILL, interpolation=interpolation)
            for im, d in zip(imgs, draws, strict=True)
        ]
    )
    diff = (ours.int() - ref.int()).abs().float().mean().item()
    print(f"two random ops, {size} {interpolation}: mean abs diff {diff:.4f} (bound {bound})")
    assert diff <= bound


def test_apply_batch_contract(images, monkeypatch) -> None:
    batch = to_batch(images * 3)
    draws = random_draws(len(batch), seed=5, spec=replace(USI, prob=1.0))
    draws[0, :, 0] = -1  # sample 0: both slots skipped
    out = apply_batch(batch, draws, USI, fill=FILL)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert torch.equal(out[0], batch[0])
    assert not torch.equal(out[1:], batch[1:])
    # channels-last in, channels-last out, same pixels
    cl = apply_batch(batch.contiguous(memory_format=torch.channels_last), draws, USI, fill=FILL)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, out)
    # a sample's output does not depend on the rest of the batch
    for i in (1, 5):
        others = torch.roll(torch.arange(len(batch)), 3)
        others[0] = i
        mixed = apply_batch(
            batch[others],
            random_draws(len(batch), seed=9).index_copy(0, torch.tensor([0]), draws[i : i + 1]),
            USI,
            fill=FILL,
        )
        assert torch.equal(mixed[0], out[i])
        assert torch.equal(apply_batch(batch[i : i + 1], draws[i : i + 1], USI, fill=FILL)[0], out[i])
    # the accelerator's way (every family on all samples, then a per-sample select) gives the same pixels
    monkeypatch.setattr(randaugment, "_SUBSET_DEVICES", ())
    assert torch.equal(apply_batch(batch, draws, USI, fill=FILL), out)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="draws"):
        apply_batch(batch, draws[:, :1], USI, fill=FILL)
    with pytest.raises(ValueError, match="uint8"):
        apply_batch(batch.float(), draws, USI, fill=FILL)


def test_apply_batch_reads_nothing_on_the_host() -> None:
    """On the meta device every value is unknown: any .item()/bool(tensor) sync in apply_batch would raise."""
    images = torch.empty(4, 3, 16, 16, dtype=torch.uint8, device="meta")
    draws = torch.empty(4, USI.num_ops, DRAW_COLUMNS, device="meta")
    out = apply_batch(images, draws, replace(USI, ops=ALL_OPS), fill=FILL)
    assert out.shape == images.shape and out.dtype == torch.uint8
    with pytest.raises(RuntimeError):
        bool(images.sum() > 0)  # the premise: reading a meta tensor's value fails
