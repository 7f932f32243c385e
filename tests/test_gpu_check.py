"""benchmarks/gpu_check.sh and ``make test-gpu`` where there is no GPU: the plan (--dry-run), the
summary of a run that cannot start, and every GPU test collected and skipped with its reason."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, run

pytestmark = pytest.mark.slow  # each starts pytest or the script in a subprocess

SCRIPT = "benchmarks/gpu_check.sh"
STEPS = ("setup", "tests", "train_step_profile", "train_step", "dataloader_gpu")
BUDGET_S = 480  # at most 8 minutes on one H100/H200


def _gpu_tests_in(*paths: str) -> list[str]:
    """The ids of the tests marked gpu that pytest collects from ``paths``."""
    pytest_args = ["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *paths]
    result = run([sys.executable, "-m", "pytest", *pytest_args])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_dry_run_prints_the_plan_and_checks_what_needs_no_gpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run(["bash", SCRIPT, "--dry-run"], env={"PYTHON": sys.executable, "OUT": str(out)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    text = result.stdout
    plan = dict(re.findall(r"^  (\w+) +timeout +(\d+)s  ", text, re.M))
    assert tuple(plan) == STEPS
    assert sum(int(t) for t in plan.values()) == int(re.search(r"total of the timeouts: (\d+)s", text)[1]) <= BUDGET_S
    for command in (
        "test-gpu TEST_PYTHON=" if shutil.which("make") else "-m pytest -m gpu -rA",
        "benchmarks/train_step.py --profile --batch-size 32 --steps 3 --warmup 2 --set trainer.progress_bar=false",
        "benchmarks/train_step.py --runs 1 --steps 20 --warmup 8 --set trainer.progress_bar=false",
        "benchmarks/dataloader.py --pipeline gpu --src ",
    ):
        assert command in text, command
    assert "resnet50 / tresnet_v2_l, 224 px, batch 256" in text, "the sizes are stated"
    assert "ok: bash -n" in text and "FAILED" not in text and text.rstrip().endswith("dry run: ok")
    # what it collects is every GPU test of the suite: none lives outside the files make test-gpu names
    collected = re.search(r"^collect: (\d+)/\d+ tests collected", text, re.M)
    assert collected and int(collected[1]) == len(_gpu_tests_in("tests")) > 10
    assert not out.exists(), "a dry run writes nothing"


def test_dry_run_fails_without_the_sample(tmp_path: Path) -> None:
    env = {"PYTHON": sys.executable, "USI_IMAGENET_SAMPLE": str(tmp_path / "missing")}
    result = run(["bash", SCRIPT, "--dry-run"], env=env)
    assert result.returncode == 1
    assert "FAILED: the sample is there (0 images)" in result.stdout
    assert "dry run: FAILED" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs everything (minutes)")
def test_a_run_without_cuda_stops_after_setup_with_a_summary(tmp_path: Path) -> None:
    result = run(["bash", SCRIPT], env={"PYTHON": sys.executable, "OUT": str(tmp_path)})
    assert result.returncode == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.startswith("==== gpu_check summary on no CUDA device")
    assert re.search(r"^setup: failed \(exit 1\)", summary, re.M)
    assert all(f"{name}: skipped (setup failed)" in summary for name in STEPS[1:])
    assert "error: no CUDA device here" in (tmp_path / "setup.log").read_text()
    report = json.loads((tmp_path / "figures.json").read_text())
    assert report["device"] == "no CUDA device" and list(report["steps"]) == list(STEPS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{name}.log" for name in STEPS] + ["summary.txt", "figures.json"]
    ), "what the device tool brings back: at most 8 files"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU make test-gpu runs the GPU tests themselves")
def test_make_test_gpu_skips_every_gpu_test_with_its_reason_without_cuda() -> None:
    if shutil.which("make"):
        result = run(["make", "-s", "test-gpu", f"TEST_PYTHON={sys.executable}"])
    else:
        files = sorted(f"tests/{p.name}" for p in (REPO / "tests").glob("test_*gpu*.py"))  # as the Makefile
        result = run([sys.executable, "-m", "pytest", "-m", "gpu", "-rA", *files])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    skipped = re.findall(r"^SKIPPED \[(\d+)\] (\S+): (.+)$", output, re.M)
    assert sum(int(n) for n, _, _ in skipped) == len(_gpu_tests_in("tests")) > 10
    assert all("CUDA" in reason for _, _, reason in skipped), skipped
    final = output.strip().splitlines()[-1]
    assert re.fullmatch(r"=+ \d+ skipped, \d+ deselected in [\d.]+s =+", final), final
