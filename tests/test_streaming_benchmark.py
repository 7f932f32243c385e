"""The loader benchmark runs end to end at a tiny size and prints one sane JSON line (no timing asserted)."""

from __future__ import annotations

import json
import sys

import pytest
from streaming_fixtures import run, sample_root

pytestmark = pytest.mark.timeout(120)


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
    for key in (
        "train_ours_images_per_s_per_worker",
        "train_imagefolder_images_per_s_per_worker",
        "val_ours_images_per_s_per_worker",
        "val_imagefolder_images_per_s_per_worker",
        "converter_images_per_s",
        "ratio",
        "train_ratio",
        "val_ratio",
    ):
        assert isinstance(result[key], float) and result[key] > 0, key
    assert result["ratio"] == result["train_ratio"]


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
        "train_real_vs_synthetic",
    ):
        assert isinstance(result[key], float) and result[key] > 0, key
