"""Resumption equivalence, the property Composer checks for its own algorithms.

Train 2 batches saving every batch; a fresh trainer with fresh algorithm instances loads the
batch-1 checkpoint and trains to batch 2; the two batch-2 checkpoints (model, optimizer,
schedulers, algorithm state incl. EMA, RNG) must be equal. Importable by the tests (world size
1) and runnable under the launcher for world size 2:

    composer -n 2 tests/resumption.py OUT_DIR
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from composer import Trainer
from composer.algorithms import ChannelsLast
from composer.models import ComposerClassifier
from composer.utils import dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from usi_composer.algorithms import FusedEMA, KnowledgeDistillation, MixUpCutMix

NUM_CLASSES = 4


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, NUM_CLASSES),
    )


def _ema() -> FusedEMA:
    return FusedEMA(half_life=None, smoothing=0.9)


ALGORITHM_SETS: dict[str, Callable[[], list]] = {
    "mixup_cutmix": lambda: [MixUpCutMix(NUM_CLASSES)],
    "distillation": lambda: [KnowledgeDistillation(_net(123).eval(), alpha=5.0)],
    "ema": lambda: [_ema()],
    "usi": lambda: [MixUpCutMix(NUM_CLASSES), KnowledgeDistillation(_net(123).eval()), _ema(), ChannelsLast()],
}


def _trainer(name: str, folder: Path, load_path: str | None = None, max_duration: str = "2ba") -> Trainer:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, NUM_CLASSES, (64,), generator=g))
    sampler = dist.get_sampler(data, shuffle=True, seed=0)
    model = ComposerClassifier(_net(0), num_classes=NUM_CLASSES)
    return Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=4, sampler=sampler, drop_last=True),
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2),
        max_duration=max_duration,
        algorithms=ALGORITHM_SETS[name](),
        save_folder=str(folder),
        save_filename="ba{batch}-rank{rank}.pt",
        save_interval="1ba",
        save_overwrite=True,
        load_path=load_path,
        device="cpu",
        progress_bar=False,
        seed=17,
    )


def run_pair(name: str, root: Path) -> tuple[Path, Path]:
    """Both runs; returns the two batch-2 checkpoints (uninterrupted, resumed).

    Under DDP, Composer writes one checkpoint, on rank 0, holding every rank's RNG state.
    """
    first, resumed = root / name / "first", root / name / "resumed"
    _trainer(name, first).fit()
    _trainer(name, resumed, load_path=str(first / "ba1-rank0.pt")).fit()
    return first / "ba2-rank0.pt", resumed / "ba2-rank0.pt"


def differences(a: Path, b: Path) -> list[str]:
    """Paths where two checkpoints differ (ignoring wall-clock times and run names)."""
    ca, cb = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
    out: list[str] = []
    for key in ("model", "optimizers", "schedulers", "algorithms"):
        _compare(ca["state"][key], cb["state"][key], f"state.{key}", out)
    ta, tb = ca["state"]["timestamp"]["Timestamp"], cb["state"]["timestamp"]["Timestamp"]
    _compare(
        {k: v for k, v in ta.items() if "wct" not in k},
        {k: v for k, v in tb.items() if "wct" not in k},
        "timestamp",
        out,
    )
    _compare(ca["rng"], cb["rng"], "rng", out)
    return out


def _compare(x: Any, y: Any, path: str, out: list[str]) -> None:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        if not (
            isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and torch.equal(x, y)
        ):
            out.append(path)
    elif isinstance(x, dict) and isinstance(y, dict):
        if x.keys() != y.keys():
            out.append(f"{path} keys {sorted(map(str, x.keys() ^ y.keys()))}")
        for k in x.keys() & y.keys():
            _compare(x[k], y[k], f"{path}.{k}", out)
    elif isinstance(x, list | tuple) and isinstance(y, list | tuple):
        if len(x) != len(y):
            out.append(f"{path} length")
        for i, (xi, yi) in enumerate(zip(x, y, strict=False)):
            _compare(xi, yi, f"{path}[{i}]", out)
    elif type(x).__module__ == "numpy" or type(y).__module__ == "numpy":
        import numpy as np

        if not np.array_equal(np.asarray(x, dtype=object), np.asarray(y, dtype=object)):
            out.append(path)
    elif x != y and not (isinstance(x, str) and "object at 0x" in x):  # reprs with addresses
        out.append(f"{path}: {x!r} != {y!r}")


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    report = []
    for name in ALGORITHM_SETS:
        first, resumed = run_pair(name, out_dir / "ckpt")
        if dist.get_global_rank() == 0:
            diffs = differences(first, resumed)
            ranks = len(torch.load(first, weights_only=False)["rng"])
            report.append(f"{name}: {'equal' if not diffs else 'DIFFER ' + ', '.join(diffs[:5])}, {ranks} ranks")
    if dist.get_global_rank() == 0:
        (out_dir / "report.txt").write_text("\n".join(report) + "\n")
