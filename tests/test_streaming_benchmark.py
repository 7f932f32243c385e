"""The loader benchmark runs end to end at a tiny size; its ratios are their quotients (no timing asserted)."""

from __future__ import annotations

import json
import sys

import pytest

from helpers import run, sample_root

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]  # the benchmark scripts in subprocesses


def _is_rounded_quotient(ratio: float, num: float, den: float, *, step: float, ratio_step: float) -> bool:
    """Whether ``ratio`` is ``num / den`` of the unrounded values, given the report rounds the
    values to ``step`` and the ratio to ``ratio_step``."""
    low = (num - step / 2) / (den + step / 2) - ratio_step / 2
    high = (num + step / 2) / (den - step / 2) + ratio_step / 2
    return low <= ratio <= high


def test_benchmark_smoke_prints_one_json_line() -> None:
    proc = run(
        [
            sys.executable,
            "benchmarks/dataloader.py",
            "--src",
            str(sample_root()),
            "--limit",
            "24",
            "--image-size",
            "16",
            "--runs",
            "1",
            "--batch-size",
            "8",
            "--workers",
            "1",
        ],
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["images"] == 24 and result["workers"] == 1 and result["image_size"] == 16
    assert isinstance(result["converter_images_per_s"], float) and result["converter_images_per_s"] > 0
    for split in ("train", "val"):
        ours, baseline = (result[f"{split}_{loader}_images_per_s_per_worker"] for loader in ("ours", "imagefolder"))
        assert isinstance(ours, float) and isinstance(baseline, float) and ours > 0 and baseline > 0, split
        ratio = result[f"{split}_ratio"]
        assert _is_rounded_quotient(ratio, ours, baseline, step=0.1, ratio_step=0.001), (split, ratio, ours, baseline)
    assert result["ratio"] == result["train_ratio"], "the headline ratio is the training transform's"


@pytest.mark.timeout(300)
def test_benchmark_gpu_pipeline_smoke_prints_one_json_line() -> None:
    """``--pipeline gpu`` on CPU tensors: decode figures, the pipeline's img/s, the step real vs synthetic."""
    tiny = ["--limit", "16", "--image-size", "16", "--runs", "1", "--batch-size", "4", "--workers", "1"]
    model = ["--student", "resnet10t", "--teacher", "resnet10t", "--steps", "2", "--warmup", "1"]
    proc = run(
        [sys.executable, "benchmarks/dataloader.py", "--pipeline", "gpu", "--src", str(sample_root()), *tiny, *model],
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    assert result["pipeline"] == "gpu" and result["device"] == "cpu" and result["images"] == 16
    for key in (
        "decode_ms_decode_jpeg_cpu",
        "decode_ms_pil_full",
        "decode_ms_pil_draft_crop_box",
        "gpu_pipeline_images_per_s",
        "device_transform_images_per_s",
        "train_images_per_s_real",
        "train_images_per_s_synthetic",
    ):
        assert isinstance(result[key], float) and result[key] > 0, key
    real, synthetic = result["train_images_per_s_real"], result["train_images_per_s_synthetic"]
    ratio = result["train_real_vs_synthetic"]
    assert _is_rounded_quotient(ratio, real, synthetic, step=0.001, ratio_step=0.001), (ratio, real, synthetic)
