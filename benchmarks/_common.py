"""Shared pieces of the benchmark scripts: synthetic batches, step timing, the one-line JSON report."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="repeat and take the median of run medians")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    return parser


def setup(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)


def synthetic_loader(args: argparse.Namespace, num_batches: int) -> DataLoader:
    """Normalized-image batches and integer labels, already in memory (no decode cost)."""
    n = args.batch_size * num_batches
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, args.image_size, args.image_size, generator=g)
    y = torch.randint(0, args.num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=False, drop_last=True)


def median_ms(fn: Callable[[], Any], steps: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


class StepTimer(Callback):
    """Wall time of each training step, BATCH_START to BATCH_END (data loading excluded)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_START:
            self._start = time.perf_counter()
        elif event == Event.BATCH_END:
            self.times.append(time.perf_counter() - self._start)

    def median_ms(self, warmup: int) -> float:
        return 1000 * statistics.median(self.times[warmup:])


def report(name: str, args: argparse.Namespace, **figures: Any) -> None:
    """Print the benchmark's one JSON line."""
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}
    config = {k: v for k, v in vars(args).items() if k not in ("runs", "steps", "warmup", "threads")}
    print(json.dumps({"benchmark": name, **config, "threads": torch.get_num_threads(), **rounded}), flush=True)


def console_on_stderr() -> Any:
    """The recipe's console for a benchmark's runs: its lines on stderr, so stdout is the one JSON line."""
    import sys

    from usi_composer.console import TrainingConsole

    return TrainingConsole(log_interval=None, stream=sys.stderr)
