"""``--dry-run`` is the real pre-flight: what would stop the run seconds in stops it here, in one line,
exit 2, without weights, data loading or network; and every config field declares its role, so what
autoresume refuses and what a teacher cache compares are queries, not lists."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from helpers import DEMO_CPU, NUM_CLASSES, REPO, STUDENT, TEACHER, one_error_line, tiny_run
from usi_composer.checkpoints import first_math_change
from usi_composer.cli.train import main
from usi_composer.config import ROLES, Config, DataConfig, config_to_dict, leaf_fields, load_config
from usi_composer.config.fields import teacher_input, undeclared
from usi_composer.plan import RunPlan, resolve
from usi_composer.teacher_cache import fingerprint

DEMO = "yamls/demo.yaml"


@pytest.fixture(scope="module")
def run(tiny_folder: Path, saved_teacher) -> list[str]:
    """A run that passes the pre-flight: the demo recipe on a tiny folder of 4 classes, a saved teacher."""
    return tiny_run(tiny_folder, teacher_weights=saved_teacher(TEACHER, NUM_CLASSES), **DEMO_CPU)


def test_a_run_that_can_start_passes(run: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([DEMO, *run, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert f"model:\n  name: {STUDENT}" in out and "# the run plan" in out and "# lr: " in out
    assert err.splitlines()[0].startswith(f"student {STUDENT}: ")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.train_dir=/nope"], "error: data.train_dir: no such folder: /nope"),
        (["data.num_classes=6"], "error: data.num_classes: is 6, but "),
        (
            ["teacher.name=resnet10t", "teacher.checkpoint=null", "teacher.pretrained=true"],
            "error: teacher.pretrained: the pretrained weights of teacher resnet10t classify 1000 classes",
        ),
        (["teacher.checkpoint=/nope/teacher.pt"], "error: teacher.checkpoint: checkpoint not found: /nope/teacher.pt"),
        (["trainer.max_duration=2"], "error: override 'trainer.max_duration=2': trainer.max_duration: must be a "),
        (["model.kwargs.dropp_rate=0.1"], "error: model.kwargs.dropp_rate: not an argument of the timm model's"),
        (["teacher.kwargs.dropp_rate=0.1"], "error: teacher.kwargs.dropp_rate: not an argument of the timm model's"),
    ],
)
def test_what_would_stop_the_run_stops_the_dry_run(
    run: list[str], overrides: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([DEMO, *run, *overrides, "--dry-run"]) == 2
    out, err = capsys.readouterr()
    line = one_error_line(err)
    assert line.startswith(expected), line
    assert out == "" and "Traceback" not in err


def test_a_checkpoint_of_another_model_is_refused_before_it_loads(
    run: list[str], saved_teacher, capsys: pytest.CaptureFixture[str]
) -> None:
    other = saved_teacher("resnet18", NUM_CLASSES)  # the teacher is a resnet10t
    assert main([DEMO, *run, f"teacher.checkpoint={other}", "--dry-run"]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"error: teacher.checkpoint: {other} does not fit ")


def test_a_save_folder_with_checkpoints_needs_autoresume_or_overwrite(
    run: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "ep0-ba2-rank0.pt").write_bytes(b"a checkpoint")
    save = [f"trainer.save_folder={tmp_path}", "trainer.run_name=tiny"]
    assert main([DEMO, *run, *save, "--dry-run"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: trainer.save_folder: {tmp_path} already holds checkpoints: set trainer.autoresume")
    assert "trainer.save_overwrite=true" in line
    assert main([DEMO, *run, *save, "trainer.save_overwrite=true", "--dry-run"]) == 0


# --------------------------------------------------------------------------- roles


def test_every_field_of_the_schema_and_the_plan_declares_its_role() -> None:
    assert undeclared(Config) == [] and undeclared(RunPlan) == []
    assert all(leaf.role in ROLES for leaf in leaf_fields(Config))

    @dataclasses.dataclass
    class Careless:
        declared: int = teacher_input(0)
        forgotten: int = 0  # a field added without a role

    assert undeclared(Careless) == ["forgotten"]


def test_a_new_teacher_input_key_is_fingerprinted_without_touching_the_cache() -> None:
    """A key added to the schema as teacher_input is in the fingerprint: nothing else is edited."""

    @dataclasses.dataclass
    class DataWithBlur(DataConfig):
        blur: float = teacher_input(0.0)

    cfg = load_config(DEMO)
    plan = resolve(cfg)
    cfg.data = DataWithBlur(**dataclasses.asdict(cfg.data) | {"streaming": cfg.data.streaming})
    items = fingerprint(cfg, plan, {"data": "d"}, None)
    assert items["data.blur"] == 0.0
    assert "data.image_size" in items and "algorithms.distillation.alpha" not in items  # math, not teacher input
    assert "plan.student_mean" in items and "plan.lr" not in items


def test_speed_window_is_free_and_not_fingerprinted() -> None:
    """``trainer.speed_window``, a key added by touching only the schema and its one user (builders)."""
    base, changed = load_config(DEMO), load_config(DEMO, ["trainer.speed_window=5"])
    assert first_math_change(config_to_dict(base), config_to_dict(changed)) is None
    assert "trainer.speed_window" not in fingerprint(changed, resolve(changed), {"data": "d"}, None)


# --------------------------------------------------------------------------- the house


def _python_files() -> list[Path]:
    return [*sorted((REPO / "usi_composer").rglob("*.py")), *sorted((REPO / "algorithms").rglob("*.py"))]


def test_no_module_is_over_500_lines_and_no_function_over_60() -> None:
    long_files = [str(p.relative_to(REPO)) for p in _python_files() if len(p.read_text().splitlines()) > 500]
    long_functions = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            is_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            argument_table = path.parent.name == "cli" and getattr(node, "name", "") in ("parse_args", "build_parser")
            if is_function and node.end_lineno - node.lineno >= 60 and not argument_table:
                long_functions.append(f"{path.relative_to(REPO)}:{node.name}")
    assert long_files == [] and long_functions == []


def test_a_warmup_flattened_by_a_small_batch_is_said_once(run: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """``scheduler.warmup_lr`` is absolute: at global batch 8 the scaled peak (2e-3 * 8 / 1024) is below it."""
    plan = resolve(load_config("yamls/usi.yaml", ["trainer.global_batch_size=8", "trainer.device=cpu"]))
    (note,) = [n for n in plan.notes if n.startswith("scheduler.warmup_lr")]
    assert note.startswith("scheduler.warmup_lr=0.0001 is not below the scaled learning rate 1.5625e-05 ")
    assert "set scheduler.warmup_lr below 1.5625e-05" in note and plan.warmup_from == 1.0
    assert not any(n.startswith("scheduler.") for n in resolve(load_config("yamls/usi.yaml")).notes)
    assert main([DEMO, *run, "scheduler.warmup_lr=1", "--dry-run"]) == 0
    assert sum("scheduler.warmup_lr=1" in line for line in capsys.readouterr().err.splitlines()) == 1


def test_automatic_microbatching_needs_cuda(run: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Composer's automatic microbatching works on CUDA only (tests/test_gpu.py runs it there)."""
    assert main([DEMO, *run, "trainer.microbatch_size=auto", "trainer.device=cpu", "--dry-run"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: trainer.microbatch_size: auto (Composer's automatic microbatching) needs CUDA: ")
    assert main([DEMO, *run, "trainer.microbatch_size=0", "--dry-run"]) == 2
    assert "must be a number of samples > 0, auto or null, got 0" in one_error_line(capsys.readouterr().err)
