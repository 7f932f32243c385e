"""data.pipeline=gpu on CPU tensors: the worker transform, the collate and the device transform
(decode, crop, resize, flip, RandAugment, normalize) against the CPU path, with ImageNet's quirks."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import InputRecorder, quirky_images, to_pixels
from usi_composer.config import ConfigError, DataConfig, load_config
from usi_composer.data.draws import sample_rng
from usi_composer.data.folder import folder_dataloader
from usi_composer.data.gpu_pipeline import (
    KIND,
    KIND_JPEG,
    KIND_PIXELS,
    DeviceTransform,
    EncodedImages,
    EncodedSample,
    collate_encoded,
    split_encoded,
)
from usi_composer.data.spec import TransformSpec
from usi_composer.data.transforms import BytesTransform, build_transform
from usi_composer.errors import CorruptSampleError

SIZE = 64
# USI's transform at SIZE (timm's ImageNet mean and std); PLAIN without RandAugment (crop, resize, flip)
USI = TransformSpec.from_data(DataConfig(image_size=SIZE))
PLAIN = TransformSpec.from_data(DataConfig(image_size=SIZE, auto_augment=None))
MEAN, STD = USI.mean, USI.std
# Mean absolute difference (0..255 scale) per image between the device's view and the CPU path's
# view of the same draws (full-size decode, PIL crop + bicubic resize): observed <= 0.7 on 40
# ImageNet images (float antialiased bicubic vs PIL's fixed-point one, both rounded to uint8).
PARITY_MAD = 1.0
# With RandAugment (the aug helper's apply_batch vs timm's PIL ops, same draws): observed <= 1.6
# per image (seeds 0-5, 12 images; the geometric ops resample differently from PIL's).
PARITY_MAD_RANDAUGMENT = 3.0
# The same with data.gpu_decode=false (workers decode at a reduced DCT size, the device crops whole
# pixels of it): observed mean 1.6 over 40 images.
WORKER_DECODE_MEAN_MAD = 3.0
# The demo's short run without KD: top-1 on the held-out digits (chance: 10%); observed 76% (seed 0).
DEMO_EPOCHS, DEMO_TOP1 = 2, 0.5


@pytest.fixture(scope="module")
def jpegs(imagenet_sample: Path) -> list[bytes]:
    return [f.read_bytes() for f in sorted(imagenet_sample.glob("*/*.JPEG"))[:12]]


def train_sample(spec: TransformSpec = PLAIN, **kwargs) -> EncodedSample:
    return EncodedSample(spec, training=True, **kwargs)


def device(spec: TransformSpec = PLAIN, training: bool = True) -> DeviceTransform:
    return DeviceTransform(spec, training=training, channels_last=True)


def run(transform: EncodedSample, datas: list[bytes], seed: int = 0, epoch: int = 0):
    batch = collate_encoded([(transform(d, sample_rng(seed, epoch, i)), i) for i, d in enumerate(datas)])
    return device(transform.spec)(batch)


def cpu_view(data: bytes, rng: np.random.Generator, spec: TransformSpec) -> torch.Tensor:
    """The CPU path's image for these draws (full-size decode: torchvision's resized_crop, as timm)."""
    return BytesTransform(spec, training=True, fast=False)(data, rng).float()


def test_device_output_shapes_dtypes_and_range(jpegs: list[bytes]) -> None:
    x, y = run(train_sample(USI), jpegs)
    assert x.shape == (len(jpegs), 3, SIZE, SIZE) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, torch.arange(len(jpegs)))
    low, high = (-torch.tensor(MEAN) / torch.tensor(STD)), (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    per_channel = x.transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= low - 1e-5).all() and (per_channel.max(1).values <= high + 1e-5).all()
    assert x.std() > 0.3, "real images, not a constant"
    # evaluation: timm's resize + center crop
    ev = EncodedSample(PLAIN, training=False)
    x, _ = device(training=False)(collate_encoded([(ev(d), 0) for d in jpegs]))
    assert x.shape == (len(jpegs), 3, SIZE, SIZE) and x.dtype == torch.float32


def test_the_same_seed_epoch_and_index_give_the_same_view(jpegs: list[bytes]) -> None:
    first, _ = run(train_sample(USI), jpegs)
    again, _ = run(train_sample(USI), jpegs)
    assert torch.equal(first, again)
    other_epoch, _ = run(train_sample(USI), jpegs, epoch=1)
    assert all(not torch.equal(a, b) for a, b in zip(first, other_epoch, strict=True))


def test_microbatches_give_the_views_of_the_whole_batch(jpegs: list[bytes]) -> None:
    t = train_sample()
    batch = collate_encoded([(t(d, sample_rng(0, 0, i)), i) for i, d in enumerate(jpegs)])
    whole, _ = device()(batch)
    parts = [device()(micro)[0] for micro in split_encoded(batch, 5)]
    assert [len(p) for p in parts] == [5, 5, 2]
    assert torch.equal(torch.cat(parts), whole)


def test_the_same_draws_give_the_cpu_paths_image(jpegs: list[bytes]) -> None:
    """Decode, crop, resize and flip on the device vs the CPU path's PIL ops, same draws."""
    t = train_sample()
    x, _ = run(t, jpegs)
    for i, data in enumerate(jpegs):
        reference = cpu_view(data, sample_rng(0, 0, i), t.spec)
        mad = (to_pixels(x[i : i + 1], MEAN, STD)[0] - reference).abs().mean().item()
        assert mad <= PARITY_MAD, (i, mad)


