"""What only a GPU can check: nvJPEG decoding and the gpu pipeline on CUDA, and short bf16 train.py runs.

``make test-gpu`` runs these (``pytest -m gpu``); without CUDA each one is reported as skipped.
The CPU versions of these checks are in test_gpu_pipeline.py. FusedEMA's kernels and the recipe's
compilation are tests parametrized over the CPU and CUDA: tests/test_cpu_and_gpu.py.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo  # private module: its graph counter is the test's measuring tool
from composer.loggers import InMemoryLogger

from helpers import (
    InputRecorder,
    quirky_images,
    run_cli,
    to_pixels,
)
from usi_composer.config import DataConfig, load_config
from usi_composer.data.draws import sample_rng
from usi_composer.data.gpu_pipeline import KIND, KIND_JPEG, KIND_PIXELS, collate_encoded, decode_images
from usi_composer.data.layout import find_classes
from usi_composer.data.loaders import build_gpu_pipeline
from usi_composer.data.spec import TransformSpec
from usi_composer.data.transforms import decode_rgb
from usi_composer.training import train

SIZE = 64
USI = TransformSpec.from_data(DataConfig(image_size=SIZE))  # timm's ImageNet mean and std
MEAN, STD = USI.mean, USI.std

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run `make test-gpu` on a GPU machine"),
]

CUDA = torch.device("cuda")
# nvJPEG vs libjpeg(-turbo), the CPU path's decoder (PIL): mean absolute difference per image, 0..255
# scale. They differ in the inverse DCT and the chroma upsampling, by a level or two at edges;
# torchvision's own test of its CUDA decode uses this bound (test/test_image.py, test_decode_jpeg_cuda).
NVJPEG_MAD = 2.0
# The device transform on CUDA vs on CPU tensors from the same pixels (decoded in the workers):
# the same ops, float rounding apart (fused multiply-adds, summation order), so a level here and
# there after rounding to uint8. Not measured yet (no GPU in the sessions that wrote this): a bound
# well above float noise, far below what a wrong crop, flip or op gives (tens of levels).
DEVICE_VS_CPU_MAD = 0.5


@pytest.fixture(scope="module")
def jpegs(imagenet_sample: Path) -> list[bytes]:
    return [f.read_bytes() for f in sorted(imagenet_sample.glob("*/*.JPEG"))[:12]]


def _chw(data: bytes) -> torch.Tensor:
    """The CPU path's decode of ``data`` as a uint8 [3, H, W] tensor."""
    return torch.from_numpy(np.array(decode_rgb(data))).permute(2, 0, 1)


def _pipeline(*extra: str):
    """The recipe's gpu pipeline (``data.loaders.build_gpu_pipeline``) for yamls/usi.yaml at SIZE px."""
    cfg = load_config("yamls/usi.yaml", [f"data.image_size={SIZE}", *extra])
    return build_gpu_pipeline(cfg, TransformSpec.from_data(cfg.data, mean=MEAN, std=STD))


def _encoded(datas: list[bytes]) -> tuple[list[torch.Tensor], list[list[float]]]:
    """What the loader workers hand on for evaluation (no draws): payloads and draw rows."""
    sample = _pipeline().eval_sample
    pairs = [sample(d) for d in datas]
    return [p for p, _ in pairs], [row.tolist() for _, row in pairs]


# ---------------------------------------------------------------- nvJPEG and the gpu pipeline


