"""The benchmark scripts run (tiny sizes) and print one JSON line with their figures."""

from __future__ import annotations

import json
import math

import pytest

from helpers import run_cli

pytestmark = pytest.mark.slow  # the benchmark scripts in subprocesses

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


# Each script's derived figures as functions of the figures they come from (timing itself is not asserted).
DERIVED = {
    "kd_overhead": {"overhead_ratio": lambda r: r["kd_step_ms"] / (r["student_step_ms"] + r["teacher_forward_ms"])},
    "teacher_forward": {"ratio": lambda r: r["ours_ms"] / r["plain_ms"]},
    "train_step": {
        "ours_vs_timm": lambda r: r["ours_ms"] / r["timm_ms"],
        "ours_vs_plain": lambda r: r["ours_ms"] / r["plain_ms"],
        "ours_img_per_s": lambda r: r["batch_size"] / r["ours_ms"] * 1000,
    },
}
MEASURED = {
    "kd_overhead": ("student_step_ms", "teacher_forward_ms", "kd_step_ms"),
    "teacher_forward": ("ours_ms", "plain_ms"),
    "train_step": ("ours_ms", "timm_ms", "plain_ms"),
}


@pytest.mark.parametrize("name", list(DERIVED))
def test_benchmark_prints_one_json_line(name: str) -> None:
    """One JSON line: the run's settings as given, positive timings, and each derived figure equal
    to what it is derived from (up to the report's rounding to 4 decimals)."""
    report = _run(f"benchmarks/{name}.py", *TINY)
    assert report["benchmark"] == name
    assert (report["batch_size"], report["image_size"], report["num_classes"]) == (4, 32, 10)
    assert report["student" if name != "teacher_forward" else "teacher"] == "resnet10t"
    assert isinstance(report["threads"], int) and report["threads"] >= 1
    for key in MEASURED[name]:
        assert isinstance(report[key], float) and math.isfinite(report[key]) and report[key] > 0, key
    for key, derive in DERIVED[name].items():
        assert report[key] == pytest.approx(derive(report), rel=1e-3), key


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
