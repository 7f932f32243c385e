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
        ("benchmarks/train_step.py", ("ours_ms", "timm_ms", "plain_ms", "ours_vs_timm", "ours_vs_plain")),
    ],
)
def test_benchmark_prints_one_json_line(script: str, figures: tuple[str, ...]) -> None:
    report = _run(script, *TINY)
    assert report["benchmark"] == script.split("/")[-1].removesuffix(".py")
    for key in figures:
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0, key


def _run(script: str, *args: str) -> dict:
    result = run_cli(script, *args, env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, result.stdout
    return json.loads(lines[0])


# Host syncs per step of the recipe's step: the three that Composer's Trainer (0.32) makes and
# usi_composer.trainer keeps (the end-of-data flag, the batch size, the logged loss). Composer's
# optimizer closure (1), the sample/time accounting (3) and one read per logged loss part (2)
# are gone: a new .item() anywhere in the step shows here.
OUR_SYNCS = 3
TIMM_SYNCS = 3


@pytest.fixture(scope="module")
def step_counts() -> dict:
    return _run("benchmarks/train_step.py", "--profile", *TINY, "--set", "trainer.progress_bar=false")


def test_our_step_adds_no_host_sync(step_counts: dict) -> None:
    """No .item()/bool(tensor)/torch.equal from the recipe's own code in a training step: the
    only syncs are the three of Composer's that usi_composer.trainer keeps."""
    assert step_counts["ours_syncs_in_recipe"] == 0
    assert step_counts["ours_syncs"] == OUR_SYNCS <= step_counts["timm_syncs"]
    assert step_counts["timm_syncs"] == TIMM_SYNCS
    assert step_counts["plain_syncs"] == 0


def test_our_step_dispatches_no_more_ops_than_timms(step_counts: dict) -> None:
    """A per-tensor Python loop in the step (an EMA, an optimizer, a metric) shows up here."""
    assert step_counts["ours_ops"] <= step_counts["timm_ops"]