def test_nvjpeg_decodes_the_sample_as_the_cpu_path_does(imagenet_sample: Path) -> None:
    """Every image of the sample through decode_images on CUDA, in batches of 64 as the pipeline
    decodes them: what the worker routes to nvJPEG against the CPU path's full-size PIL decode,
    within NVJPEG_MAD; what the worker decodes itself (CMYK, non-JPEG) exactly as on CPU tensors."""
    datas = [f.read_bytes() for f in sorted(imagenet_sample.glob("*/*"))]
    payloads, rows = _encoded(datas)
    mads = []
    for start in range(0, len(datas), 64):
        batch = slice(start, start + 64)
        images = decode_images(payloads[batch], rows[batch], CUDA)
        on_cpu = decode_images(payloads[batch], rows[batch], torch.device("cpu"))
        for data, row, image, cpu_image in zip(datas[batch], rows[batch], images, on_cpu, strict=True):
            assert image.device.type == CUDA.type and image.dtype == torch.uint8
            if row[KIND] == KIND_PIXELS:
                assert torch.equal(image.cpu(), cpu_image)
            else:
                reference = _chw(data)
                assert image.shape == reference.shape
                mads.append((image.cpu().float() - reference.float()).abs().mean().item())
    assert len(mads) >= 0.9 * len(datas), "nearly all of ImageNet decodes on the device"
    assert max(mads) < NVJPEG_MAD, f"max {max(mads):.3f}, mean {np.mean(mads):.3f} over {len(mads)} images"


def test_decode_waits_for_the_kernels_queued_on_the_callers_stream(jpegs: list[bytes]) -> None:
    """torchvision's CUDA decode writes from its own stream into blocks the caching allocator may
    have just taken back from kernels still queued on the caller's (pytorch/vision#9606);
    decode_images waits for them first. Blocks the size of the decoded images are freed while
    kernels that write and read them are queued behind a sleep, then the batch is decoded."""
    payloads, rows = _encoded(jpegs[:8])
    assert all(row[KIND] == KIND_JPEG for row in rows)
    reference = decode_images(payloads, rows, CUDA)
    torch.cuda.synchronize()
    sizes = [image.numel() for image in reference]
    for _ in range(10):
        victims = [torch.zeros(n, dtype=torch.uint8, device=CUDA) for n in sizes]
        torch.cuda._sleep(50_000_000)  # private API: tens of milliseconds of GPU work queued ahead
        torch._foreach_add_(victims, 1)  # queued writes ...
        sums = [v.sum(dtype=torch.int64) for v in victims]  # ... and reads of the blocks
        del victims  # freed while those kernels wait: the allocator may hand the blocks out again
        images = decode_images(payloads, rows, CUDA)
        assert [int(s) for s in sums] == sizes, "the decode wrote into memory that queued kernels used"
        same = all(torch.equal(a, b) for a, b in zip(images, reference, strict=True))
        assert same, "queued kernels wrote into the decoded images"