def test_the_same_draws_with_randaugment_give_nearly_the_cpu_paths_image(jpegs: list[bytes]) -> None:
    t = train_sample(USI)
    x, _ = run(t, jpegs)
    mads = [
        (to_pixels(x[i : i + 1], MEAN, STD)[0] - cpu_view(d, sample_rng(0, 0, i), t.spec)).abs().mean().item()
        for i, d in enumerate(jpegs)
    ]
    assert max(mads) <= PARITY_MAD_RANDAUGMENT, mads


def test_worker_decode_option_gives_nearly_the_same_image(jpegs: list[bytes]) -> None:
    t = train_sample(decode_on_device=False)
    batch = collate_encoded([(t(d, sample_rng(0, 0, i)), i) for i, d in enumerate(jpegs)])
    assert (batch[0].rows[:, KIND] == KIND_PIXELS).all()
    x = to_pixels(device()(batch)[0], MEAN, STD)
    mads = [(x[i] - cpu_view(d, sample_rng(0, 0, i), t.spec)).abs().mean().item() for i, d in enumerate(jpegs)]
    assert np.mean(mads) <= WORKER_DECODE_MEAN_MAD, mads


def test_eval_matches_timms_eval_transform(jpegs: list[bytes]) -> None:
    ev = EncodedSample(PLAIN, training=False)
    x = to_pixels(device(training=False)(collate_encoded([(ev(d), 0) for d in jpegs]))[0], MEAN, STD)
    timm_eval = build_transform(PLAIN, False)
    for i, data in enumerate(jpegs):
        reference = timm_eval(Image.open(io.BytesIO(data)).convert("RGB")).float()
        assert (x[i] - reference).abs().mean().item() <= PARITY_MAD


@pytest.mark.parametrize("quirk", ["cmyk", "grayscale", "png_named_jpeg"])
def test_quirky_files_give_the_cpu_paths_rgb(jpegs: list[bytes], quirk: str) -> None:
    data = quirky_images(jpegs[0])[quirk]
    t = train_sample()
    batch = collate_encoded([(t(data, sample_rng(0, 0, 0)), 0), (t(jpegs[1], sample_rng(0, 0, 1)), 1)])
    # decode_jpeg reads grayscale (as RGB); CMYK (converted unlike PIL) and PNG are decoded in the worker
    assert batch[0].rows[0, KIND].item() == (KIND_JPEG if quirk == "grayscale" else KIND_PIXELS)
    x = to_pixels(device()(batch)[0], MEAN, STD)
    reference = cpu_view(data, sample_rng(0, 0, 0), t.spec)
    assert (x[0] - reference).abs().mean().item() <= PARITY_MAD
    if quirk == "grayscale":
        assert torch.equal(x[0, 0].round(), x[0, 1].round()), "gray comes out as three equal channels"


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: " + re.sub(r" at 0x[0-9a-f]+", "", str(e))  # PIL names the BytesIO's address


