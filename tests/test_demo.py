"""The embedded demo end to end: the teacher beats every baseline student, and USI distillation lifts the
same student above its baseline on average over the demo's seeds (0, 1, 2). One seed's gain depends on the
seed and on the CPU's float kernels, so no single seed's gain is asserted."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from usi_composer.cli.demo import main
from usi_composer.demo import DemoResult, run_demo

slow = pytest.mark.slow  # the whole demo: a teacher and six students


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoResult]:
    workdir = tmp_path_factory.mktemp("demo")
    return workdir, run_demo(workdir, progress=False)


@slow
def test_demo_distillation_beats_the_baseline_on_average(demo: tuple[Path, DemoResult]) -> None:
    workdir, result = demo
    assert result.seeds == [0, 1, 2] and len(result.baseline_top1) == len(result.usi_top1) == 3
    assert result.teacher_top1 > max(result.baseline_top1), result.table()
    # Both students of a seed share the data order, the views and the mixing: only the KD term differs.
    # So a KD term that has no effect gives a mean gain of exactly 0 and fails here, as a KD that harms does.
    # (On this project's 2-core machine: +0.7, +7.3 and +3.1 points at seeds 0, 1, 2, mean +3.7.)
    assert result.gain().diff.mean > 0, result.table()
    assert (workdir / "teacher-seed0.pt").is_file()


def _stage(label: str) -> str:
    """A stage's one line, as ``TrainingConsole`` ends a run (the KD run adds its CE and KD losses)."""
    losses = r"loss \d+\.\d{4}( \(ce \d+\.\d{4}, kd \d+\.\d{4}\))?"
    return rf"{re.escape(label)}: 2 batches in \d+:\d\d:\d\d, {losses}, [\d,]+ img/s, top-1 \d+\.\d\d%"


@slow
def test_demo_cli_reuses_the_teacher_and_prints_the_table(demo: tuple[Path, DemoResult], capsys) -> None:
    """What a person sees: one line per run (not a terminal here: printed when the run ends; evaluations
    are not said), then the table; no Composer config banner, no blank lines, nothing on stderr."""
    workdir, result = demo
    argv = ["--workdir", str(workdir), "--seeds", "0,1", "trainer.max_duration=2ba", "trainer.eval_interval=1ba"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert err == "" and "Config:" not in out and "" not in lines, out
    assert lines[0] == f"1/5 teacher: reusing {workdir / 'teacher-seed0.pt'}"
    stages = ["2/5 student baseline, seed 0", "3/5 student + USI distillation, seed 0"]
    stages += ["4/5 student baseline, seed 1", "5/5 student + USI distillation, seed 1"]
    for line, stage in zip(lines[1:5], stages, strict=True):
        assert re.fullmatch(_stage(stage), line), line
    assert lines[5] == "top-1 on the held-out split; students: mean and min-max over seeds 0, 1" and len(lines) == 13
    teacher_row = next(line for line in lines if line.startswith("teacher "))
    assert f"{result.teacher_top1:.1%}" in teacher_row, "the reused teacher scores as after training"
    assert re.fullmatch(r"KD gain \(USI - baseline, paired by seed\): [+-]\d+\.\d points, .* of 2 seeds", lines[11])


def test_the_table_shows_each_students_mean_and_range_and_the_paired_gain() -> None:
    result = DemoResult(0.978, [0, 1, 2], [0.929, 0.851, 0.900], [0.936, 0.840, 0.950], "resnet18", "resnet10t", 123.4)
    assert result.table().splitlines() == [
        "top-1 on the held-out split; students: mean and min-max over seeds 0, 1, 2",
        "run                         model          mean   min-max",
        "-" * 68,
        "teacher                     resnet18      97.8%   (trained once, seed 0)",
        "student baseline            resnet10t     89.3%   85.1%-92.9%",
        "student + USI distillation  resnet10t     90.9%   84.0%-95.0%",
        "KD gain (USI - baseline, paired by seed): +1.5 points, min -1.1, max +5.0; better at 2 of 3 seeds",
        "(+0.7, -1.1, +5.0 at seeds 0, 1, 2; total time 123 s)",
    ]


def test_demo_bad_override_or_seeds_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["--workdir", str(tmp_path), "model.nme=x"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: override 'model.nme=x': model.nme: unknown key 'nme' (did you mean 'name'?)"
    )
    assert main(["--workdir", str(tmp_path), "--seeds", ","]) == 2
    assert capsys.readouterr().err.strip() == "error: usi-demo needs at least one seed"
    with pytest.raises(SystemExit) as exit_:
        main(["--seeds", "0,one"])
    assert exit_.value.code == 2 and "expected comma-separated integers, got '0,one'" in capsys.readouterr().err
