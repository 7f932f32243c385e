"""Shared fixtures: real data (the shipped digits, ../shared's ImageNet sample) and saved weights."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
# USI_IMAGENET_SAMPLE: another copy (benchmarks/gpu_check.sh sets it where ../shared does not exist)
IMAGENET_SAMPLE = Path(os.environ.get("USI_IMAGENET_SAMPLE") or REPO.parent / "shared" / "data" / "imagenet-sample")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """1000 real ImageNet JPEGs, one per class (``../shared/data/imagenet-sample``, or a part of it
    at ``$USI_IMAGENET_SAMPLE``)."""
    train = IMAGENET_SAMPLE / "train"
    assert train.is_dir(), f"missing {train}: CI clones the repo with shared/ beside it"
    return train


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's digits in the ImageNet folder layout (root with train/ and val/)."""
    from usi_composer.data import export_digits

    return export_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def saved_teacher(tmp_path_factory: pytest.TempPathFactory):
    """Factory: a timm model's freshly initialised weights saved to a file (tests' own weights)."""
    cache: dict[tuple[str, int], Path] = {}

    def make(name: str = "resnet10t", num_classes: int = 1000) -> Path:
        if (name, num_classes) not in cache:
            import timm

            torch.manual_seed(0)
            path = tmp_path_factory.mktemp("teacher") / f"{name}-{num_classes}.pt"
            torch.save(timm.create_model(name, num_classes=num_classes).state_dict(), path)
            cache[(name, num_classes)] = path
        return cache[(name, num_classes)]

    return make


class RecordOps(TorchDispatchMode):
    """Records the name of every aten op dispatched while active (``with RecordOps() as r: ...; r.ops``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def run(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``cmd`` in the repo (``env`` added to ours), capturing text output."""
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``run`` with the test's Python in front of a script (``x.py``) or ``-m module``."""
    cmd = [sys.executable, *args] if args[0].endswith(".py") or args[0] == "-m" else list(args)
    return run(cmd, env=env, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world_size: int, logs: Path, *args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, str]:
    """``composer -n world_size args...`` (Composer's launcher; gloo on CPU) on a free port, each
    rank's output in ``logs``. Returns the result and the tails of the ranks' logs."""
    cmd = [
        sys.executable,
        "-m",
        "composer.cli.launcher",
        "-n",
        str(world_size),
        "--master_port",
        str(free_port()),
        "--stdout",
        str(logs / "rank{rank}.out"),
        "--stderr",
        str(logs / "rank{rank}.err"),
        *args,
    ]
    result = run(cmd, timeout=timeout)
    return result, "".join(p.read_text()[-2000:] for p in sorted(logs.glob("rank*.*")))