@pytest.mark.parametrize("kind", ["truncated", "not_an_image"])
def test_a_corrupt_sample_fails_with_the_cpu_paths_error(jpegs: list[bytes], kind: str) -> None:
    data = jpegs[2][: len(jpegs[2]) // 2] if kind == "truncated" else b"<html>not found</html>" * 8
    with pytest.raises(Exception) as cpu:
        BytesTransform(USI, training=True)(data, sample_rng(0, 0, 0))  # the CPU path
    with pytest.raises(Exception) as gpu:
        train_sample()(data, sample_rng(0, 0, 0))  # in the worker, before the batch exists
    assert _one_line(gpu.value) == _one_line(cpu.value)
    assert "truncated" in str(cpu.value) if kind == "truncated" else "cannot identify" in str(cpu.value)


@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
def test_a_corrupt_file_in_a_loader_worker_is_one_line_naming_it(jpegs: list[bytes], tmp_path: Path, pipeline: str):
    """Raised in a worker, re-raised by PyTorch with the worker's traceback in its text: the error
    the command line prints is still one line, and it names the file."""
    (tmp_path / "n0").mkdir()
    for i, data in enumerate(jpegs[:3]):
        (tmp_path / "n0" / f"{i}.JPEG").write_bytes(data if i != 1 else data[: len(data) // 2])
    transform = train_sample() if pipeline == "gpu" else BytesTransform(USI, training=True)
    collate = {"collate_fn": collate_encoded} if pipeline == "gpu" else {}
    loader = folder_dataloader(
        str(tmp_path), transform, 3, shuffle=False, drop_last=False, num_workers=1, pin_memory=False, **collate
    )
    with pytest.raises(CorruptSampleError) as e:
        next(iter(loader))
    message = str(e.value)
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(f"cannot decode {tmp_path / 'n0' / '1.JPEG'}: OSError: image file is truncated")


def test_what_decode_jpeg_rejects_on_the_device_falls_back_per_sample(jpegs: list[bytes]) -> None:
    """The device's safety net for a sample the worker's checks let through: the batch decode
    fails, the samples are decoded one by one, the bad one by the CPU path's decode."""
    t = train_sample()
    good = [t(d, sample_rng(0, 0, i)) for i, d in enumerate(jpegs[:3])]
    expected, _ = device()(collate_encoded([(s, i) for i, s in enumerate(good)]))
    png = quirky_images(jpegs[1])["png_named_jpeg"]
    payloads = [good[0][0], torch.frombuffer(bytearray(png), dtype=torch.uint8), good[2][0]]
    rows = torch.stack([row for _, row in good])  # all marked as JPEGs for the device
    x, _ = device()((EncodedImages(payloads, rows), torch.arange(3)))
    assert torch.equal(x[0], expected[0]) and torch.equal(x[2], expected[2])
    assert (to_pixels(x[1:2], MEAN, STD) - to_pixels(expected[1:2], MEAN, STD)).abs().mean().item() <= PARITY_MAD
    payloads[1] = torch.frombuffer(bytearray(b"GIF89a broken" * 8), dtype=torch.uint8)
    with pytest.raises(Exception, match="cannot identify image file"):
        device()((EncodedImages(payloads, rows), torch.arange(3)))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.pipeline=tpu", "data.pipeline: must be cpu or gpu, got 'tpu'"),
        ("data.auto_augment=augmix-m5", "data.pipeline=gpu implements timm's RandAugment (rand-...) only"),
        ("algorithms.progressive_resizing=true", "algorithms.progressive_resizing: resizes the batch before"),
    ],
)
def test_gpu_pipeline_config_errors_are_one_line(repo: Path, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(repo / "yamls" / "usi.yaml", ["data.pipeline=gpu", override])
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.slow
def test_the_demo_trains_with_the_gpu_pipeline_on_the_cpu(repo: Path, digits: Path, saved_teacher) -> None:
    """yamls/demo.yaml (digits as MDS shards) with data.pipeline=gpu, a short run on the CPU."""
    from usi_composer.demo import data_overrides
    from usi_composer.training import final_top1, train

    cfg = load_config(
        repo / "yamls" / "demo.yaml",
        [
            *data_overrides(digits),
            f"teacher.checkpoint={saved_teacher('resnet18', 10)}",
            "algorithms.distillation.enabled=false",  # a random teacher would only add noise here
            "data.pipeline=gpu",
            f"trainer.max_duration={DEMO_EPOCHS}ep",
            "trainer.progress_bar=false",
        ],
    )
    recorder = InputRecorder()
    trainer = train(cfg, callbacks=[recorder])
    top1 = final_top1(trainer)
    trainer.close()
    x = recorder.inputs[0]
    assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert top1 >= DEMO_TOP1, top1
