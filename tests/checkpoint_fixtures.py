"""Shared helpers of the checkpoint tests: a seconds-long run of the demo recipe, and files whose
unpickling would run code (writing a marker file, so a test can see whether it ran)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

import torch

DEMO = "yamls/demo.yaml"


def tiny(digits: Path, *extra: str) -> list[str]:
    """The demo student (EMA, MixUp/CutMix, channels-last) as timm's 0.4M-parameter test_resnet,
    8 images a batch, on the digits folders, without a teacher, checkpointing every batch."""
    return [
        "data.local=null",
        f"data.train_dir={digits / 'train'}",
        "data.val_dir=null",
        "model.name=test_resnet",
        "algorithms.distillation.enabled=false",
        "trainer.global_batch_size=8",
        "trainer.max_duration=2ba",
        "trainer.save_interval=1ba",
        "trainer.run_name=tiny",
        "trainer.progress_bar=false",
        *extra,
    ]


class RunsCode:
    """Unpickling it runs a shell command that creates ``marker`` (``os.system``, as an attack would)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


SYSTEM = f"{os.system.__module__}.system"  # how pickle names os.system: posix.system on Linux


def with_code(checkpoint: dict[str, Any], path: Path, marker: Path) -> Path:
    """``checkpoint`` plus one object whose unpickling creates ``marker``, saved to ``path``."""
    torch.save({**checkpoint, "extra": RunsCode(marker)}, path)
    return path


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]
