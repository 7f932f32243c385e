"""The embedded demo (``usi-demo``, ``make demo``): USI end to end on a small real dataset, on the CPU.

scikit-learn's handwritten digits (shipped inside the package, no download), upscaled to 32 px,
written in the ImageNet folder layout and converted to MDS shards as ImageNet would be. Three runs
through the recipe's own ``train()``, only the yamls differ: a teacher (yamls/demo_teacher.yaml),
then the same student (yamls/demo.yaml) without and with USI distillation. Each run shows one
progress line; the result is a table of top-1 on the held-out split.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from usi_composer.config import Config, load_config, packaged_yamls
from usi_composer.console import TrainingConsole

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
    quiet = ["trainer.progress_bar=false"]  # each stage's console speaks, in one line
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
