"""The benchmark scripts run (tiny sizes) and print one JSON line with their figures."""

from __future__ import annotations

import json
import math

import pytest

from conftest import run_cli

TINY = [
    "--student",
    "resnet10t",
    "--teacher",
    "resnet10t",
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--num-classes",
    "10",
    "--steps",
    "2",
    "--warmup",
    "1",
    "--runs",
    "1",
]


@pytest.mark.parametrize(
    ("script", "figures"),
    [
        ("benchmarks/kd_overhead.py", ("student_step_ms", "teacher_forward_ms", "kd_step_ms", "overhead_ratio")),
        ("benchmarks/teacher_forward.py", ("ours_ms", "plain_ms", "ratio")),
        ("benchmarks/framework_overhead.py", ("composer_ms", "plain_ms", "ratio")),
    ],
)
def test_benchmark_prints_one_json_line(script: str, figures: tuple[str, ...]) -> None:
    result = run_cli(script, *TINY, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.stdout
    report = json.loads(lines[0])
    assert report["benchmark"] == script.split("/")[-1].removesuffix(".py")
    for key in figures:
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0, key