@pytest.mark.parametrize("quirk", ["cmyk", "png_named_jpeg", "grayscale", "truncated"])
def test_quirky_files_take_the_cpu_paths_decode_on_cuda(jpegs: list[bytes], quirk: str) -> None:
    """CMYK and PNG-as-JPEG are decoded in the worker, exactly as the CPU path; grayscale goes to
    nvJPEG and comes back as three equal channels; a truncated file never reaches nvJPEG (which may
    decode it without an error): the worker's PIL decode raises, before any batch exists, the error
    that tests/test_gpu_pipeline.py checks is the CPU path's."""
    if quirk == "truncated":
        data = jpegs[2][: len(jpegs[2]) // 2]
        for sample in (_pipeline().train_sample, _pipeline().eval_sample):
            with pytest.raises(OSError, match="image file is truncated"):
                sample(data, sample_rng(0, 0, 0))
        return
    data = quirky_images(jpegs[0])[quirk]
    payloads, rows = _encoded([data])
    (image,) = decode_images(payloads, rows, CUDA)
    assert image.device.type == CUDA.type
    if quirk == "grayscale":
        reference = _chw(data)
        assert rows[0][KIND] == KIND_JPEG and image.shape == reference.shape
        assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
        assert (image.cpu().float() - reference.float()).abs().mean().item() < NVJPEG_MAD
    else:  # the worker's PIL decode (at the eval's reduced size for a JPEG), copied to the device as is
        assert rows[0][KIND] == KIND_PIXELS
        (on_cpu,) = decode_images(payloads, rows, torch.device("cpu"))
        assert torch.equal(image.cpu(), on_cpu)
        if quirk == "png_named_jpeg":
            assert torch.equal(image.cpu(), _chw(data))


def test_what_nvjpeg_rejects_is_decoded_per_sample_as_on_the_cpu(jpegs: list[bytes]) -> None:
    """The device's safety net on CUDA: a PNG the worker's checks let through as a JPEG fails
    nvJPEG's batch; the samples are decoded one by one, the PNG by the CPU path's decode."""
    payloads, rows = _encoded(jpegs[:3])
    expected = decode_images(payloads, rows, CUDA)
    png = quirky_images(jpegs[1])["png_named_jpeg"]
    payloads[1] = torch.frombuffer(bytearray(png), dtype=torch.uint8)  # still marked as a JPEG
    images = decode_images(payloads, rows, CUDA)
    assert torch.equal(images[0], expected[0]) and torch.equal(images[2], expected[2])
    assert torch.equal(images[1].cpu(), _chw(png))
    payloads[1] = torch.frombuffer(bytearray(b"GIF89a broken" * 8), dtype=torch.uint8)
    with pytest.raises(Exception, match="cannot identify image file"):
        decode_images(payloads, rows, CUDA)


@pytest.mark.parametrize("gpu_decode", [False, True], ids=["worker_decode", "nvjpeg"])
def test_device_transform_on_cuda_gives_its_cpu_result(jpegs: list[bytes], gpu_decode: bool) -> None:
    """The training device transform on CUDA vs on CPU tensors, same draws. From the same pixels
    (data.gpu_decode=false), with RandAugment: within DEVICE_VS_CPU_MAD. With nvJPEG against the
    CPU's libjpeg, without RandAugment (whose lookup-table ops turn a level's difference into
    many): within NVJPEG_MAD."""
    pipeline = _pipeline(f"data.gpu_decode={gpu_decode}", *(["data.auto_augment=null"] if gpu_decode else []))
    batch = collate_encoded([(pipeline.train_sample(d, sample_rng(0, 0, i)), i) for i, d in enumerate(jpegs)])
    kinds = batch[0].rows[:, KIND]
    assert (kinds == KIND_JPEG).sum() >= len(jpegs) - 2 if gpu_decode else (kinds == KIND_PIXELS).all()
    on_cpu, _ = pipeline.train_device(batch)
    # Composer turns on TF32 matmuls on GPUs; affine_grid (RandAugment's warps) is one: off here
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        on_cuda, labels = pipeline.train_device((batch[0], batch[1].to(CUDA)))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert on_cuda.device.type == CUDA.type and labels.device.type == CUDA.type
    assert on_cuda.shape == on_cpu.shape == (len(jpegs), 3, SIZE, SIZE)
    assert on_cuda.is_contiguous(memory_format=torch.channels_last)
    mads = (to_pixels(on_cuda.cpu(), MEAN, STD) - to_pixels(on_cpu, MEAN, STD)).abs().mean((1, 2, 3))
    bound = NVJPEG_MAD if gpu_decode else DEVICE_VS_CPU_MAD
    assert mads.max().item() <= bound, mads.tolist()


def test_gpu_pipeline_trains_and_evaluates_on_cuda(imagenet_sample: Path, saved_teacher) -> None:
    """data.pipeline=gpu end to end: loader workers read bytes and draw, pinned batches, nvJPEG,
    the device transform, a training step with KD, EMA and MixUp/CutMix, and an evaluation."""
    num_classes = len(find_classes(imagenet_sample))
    cfg = load_config(
        "yamls/usi.yaml",
        [
            f"data.train_dir={imagenet_sample}",
            f"data.val_dir={imagenet_sample}",
            f"data.num_classes={num_classes}",
            f"data.image_size={SIZE}",
            "data.pipeline=gpu",
            "data.num_workers=2",
            "model.name=resnet10t",
            "teacher.name=resnet10t",
            "teacher.pretrained=false",
            f"teacher.checkpoint={saved_teacher('resnet10t', num_classes)}",
            "trainer.global_batch_size=16",
            "trainer.max_duration=2ba",
            "trainer.eval_interval=2ba",
            "trainer.eval_subset_num_batches=1",
            "trainer.compile=false",
            "trainer.progress_bar=false",
        ],
    )
    recorder, logger = InputRecorder(), InMemoryLogger()
    trainer = train(cfg, loggers=[logger], callbacks=[recorder])
    x = recorder.inputs[0]
    assert x.device.type == CUDA.type and x.shape == (16, 3, SIZE, SIZE) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(x).all()
    assert x.std() > 0.3, "real images, not a constant"
    assert int(trainer.state.timestamp.batch) == 2
    totals = [float(v) for _, v in logger.data["loss/train/total"]]
    assert len(totals) == 2 and all(math.isfinite(t) for t in totals), totals
    assert len(logger.data["metrics/eval/top1"]) == 1
    trainer.close()


def test_automatic_microbatching_is_composers_on_cuda(imagenet_sample: Path) -> None:
    """``trainer.microbatch_size=auto`` reaches Composer's automatic microbatching (it fits the microbatch to
    the GPU's memory); on the CPU it is one line (tests/test_preflight.py)."""
    num_classes = len(find_classes(imagenet_sample))
    overrides = [
        f"data.train_dir={imagenet_sample}",
        "data.val_dir=null",
        f"data.num_classes={num_classes}",
        f"data.image_size={SIZE}",
        "data.num_workers=2",
        "model.name=resnet10t",
        "algorithms.distillation.enabled=false",
        "trainer.global_batch_size=16",
        "trainer.microbatch_size=auto",
        "trainer.max_duration=2ba",
        "trainer.compile=false",
        "trainer.progress_bar=false",
    ]
    trainer = train(load_config("yamls/usi.yaml", overrides))
    assert trainer.state.auto_microbatching and int(trainer.state.timestamp.batch) == 2
    trainer.close()


# ---------------------------------------------------------------- train.py


@pytest.mark.slow  # a subprocess each
@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
def test_train_py_runs_20_compiled_bf16_batches(
    imagenet_sample: Path, saved_teacher, tmp_path: Path, pipeline: str
) -> None:
    """``python train.py yamls/usi.yaml ...`` as a user runs it on one GPU: bf16, compiled, the
    given data pipeline, 20 batches of the sample at 128 px, every batch's loss finite. The second
    run finds the first one's graphs in inductor's cache (the same shapes for both pipelines)."""
    num_classes = len(find_classes(imagenet_sample))
    result = run_cli(
        "train.py",
        "yamls/usi.yaml",
        f"data.train_dir={imagenet_sample}",
        "data.val_dir=null",
        f"data.num_classes={num_classes}",
        "data.image_size=128",
        f"data.pipeline={pipeline}",
        "data.num_workers=8",
        "model.name=resnet10t",  # as the teacher: most of the teacher's kernels are compiled once, for both
        "teacher.name=resnet10t",
        "teacher.pretrained=false",
        f"teacher.checkpoint={saved_teacher('resnet10t', num_classes)}",
        "trainer.global_batch_size=32",
        "trainer.max_duration=20ba",
        "trainer.precision=amp_bf16",
        "trainer.compile=true",
        "trainer.progress_bar=false",
        "trainer.log_interval=1ba",
        "algorithms.distillation.log_interval=5",  # the non-finite check every 5 batches and at the end
        env={"WANDB_MODE": "disabled"},
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    losses = [float(v) for v in re.findall(r"batch \d+/20  loss (\S+)", output)]  # the recipe's console, each batch
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses), losses
    assert "in the first batch: " in output, "compiled (the first batch's compile time is said)"
