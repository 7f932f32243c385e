"""What a cache of the teacher's outputs saves: the step and a temperature sweep, with and without it.

    python benchmarks/teacher_cache.py                  # the demo pair on the CPU (resnet10t / resnet18, 32 px)
    python benchmarks/teacher_cache.py --points 2 --epochs 1 --steps 3 --warmup 1 --runs 1   # a quick run

In one process, on the demo's digits (MDS shards, ``yamls/demo.yaml``'s recipe; the teacher's
weights are random unless ``--teacher-checkpoint``: the cost does not depend on them, the top-k
error does), every run built by ``builders.build_trainer``:

- the step, BATCH_START to BATCH_END (median after warm-up, runs interleaved): ``student_step_ms``
  (distillation off: no teacher at all, the limit), ``online_step_ms`` (the teacher runs),
  ``cache_step_ms`` (``algorithms.distillation.cache``: its logits are read, ahead of the step);
  ``cache_vs_student`` (target <= 1.03), ``read_path_ms`` = cache - student, ``cache_wait_ms``:
  what the step waited for storage, per step (the reader's own count);
- a ``--points``-point temperature sweep of whole demo runs (``--epochs``, evaluation included),
  interleaved point by point and repeated ``--sweep-runs`` times (each point's time: its median
  over the repeats; the sweep's: their sum): ``sweep_online_s`` (every point runs its teacher), ``sweep_cached_s``
  (the first point fills a cache as it trains, the others read it), ``sweep_floor_s`` (the first
  point online, the others with no teacher: the floor when the first point fills the cache; its
  first point is the online sweep's); ``sweep_cached_vs_floor`` (target <= 1.05) and
  ``sweep_cached_vs_online``;
- ``topk{k}_kd_rel_error_T{t}``: on a run reading the full cache, the mean over its steps of
  |kd(top-k) - kd(full)| / kd(full), the KD loss of the student's outputs against the top-k
  format's targets (``teacher_cache.decode``) vs every logit, for k in ``--topk`` and T in 1, 4;
  ``full_bytes_per_sample``, ``topk{k}_bytes_per_sample``: the outputs stored per sample per epoch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import timm
import torch
from _common import StepTimer, console_on_stderr, report, setup
from composer.core import Callback, State
from composer.loggers import Logger

from usi_composer.algorithms import kd_loss
from usi_composer.config import Config, load_config
from usi_composer.demo import data_overrides
from usi_composer.teacher_cache import TeacherCacheReader, decode, encode

YAML = Path(__file__).resolve().parents[1] / "yamls" / "demo.yaml"
CUDA_SIZES = dict(student="resnet50", teacher="resnet101", image_size=224, batch_size=128)
CPU_SIZES = dict(student="resnet10t", teacher="resnet18", image_size=32, batch_size=64)
TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 8.0)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="timm name (default: resnet10t on the CPU, resnet50 on CUDA)")
    parser.add_argument("--teacher", help="timm name (default: resnet18 on the CPU, resnet101 on CUDA)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per step run (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5, help="interleaved step runs; the median of run medians")
    parser.add_argument("--points", type=int, default=5, help="temperature sweep points (at most 5)")
    parser.add_argument("--epochs", type=int, help="each sweep point's epochs (default: the demo's)")
    parser.add_argument(
        "--sweep-runs", type=int, default=3, help="repeats of the sweeps; each point's time is its median"
    )
    parser.add_argument("--topk", default="1,2,5", help="k values of the top-k format's KD error")
    parser.add_argument(
        "--teacher-checkpoint",
        help="the teacher's weights (default: random: the cost does not depend on them, the top-k error does; "
        "the demo's own: .cache/usi-demo/teacher-seed0.pt, written by usi-demo)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    sizes = CUDA_SIZES if torch.cuda.is_available() else CPU_SIZES
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.points = max(1, min(args.points, len(TEMPERATURES)))
    return args


def config(base: list[str], *extra: str) -> Config:
    return load_config(YAML, [*base, *extra])


def fit(cfg: Config, *callbacks: Callback) -> tuple[float, Any]:
    """Train ``cfg`` as ``train.py`` does; the wall time and the trainer (closed)."""
    from usi_composer.training import train

    start = time.perf_counter()
    trainer = train(cfg, callbacks=list(callbacks), loggers=[console_on_stderr()])
    trainer.close()
    return time.perf_counter() - start, trainer


def step_ms(cfg: Config, warmup: int) -> tuple[float, float]:
    """The median step after ``warmup`` steps, and the reader's wait per step (0 without a cache), in ms."""
    timer = StepTimer()
    _, trainer = fit(cfg, timer)
    reader = next((c for c in trainer.state.callbacks if isinstance(c, TeacherCacheReader)), None)
    wait = 1000 * reader.wait_s / len(timer.times) if reader is not None else 0.0
    return timer.median_ms(warmup), wait


