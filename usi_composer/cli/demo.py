"""``usi-demo`` (``make demo``): USI end to end on a small real dataset, on the CPU, in minutes.

scikit-learn's handwritten digits (shipped inside the package, no download), upscaled to 32 px
and written in the ImageNet folder layout. Three runs through the same ``train.py`` code path
as ImageNet, only the yamls differ: a teacher (yamls/demo_teacher.yaml), then the same student
(yamls/demo.yaml) without and with USI distillation. Prints top-1 on the held-out split.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from usi_composer import redaction
from usi_composer.config import Config, load_config
from usi_composer.errors import UsiError, error_line

__all__ = [
    "DemoResult",
    "data_overrides",
    "main",
    "prepare_teacher",
    "run_demo",
    "teacher_checkpoint",
    "train_and_score",
]

REPO_YAMLS = Path(__file__).resolve().parents[2] / "yamls"


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


def train_and_score(cfg: Config, save_to: Path | None = None) -> float:
    """Train ``cfg`` through the recipe's ``train()``; return the final held-out top-1."""
    from usi_composer.cli.train import final_top1, train
    from usi_composer.models import save_weights

    trainer = train(cfg)
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


def teacher_checkpoint(workdir: Path, seed: int) -> Path:
    return workdir / f"teacher-seed{seed}.pt"


def prepare_teacher(
    workdir: Path, yamls: Path = REPO_YAMLS, seed: int = 0, overrides: Sequence[str] = ()
) -> tuple[Path, Path, float | None]:
    """Export the digits and train the demo teacher unless ``workdir`` already has both.

    Returns (data root, teacher checkpoint, teacher top-1 or None if reused).
    """
    from usi_composer.data import export_digits

    data_root = export_digits(workdir / "digits")
    checkpoint = teacher_checkpoint(workdir, seed)
    if checkpoint.is_file():
        return data_root, checkpoint, None
    cfg = load_config(yamls / "demo_teacher.yaml", [*data_overrides(data_root), f"trainer.seed={seed}", *overrides])
    partial = checkpoint.with_suffix(".partial")
    top1 = train_and_score(cfg, save_to=partial)
    partial.rename(checkpoint)  # only a finished teacher is ever reused
    return data_root, checkpoint, top1


def run_demo(workdir: Path, yamls: Path = REPO_YAMLS, seed: int = 0, overrides: Sequence[str] = ()) -> DemoResult:
    """Teacher, baseline student, USI student; ``overrides`` apply to the student runs."""
    from usi_composer.data import export_digits

    start = time.perf_counter()
    data_args = data_overrides(export_digits(workdir / "digits"))
    checkpoint = teacher_checkpoint(workdir, seed)
    student_args = [*data_args, f"trainer.seed={seed}", f"teacher.checkpoint={checkpoint}"]
    # Validate every config before the minutes of training start.
    teacher_cfg = load_config(yamls / "demo_teacher.yaml", data_args)
    baseline = load_config(yamls / "demo.yaml", [*student_args, "algorithms.distillation.enabled=false", *overrides])
    usi = load_config(yamls / "demo.yaml", [*student_args, *overrides])

    _banner("1/3 teacher (yamls/demo_teacher.yaml)")
    _, _, teacher_top1 = prepare_teacher(workdir, yamls, seed)
    if teacher_top1 is None:  # reused: score it again, cheaply, without training
        print(f"reusing {checkpoint}", flush=True)
        teacher_top1 = _score_checkpoint(teacher_cfg, checkpoint)
    _banner("2/3 student baseline (yamls/demo.yaml, algorithms.distillation.enabled=false)")
    baseline_top1 = train_and_score(baseline)
    _banner("3/3 student + USI distillation (yamls/demo.yaml)")
    usi_top1 = train_and_score(usi)
    return DemoResult(
        teacher_top1, baseline_top1, usi_top1, teacher_cfg.model.name, usi.model.name, time.perf_counter() - start
    )


def _score_checkpoint(cfg: Config, checkpoint: Path) -> float:
    cfg.model.checkpoint = str(checkpoint)
    cfg.trainer.max_duration = "0ba"
    from usi_composer.builders import build_trainer

    cfg.algorithms.ema.enabled = False  # plain weights: score the checkpoint as it is
    cfg.trainer.progress_bar = False  # one quick eval pass
    trainer = build_trainer(cfg)
    trainer.eval()
    top1 = float(trainer.state.eval_metrics["eval"]["top1"].compute())
    trainer.close()
    return top1


def _banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    redaction.install()
    parser = argparse.ArgumentParser(prog="usi-demo", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".cache/usi-demo"),
        help="where the digits and the teacher's weights go (reused when present)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--yamls", type=Path, default=REPO_YAMLS, help="folder holding demo.yaml, demo_teacher.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for the two student runs")
    args = parser.parse_args(argv)
    try:
        result = run_demo(args.workdir, args.yamls, args.seed, args.overrides)
    except UsiError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    print("\n" + result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
