"""Keyed draws: a sample's view is a pure function of (seed, epoch, index), with timm's distributions."""

from __future__ import annotations

import multiprocessing
import random

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ks_2samp
from timm.data.transforms import RandomResizedCropAndInterpolation

from helpers import sample_files
from usi_composer.config import DataConfig
from usi_composer.data.draws import draw_sample, sample_rng
from usi_composer.data.folder import folder_dataloader
from usi_composer.data.mds import streaming_dataloader
from usi_composer.data.spec import TransformSpec
from usi_composer.data.transforms import BytesTransform

pytestmark = pytest.mark.timeout(240)

SPEC = TransformSpec.from_data(DataConfig())  # USI's: DataConfig's defaults


def _draws(seed: int, epoch: int, index: int, size: tuple[int, int] = (500, 375)) -> tuple:
    d = draw_sample(sample_rng(seed, epoch, index), size, SPEC)
    return d.crop, d.flip, d.interpolation, None if d.randaugment is None else d.randaugment.tobytes()


def _draws_in_child(keys: list[tuple[int, int, int]]) -> list[tuple]:
    return [_draws(*key) for key in keys]


@pytest.mark.slow
def test_same_key_same_draws_in_any_process_other_keys_differ() -> None:
    keys = [(0, 0, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0), (7, 3, 123456789)]
    here = [_draws(*key) for key in keys]
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing inherited
    with ctx.Pool(1) as pool:
        there = pool.apply(_draws_in_child, (keys,))
    assert here == there
    assert here == [_draws(*key) for key in reversed(keys)][::-1], "no dependence on what was drawn before"
    # seed, epoch and index each change the view (crop boxes differ in practice for these keys)
    assert len({d[0] for d in here}) == len(keys)
    assert len({_draws(0, 0, i)[0] for i in range(200)}) > 190
    with pytest.raises(ValueError, match=">= 0"):
        sample_rng(0, -1, 0)


def test_draws_follow_the_spec() -> None:
    never = TransformSpec.from_data(DataConfig(hflip=0.0, interpolation="random", auto_augment=None))
    draws = [draw_sample(sample_rng(0, 0, i), (64, 48), never) for i in range(400)]
    assert not any(d.flip for d in draws) and all(d.randaugment is None for d in draws)
    assert {d.interpolation for d in draws} == {"bilinear", "bicubic"}
    flips = np.mean([draw_sample(sample_rng(0, 0, i), (64, 48), SPEC).flip for i in range(2000)])
    assert abs(flips - 0.5) < 0.04
    ra = draw_sample(sample_rng(0, 0, 0), (64, 48), SPEC).randaugment
    assert ra is not None and ra.dtype == np.float32 and ra.shape == (2, 3)
    with pytest.raises(ValueError):
        TransformSpec.from_data(DataConfig(auto_augment="augmix-m5"))
    with pytest.raises(ValueError, match="scale"):
        TransformSpec.from_data(DataConfig(scale=[1.0, 0.5]))


def _box_features(boxes: list[tuple[int, int, int, int]], size: tuple[int, int]) -> dict[str, np.ndarray]:
    width, height = size
    b = np.array(boxes, dtype=np.float64)  # top, left, height, width
    return {
        "area": b[:, 2] * b[:, 3] / (width * height),
        "log_aspect": np.log(b[:, 3] / b[:, 2]),
        "center_x": (b[:, 1] + b[:, 3] / 2) / width,
        "center_y": (b[:, 0] + b[:, 2] / 2) / height,
    }