class TopKError(Callback):
    """At each step of a run reading a full cache: the KD loss against the top-k format's targets
    vs against every logit, as a relative error (no effect on training)."""

    def __init__(self, ks: list[int], temperatures: tuple[float, ...] = (1.0, 4.0)) -> None:
        self.ks, self.temperatures = ks, temperatures
        self.errors: dict[tuple[int, float], list[float]] = {(k, t): [] for k in ks for t in temperatures}
        self.bytes: dict[int, int] = {}
        self.full_bytes = 0
        self.samples = 0

    def after_loss(self, state: State, logger: Logger) -> None:
        reader = next(c for c in state.callbacks if isinstance(c, TeacherCacheReader))
        from composer.utils import dist

        key = (int(state.timestamp.epoch), int(state.timestamp.batch), dist.get_global_rank(), 0)
        full = reader(key)
        student = state.outputs.detach()
        self.samples += full.shape[0]
        self.full_bytes += full.numel() * full.element_size()
        for k in self.ks:
            parts = encode(full, "topk", k)
            self.bytes[k] = self.bytes.get(k, 0) + sum(t.numel() * t.element_size() for t in parts.values())
            approx = decode(parts, "topk", full.shape[-1])
            for t in self.temperatures:
                exact = kd_loss(student, full, t).item()
                self.errors[(k, t)].append(abs(kd_loss(student, approx, t).item() - exact) / exact)


def main() -> None:
    args = parse_args()
    setup(args)
    ks = [int(k) for k in args.topk.split(",") if k.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        from usi_composer.data import export_digits

        data = data_overrides(export_digits(Path(tmp) / "digits"))
        teacher = Path(args.teacher_checkpoint or Path(tmp) / "teacher.pt")
        if args.teacher_checkpoint is None:
            torch.manual_seed(0)
            torch.save(timm.create_model(args.teacher, num_classes=10).state_dict(), teacher)
        base = [
            *data,
            f"model.name={args.student}",
            f"teacher.name={args.teacher}",
            f"teacher.checkpoint={teacher}",
            f"data.image_size={args.image_size}",
            f"trainer.global_batch_size={args.batch_size}",
            f"optimizer.reference_batch_size={args.batch_size}",
            f"algorithms.ema.reference_batch_size={args.batch_size}",
            "trainer.progress_bar=false",
            "trainer.device=gpu" if torch.cuda.is_available() else "trainer.device=cpu",
            "trainer.precision=amp_bf16" if torch.cuda.is_available() else "trainer.precision=fp32",
        ]
        cache = str(Path(tmp) / "cache")
        steps = [f"trainer.max_duration={args.warmup + args.steps}ba", "data.streaming.val_split=null"]
        # the step: the cache is filled once (untimed), then the three steps interleaved
        fit(config(base, *steps, f"algorithms.distillation.cache_write={cache}-steps"))
        step_runs: dict[str, list[float]] = {"student": [], "online": [], "cache": []}
        waits: list[float] = []
        for _ in range(args.runs):
            no_teacher = config(base, *steps, "algorithms.distillation.enabled=false")
            step_runs["student"].append(step_ms(no_teacher, args.warmup)[0])
            step_runs["online"].append(step_ms(config(base, *steps), args.warmup)[0])
            ms, wait = step_ms(config(base, *steps, f"algorithms.distillation.cache={cache}-steps"), args.warmup)
            step_runs["cache"].append(ms)
            waits.append(wait)
        student, online, cached = (statistics.median(step_runs[k]) for k in ("student", "online", "cache"))

        # the sweep, point by point: online, cached (first point fills), floor (first point online, rest no
        # teacher), repeated; each point's time is its median over the repeats (a shared machine's load drifts)
        epochs = [f"trainer.max_duration={args.epochs}ep"] if args.epochs else []
        times: dict[tuple[str, int], list[float]] = {}
        for repeat in range(args.sweep_runs):
            for i, temperature in enumerate(TEMPERATURES[: args.points]):
                point = [*epochs, f"algorithms.distillation.temperature={temperature}"]
                times.setdefault(("online", i), []).append(fit(config(base, *point))[0])
                role = "cache_write" if i == 0 else "cache"
                filled = f"algorithms.distillation.{role}={cache}-{repeat}"
                times.setdefault(("cached", i), []).append(fit(config(base, *point, filled))[0])
                if i:
                    no_teacher = config(base, *point, "algorithms.distillation.enabled=false")
                    times.setdefault(("floor", i), []).append(fit(no_teacher)[0])
        times[("floor", 0)] = times[("online", 0)]  # the floor's first point is the online one

        def sweep_s(kind: str) -> float:
            return sum(statistics.median(times[(kind, i)]) for i in range(args.points))

        # the top-k format's KD loss against the full one (untimed)
        topk = TopKError(ks)
        fit(config(base, *epochs, f"algorithms.distillation.cache={cache}-0"), topk)
        errors = {f"topk{k}_kd_rel_error_T{t:g}": statistics.fmean(v) for (k, t), v in topk.errors.items()}
        sizes = {f"topk{k}_bytes_per_sample": b / topk.samples for k, b in topk.bytes.items()}

    sweep_online, sweep_cached, sweep_floor = sweep_s("online"), sweep_s("cached"), sweep_s("floor")
    report(
        "teacher_cache",
        args,
        device="cuda" if torch.cuda.is_available() else "cpu",
        student_step_ms=student,
        online_step_ms=online,
        cache_step_ms=cached,
        cache_vs_student=cached / student,
        read_path_ms=cached - student,
        cache_wait_ms=statistics.median(waits),
        sweep_online_s=sweep_online,
        sweep_cached_s=sweep_cached,
        sweep_floor_s=sweep_floor,
        sweep_cached_vs_floor=sweep_cached / sweep_floor,
        sweep_cached_vs_online=sweep_cached / sweep_online,
        full_bytes_per_sample=topk.full_bytes / topk.samples,
        **sizes,
        **errors,
    )


if __name__ == "__main__":
    main()
