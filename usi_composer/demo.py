"""The embedded demo (``usi-demo``, ``make demo``): USI end to end on a small real dataset, on the CPU.

scikit-learn's handwritten digits (shipped inside the package, no download), upscaled to 32 px,
written in the ImageNet folder layout and converted to MDS shards as ImageNet would be. Three runs
through the recipe's own ``train()``, only the yamls differ: a teacher (yamls/demo_teacher.yaml),
then the same student (yamls/demo.yaml) without and with USI distillation. Each run shows one
progress line; the result is a table of top-1 on the held-out split.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State, TimeUnit
from composer.loggers import Logger

from usi_composer.algorithms import BestOfEMAAndRaw
from usi_composer.config import Config, load_config, packaged_yamls

__all__ = [
    "DemoResult",
    "RunProgress",
    "data_overrides",
    "demo_overrides",
    "prepare_teacher",
    "quick_overrides",
    "run_demo",
    "teacher_checkpoint",
    "train_and_score",
]


@dataclass
class DemoResult:
    teacher_top1: float
    baseline_top1: float
    usi_top1: float
    teacher: str
    student: str
    seconds: float

    def table(self) -> str:
        rows = [
            ("teacher", self.teacher, self.teacher_top1),
            ("student baseline", self.student, self.baseline_top1),
            ("student + USI distillation", self.student, self.usi_top1),
        ]
        lines = [f"{'run':<28}{'model':<24}{'top-1 (held-out)':>16}", "-" * 68]
        lines += [f"{run:<28}{model:<24}{top1:>15.1%}" for run, model, top1 in rows]
        lines.append(
            f"KD gain over the baseline: {self.usi_top1 - self.baseline_top1:+.1%}   (total time {self.seconds:.0f} s)"
        )
        return "\n".join(lines)


class RunProgress(Callback):
    """One progress line for a whole training run, for a person (the demo): the batches done out of
    all of them, the loss, then the held-out top-1 of each evaluation.

    On a terminal it is one bar redrawn in place; elsewhere (a log file, CI) one line when the run
    ends. Composer's own progress bars (``trainer.progress_bar``) print a bar per epoch and a config
    banner, which suit a long run's log better than a demo. Reads the loss from the device every
    ``loss_every`` batches only (each read waits for the device).
    """

    def __init__(self, label: str, stream: Any = None, loss_every: int = 10) -> None:
        self.label, self.loss_every = label, loss_every
        self.stream = stream if stream is not None else sys.stdout
        self._bar: Any = None
        self._start = 0.0
        self._done = 0
        self._facts: dict[str, str] = {}

    def fit_start(self, state: State, logger: Logger) -> None:
        from tqdm import tqdm

        self._start, self._done = time.perf_counter(), int(state.timestamp.batch)
        if _isatty(self.stream):
            self._bar = tqdm(
                total=_total_batches(state), initial=self._done, desc=self.label, unit="ba", file=self.stream
            )

    def batch_end(self, state: State, logger: Logger) -> None:
        self._done += 1
        if (self._done % self.loss_every == 0 or self._done == 1) and isinstance(state.loss, torch.Tensor):
            self._facts["loss"] = f"{float(state.loss.detach().mean()):.3f}"
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(self._facts, refresh=False)

    def eval_after_all(self, state: State, logger: Logger) -> None:
        # the number the run reports: the better of EMA and raw weights where both were validated
        # (BestOfEMAAndRaw, a callback registered before this one, has compared them by now)
        best = next((c for c in state.callbacks if isinstance(c, BestOfEMAAndRaw)), None)
        label, metrics = next(iter(state.eval_metrics.items()), ("", {}))
        if best is not None and label in best.scores:
            self._facts["top-1"] = f"{max(best.scores[label].values()):.1%}"
        elif "top1" in metrics:
            self._facts["top-1"] = f"{float(metrics['top1'].compute()):.1%}"
        if self._bar is not None:
            self._bar.set_postfix(self._facts)

    def fit_end(self, state: State, logger: Logger) -> None:
        if self._bar is not None:
            self._bar.close()
            return
        facts = ", ".join(f"{k} {v}" for k, v in self._facts.items())
        seconds = time.perf_counter() - self._start
        batches = f"{self._done} batch{'es' if self._done != 1 else ''}"
        print(f"{self.label}: {batches} in {seconds:.0f} s ({facts})", file=self.stream, flush=True)


def _isatty(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _total_batches(state: State) -> int | None:
    duration, per_epoch = state.max_duration, state.dataloader_len
    if duration is None:
        return None
    if duration.unit == TimeUnit.BATCH:
        return int(duration.value)
    if duration.unit == TimeUnit.EPOCH and per_epoch is not None:
        return int(duration.value) * int(per_epoch)
    return None


def train_and_score(cfg: Config, save_to: Path | None = None, label: str | None = None) -> float:
    """Train ``cfg`` through the recipe's ``train()``; return the final held-out top-1.
    ``label``: show the run's progress on one line (:class:`RunProgress`)."""
    from usi_composer.models import save_weights
    from usi_composer.training import final_top1, train

    callbacks = [RunProgress(label)] if label else []
    trainer = train(cfg, callbacks=callbacks)
    top1 = final_top1(trainer)
    if save_to is not None:
        save_weights(trainer, save_to)
    trainer.close()
    return top1


def data_overrides(data_root: Path) -> list[str]:
    """The digits go through the same MDS path as ImageNet from object storage (usi-convert-imagenet)."""
    from usi_composer.data.convert import convert_imagenet

    mds = data_root.with_name(f"{data_root.name}-mds")
    convert_imagenet(data_root, str(mds), workers=1, progress=False)  # complete splits are reused
    return [f"data.local={mds}"]


