"""The embedded demo (``usi-demo``, ``make demo``): USI end to end on a small real dataset, on the CPU.

scikit-learn's handwritten digits (shipped inside the package, no download), upscaled to 32 px,
written in the ImageNet folder layout and converted to MDS shards as ImageNet would be. Runs
through the recipe's own ``train()``, only the yamls differ: a teacher (yamls/demo_teacher.yaml),
once, then the same student (yamls/demo.yaml) without and with USI distillation at each of a few
seeds. Each run shows one progress line; the result is a table of top-1 on the held-out split:
each student's mean and range over the seeds, and the KD gain paired by seed with its spread
(one seed's gain depends on the seed and on the CPU's float kernels; their mean much less).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from usi_composer.config import Config, load_config, packaged_yamls
from usi_composer.console import TrainingConsole
from usi_composer.errors import UsiError

if TYPE_CHECKING:
    from usi_composer.ablate.stats import Paired

__all__ = [
    "DemoResult",
    "data_overrides",
    "demo_overrides",
    "prepare_teacher",
    "quick_overrides",
    "run_demo",
    "teacher_checkpoint",
    "train_and_score",
]


# The two students of each seed, in the order they train: only the KD term differs.
_STUDENTS = (("student baseline", ["algorithms.distillation.enabled=false"]), ("student + USI distillation", []))


@dataclass
class DemoResult:
    """The teacher's top-1 (trained once) and each student's top-1 at each of ``seeds``, in that order."""

    teacher_top1: float
    seeds: list[int]
    baseline_top1: list[float]
    usi_top1: list[float]
    teacher: str
    student: str
    seconds: float

    def gain(self) -> Paired:
        """USI minus the baseline, paired by seed: both runs of a seed share the data order, the views and the
        mixing, so their difference is the KD term's doing; the spread over seeds is how much a seed moves it."""
        from usi_composer.ablate.stats import paired  # the sweep reports' statistics (scipy: imported when used)

        return paired(self.usi_top1, self.baseline_top1)

    def table(self) -> str:
        from statistics import fmean

        seeds = ", ".join(map(str, self.seeds))
        lines = [
            f"top-1 on the held-out split; students: mean and min-max over seeds {seeds}",
            f"{'run':<28}{'model':<12}{'mean':>7}   min-max",
            "-" * 68,
            f"{'teacher':<28}{self.teacher:<12}{self.teacher_top1:>7.1%}   (trained once, seed {self.seeds[0]})",
        ]
        for (run, _), top1 in zip(_STUDENTS, (self.baseline_top1, self.usi_top1), strict=True):
            lines.append(f"{run:<28}{self.student:<12}{fmean(top1):>7.1%}   {min(top1):.1%}-{max(top1):.1%}")
        gain = self.gain()
        diffs = [usi - base for usi, base in zip(self.usi_top1, self.baseline_top1, strict=True)]
        lines.append(
            f"KD gain (USI - baseline, paired by seed): {_points(gain.diff.mean)} points, "
            f"min {_points(min(diffs))}, max {_points(max(diffs))}; better at {gain.better} of {len(diffs)} seeds"
        )
        lines.append(f"({', '.join(map(_points, diffs))} at seeds {seeds}; total time {self.seconds:.0f} s)")
        return "\n".join(lines)


def _points(fraction: float) -> str:
    return f"{100 * fraction:+.1f}"


def train_and_score(cfg: Config, save_to: Path | None = None, label: str | None = None) -> float:
    """Train ``cfg`` through the recipe's ``train()``; return the final held-out top-1.
    ``label``: show the run's progress on one line (a bar on a terminal); None: say nothing."""
    from usi_composer.models import save_weights
    from usi_composer.training import final_top1, train

    console = TrainingConsole(label or "", log_interval=None, stream=None if label else io.StringIO())
    trainer = train(cfg, loggers=[console])
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
    seeds: Sequence[int] = (0, 1, 2),
    overrides: Sequence[str] = (),
    progress: bool = True,
    batches: int | None = None,
) -> DemoResult:
    """The teacher once (at the first of ``seeds``), then the baseline and the USI student at each seed;
    ``overrides`` apply to the student runs. ``progress``: one progress line per run (else nothing is
    printed). ``yamls``: the folder holding demo.yaml and demo_teacher.yaml (default: the recipe's own).
    ``batches``: each run trains that many batches only, a quick check that an install works (its
    accuracies mean nothing)."""
    from usi_composer.data import export_digits

    if not seeds:
        raise UsiError("usi-demo needs at least one seed")
    yamls = yamls or packaged_yamls()
    start = time.perf_counter()
    data_args = data_overrides(export_digits(workdir / "digits"))
    checkpoint = teacher_checkpoint(workdir, seeds[0], batches)
    quiet = ["trainer.progress_bar=false"]  # each stage's console speaks, in one line
    student_args = [*data_args, f"teacher.checkpoint={checkpoint}", *quiet, *quick_overrides(batches)]
    # Validate every config before the minutes of training start.
    teacher_cfg = load_config(yamls / "demo_teacher.yaml", [*data_args, *quiet, *quick_overrides(batches)])
    students = [
        (seed, run, load_config(yamls / "demo.yaml", [*student_args, f"trainer.seed={seed}", *kd, *overrides]))
        for seed in seeds
        for run, kd in _STUDENTS
    ]
    stages = 1 + len(students)

    def label(text: str) -> str | None:
        return text if progress else None

    _, _, teacher_top1 = prepare_teacher(workdir, yamls, seeds[0], quiet, label(f"1/{stages} teacher"), batches)
    if teacher_top1 is None:  # reused: score it again, cheaply, without training
        if progress:
            print(f"1/{stages} teacher: reusing {checkpoint}", flush=True)
        teacher_top1 = _score_checkpoint(teacher_cfg, checkpoint)
    top1: dict[str, list[float]] = {run: [] for run, _ in _STUDENTS}
    for stage, (seed, run, cfg) in enumerate(students, start=2):
        top1[run].append(train_and_score(cfg, label=label(f"{stage}/{stages} {run}, seed {seed}")))
    baseline, usi = (top1[run] for run, _ in _STUDENTS)
    student = students[0][2].model.name
    seconds = time.perf_counter() - start
    return DemoResult(teacher_top1, list(seeds), baseline, usi, teacher_cfg.model.name, student, seconds)


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