def _timm_boxes(size: tuple[int, int], n: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> list:
    img = Image.new("L", size)  # get_params reads only the size
    random.seed(1234)
    return [RandomResizedCropAndInterpolation.get_params(img, scale, ratio) for _ in range(n)]


def _fallback_box(size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of timm's central box when none of the 10 tries fits (ratio 3/4..4/3)."""
    width, height = size
    if width / height < 3 / 4:
        return round(width * 4 / 3), width
    if width / height > 4 / 3:
        return height, round(height * 4 / 3)
    return height, width


# Source sizes: ImageNet's landscape and portrait, a square, a tiny one, and a panorama (ratio 4:1)
# on which most of the 10 tries fail and timm's central fallback box is common.
@pytest.mark.parametrize("size", [(500, 375), (333, 500), (256, 256), (40, 30), (800, 200)])
def test_crop_boxes_follow_timms_distribution(size: tuple[int, int]) -> None:
    n = 4000
    ours = [draw_sample(sample_rng(5, 0, i), size, SPEC).crop for i in range(n)]
    theirs = _timm_boxes(size, n)
    f_ours, f_theirs = _box_features(ours, size), _box_features(theirs, size)
    for name in f_ours:
        p = ks_2samp(f_ours[name], f_theirs[name]).pvalue
        assert p > 1e-3, f"{size} {name}: KS p={p:.2g}"
    fallback = _fallback_box(size)
    share_ours = np.mean([(h, w) == fallback for _, _, h, w in ours])
    share_theirs = np.mean([(h, w) == fallback for _, _, h, w in theirs])
    assert abs(share_ours - share_theirs) < 0.03, (share_ours, share_theirs)
    for top, left, h, w in ours:  # inside the image
        assert top >= 0 and left >= 0 and top + h <= size[1] and left + w <= size[0] and h > 0 and w > 0


def test_crop_box_test_detects_another_distribution() -> None:
    """The KS comparison above has the power to see a wrong scale range."""
    size, n = (500, 375), 4000
    ours = _box_features([draw_sample(sample_rng(5, 0, i), size, SPEC).crop for i in range(n)], size)
    other = _box_features(_timm_boxes(size, n, scale=(0.12, 1.0)), size)
    assert ks_2samp(ours["area"], other["area"]).pvalue < 1e-3


def test_transform_is_a_function_of_the_key() -> None:
    data = sample_files()[3].read_bytes()
    spec = TransformSpec.from_data(DataConfig(image_size=32))
    t = BytesTransform(spec, training=True)
    a, b, c = t(data, sample_rng(0, 0, 5)), t(data, sample_rng(0, 0, 5)), t(data, sample_rng(0, 1, 5))
    assert a.dtype == torch.uint8 and a.shape == (3, 32, 32)
    assert torch.equal(a, b) and not torch.equal(a, c)
    ref = BytesTransform(spec, training=True, fast=False)(data, sample_rng(0, 0, 5))
    assert (ref.float() - a.float()).abs().mean() < 8.0, "fast and full-size decode show the same view"


# ------------------------------------------------------------ the key reaches the loader workers


def _key_of(data: bytes, rng: np.random.Generator) -> torch.Tensor:
    """A transform that returns the (epoch, index) its generator was keyed with."""
    counter = rng.bit_generator.state["state"]["counter"]
    return torch.tensor([int(counter[2]), int(counter[1])])


N_SAMPLES = 12


def _epochs(loader, n: int) -> list[list[tuple[int, int]]]:
    out = []
    for _ in range(n):
        if hasattr(loader.sampler, "set_epoch"):  # Composer does this for DistributedSamplers
            loader.sampler.set_epoch(len(out))
        out.append([tuple(k.tolist()) for keys, _ in loader for k in keys])
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_workers_see_epoch_and_index(image_folders, workers: int) -> None:
    loader = folder_dataloader(
        str(image_folders(N_SAMPLES // 2, per_class=2) / "train"),
        _key_of,
        4,
        shuffle=True,
        drop_last=False,
        num_workers=workers,
        pin_memory=False,
        seed=3,
    )
    epochs = _epochs(loader, 2)  # persistent workers: the epoch must still change
    for epoch, keys in enumerate(epochs):
        assert sorted(keys) == [(epoch, i) for i in range(N_SAMPLES)]
    assert [i for _, i in epochs[0]] != [i for _, i in epochs[1]], "reshuffled per epoch"


@pytest.mark.parametrize("workers", [0, 2])
def test_mds_workers_see_epoch_and_global_sample_id_also_after_resume(mds_dataset, workers: int) -> None:
    def loader():
        return streaming_dataloader(
            remote=None,
            local=str(mds_dataset(N_SAMPLES // 2, per_class=2)),
            split="train",
            transform=_key_of,
            batch_size=4,
            shuffle=True,
            drop_last=False,
            num_workers=workers,
            pin_memory=False,
            seed=3,
            shuffle_seed=3,
        )

    first = loader()
    epochs = _epochs(first, 2)
    for epoch, keys in enumerate(epochs):
        assert sorted(keys) == [(epoch, i) for i in range(N_SAMPLES)]
    # mid-epoch resume into epoch 1 after one batch, as Composer does with the checkpoint's state
    state = {**first.state_dict(), "epoch": 1, "sample_in_epoch": 4}
    del first
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [tuple(k.tolist()) for keys, _ in resumed for k in keys]
    assert rest == epochs[1][4:]