def teacher_checkpoint(workdir: Path, seed: int, batches: int | None = None) -> Path:
    """Where the demo keeps its teacher; a quick check's (``batches``) under its own name, never reused
    as the real one."""
    return workdir / f"teacher-seed{seed}{f'-{batches}ba' if batches else ''}.pt"


def prepare_teacher(
    workdir: Path,
    yamls: Path | None = None,
    seed: int = 0,
    overrides: Sequence[str] = (),
    label: str | None = None,
    batches: int | None = None,
) -> tuple[Path, Path, float | None]:
    """Export the digits and train the demo teacher unless ``workdir`` already has both.

    Returns (data root, teacher checkpoint, teacher top-1 or None if reused). ``yamls``: the folder
    holding demo_teacher.yaml (default: the recipe's own). ``batches``: train for that many batches
    only (:func:`quick_overrides`).
    """
    from usi_composer.data import export_digits

    yamls = yamls or packaged_yamls()
    data_root = export_digits(workdir / "digits")
    checkpoint = teacher_checkpoint(workdir, seed, batches)
    if checkpoint.is_file():
        return data_root, checkpoint, None
    args = [*data_overrides(data_root), f"trainer.seed={seed}", *overrides, *quick_overrides(batches)]
    cfg = load_config(yamls / "demo_teacher.yaml", args)
    # save_weights writes atomically and only after training: only a finished teacher is ever reused
    top1 = train_and_score(cfg, save_to=checkpoint, label=label)
    return data_root, checkpoint, top1


def quick_overrides(batches: int | None) -> list[str]:
    """A quick check of an install: ``batches`` training batches and one evaluation batch per run."""
    if not batches:
        return []
    return [
        f"trainer.max_duration={batches}ba",
        f"trainer.eval_interval={batches}ba",
        "trainer.eval_subset_num_batches=1",
    ]


def demo_overrides(base: Path, workdir: Path, echo: Callable[[str], None] = print) -> list[str]:
    """Data and teacher overrides for a sweep over the demo's student yaml (``usi-ablate`` with
    ``--base yamls/demo.yaml``), prepared as ``usi-demo`` does; none for any other base."""
    if base.name != "demo.yaml" or not (base.parent / "demo_teacher.yaml").is_file():
        return []
    echo(f"demo: preparing the digits and the teacher in {workdir} (reused when present)")
    data_root, checkpoint, top1 = prepare_teacher(workdir, base.parent)
    if top1 is not None:
        echo(f"demo: teacher trained, top-1 {top1:.4f}")
    return [*data_overrides(data_root), f"teacher.checkpoint={checkpoint}"]


def run_demo(
    workdir: Path,
    yamls: Path | None = None,
    seed: int = 0,
    overrides: Sequence[str] = (),
    progress: bool = True,
    batches: int | None = None,
) -> DemoResult:
    """Teacher, baseline student, USI student; ``overrides`` apply to the student runs.
    ``progress``: one progress line per run (else nothing is printed). ``yamls``: the folder holding
    demo.yaml and demo_teacher.yaml (default: the recipe's own). ``batches``: each run trains that
    many batches only, a quick check that an install works (its accuracies mean nothing)."""
    from usi_composer.data import export_digits

    yamls = yamls or packaged_yamls()
    start = time.perf_counter()
    data_args = data_overrides(export_digits(workdir / "digits"))
    checkpoint = teacher_checkpoint(workdir, seed, batches)
    quiet = ["trainer.progress_bar=false", "trainer.log_to_console=false"]  # RunProgress speaks instead
    student_args = [*data_args, f"trainer.seed={seed}", f"teacher.checkpoint={checkpoint}", *quiet]
    student_args += quick_overrides(batches)
    # Validate every config before the minutes of training start.
    teacher_cfg = load_config(yamls / "demo_teacher.yaml", [*data_args, *quiet, *quick_overrides(batches)])
    baseline = load_config(yamls / "demo.yaml", [*student_args, "algorithms.distillation.enabled=false", *overrides])
    usi = load_config(yamls / "demo.yaml", [*student_args, *overrides])

    def label(text: str) -> str | None:
        return text if progress else None

    _, _, teacher_top1 = prepare_teacher(workdir, yamls, seed, quiet, label("1/3 teacher"), batches)
    if teacher_top1 is None:  # reused: score it again, cheaply, without training
        if progress:
            print(f"1/3 teacher: reusing {checkpoint}", flush=True)
        teacher_top1 = _score_checkpoint(teacher_cfg, checkpoint)
    baseline_top1 = train_and_score(baseline, label=label("2/3 student baseline"))
    usi_top1 = train_and_score(usi, label=label("3/3 student + USI distillation"))
    return DemoResult(
        teacher_top1, baseline_top1, usi_top1, teacher_cfg.model.name, usi.model.name, time.perf_counter() - start
    )


def _score_checkpoint(cfg: Config, checkpoint: Path) -> float:
    from usi_composer.builders import build_trainer

    cfg.model.checkpoint = str(checkpoint)
    cfg.trainer.max_duration = "0ba"
    cfg.algorithms.ema.enabled = False  # plain weights: score the checkpoint as it is
    trainer = build_trainer(cfg)
    trainer.eval()
    top1 = float(trainer.state.eval_metrics["eval"]["top1"].compute())
    trainer.close()
    return top1
