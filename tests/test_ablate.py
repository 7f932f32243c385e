"""The sweep files and the local grid runner (usi-ablate)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image
import pytest
import yaml
from _ablate_helpers import DEMO_YAML, NUM_CLASSES, REPO, TEACHER, tiny_image_folder, tiny_overrides

from usi_composer.ablate import Sweep, grid, load_sweep, plot, point_args, run_sweep, table
from usi_composer.cli import ablate as ablate_cli
from usi_composer.config import load_config

SWEEPS = REPO / "yamls" / "sweeps"
PAPER_GRIDS = {
    "epochs": ("trainer.max_duration", ["100ep", "200ep", "300ep", "600ep", "1000ep"]),
    "temperature": ("algorithms.distillation.temperature", [0.5, 1.0, 2.0, 4.0]),
    "alpha": ("algorithms.distillation.alpha", [1.0, 2.5, 5.0, 10.0]),
    "kd_only": ("algorithms.distillation.ce_weight", [0.0, 1.0]),
}


@pytest.mark.parametrize("name", [*PAPER_GRIDS, "backbones"])
def test_sweep_files_are_wandb_grids_over_the_recipe(name: str) -> None:
    doc = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())
    assert doc["method"] == "grid"
    assert doc["command"] == ["composer", "train.py", "yamls/usi.yaml", "${args_no_hyphens}"]
    assert doc["metric"] == {"name": "metrics/eval_best/top1", "goal": "maximize"}
    sweep = load_sweep(SWEEPS / f"{name}.yaml")
    if name in PAPER_GRIDS:
        assert sweep.parameters == dict([PAPER_GRIDS[name]])
    # Every point is a valid config for the yaml the command names (unknown keys would fail here).
    for params in grid(sweep.parameters):
        cfg = load_config(REPO / "yamls" / "usi.yaml", point_args(params))
        for key, value in params.items():
            section, *rest = key.split(".")
            node = getattr(cfg, section)
            for part in rest:
                node = getattr(node, part)
            assert node == value


def test_points_are_formatted_as_wandb_agent_formats_them() -> None:
    params = {"algorithms.distillation.temperature": 0.5, "trainer.max_duration": "100ep", "a.b": True}
    assert point_args(params) == ["algorithms.distillation.temperature=0.5", "trainer.max_duration=100ep", "a.b=True"]
    assert grid({"a": [1, 2], "b": ["x", "y"]}) == [
        {"a": 1, "b": "x"},
        {"a": 1, "b": "y"},
        {"a": 2, "b": "x"},
        {"a": 2, "b": "y"},
    ]


@pytest.mark.parametrize(
    ("content", "args", "message"),
    [
        (None, [], "no such sweep file"),
        ("method: random\nparameters: {a: {values: [1]}}\n", [], "runs grids only"),
        ("method: grid\nparameters: {a: {min: 0, max: 1}}\n", [], "a grid needs 'values"),
        ("method: grid\nparameters: [1, 2]\n", [], "parameters: expected a mapping"),
        ("method: grid\nparameters: {a: {values: [1\n", [], "not valid YAML"),
        (
            "method: grid\nparameters: {algorithms.distillation.temprature: {values: [1.0]}}\n",
            [],
            "unknown key 'temprature' (did you mean 'temperature'?)",
        ),
        (
            "method: grid\nparameters: {algorithms.distillation.alpha: {values: [-1.0]}}\n",
            [],
            "algorithms.distillation.alpha: must be >= 0",
        ),
        (
            "method: grid\nparameters: {algorithms.distillation.alpha: {values: [1.0]}}\n",
            ["--values", "trainer.seed=1,2"],
            "'trainer.seed' is not swept",
        ),
    ],
)
def test_bad_sweeps_stop_with_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, args: list[str], message: str
) -> None:
    path = tmp_path / "sweep.yaml"
    if content is not None:
        path.write_text(content)
    code = ablate_cli.main([str(path), "--base", str(REPO / "yamls" / "usi.yaml"), "--out", str(tmp_path), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and "\n" not in err and message in err
    assert not (tmp_path / "results.jsonl").exists()  # nothing ran


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, saved_teacher) -> dict:
    tmp = tmp_path_factory.mktemp("ablate")
    data = tiny_image_folder(tmp / "data")
    return {"tmp": tmp, "data": data, "teacher": saved_teacher(TEACHER, NUM_CLASSES)}


def test_two_point_grid_runs_logs_to_wandb_and_is_skipped_when_rerun(
    tiny: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tiny["tmp"] / "two"
    path = tiny["tmp"] / "temperature.yaml"
    path.write_text((SWEEPS / "temperature.yaml").read_text())
    from usi_composer.ablate import replace_values

    sweep = replace_values(load_sweep(path), ["algorithms.distillation.temperature=1.0,4.0"])
    overrides = [*tiny_overrides(tiny["data"], tiny["teacher"]), f"loggers.wandb.dir={tiny['tmp'] / 'wb'}"]
    lines: list[str] = []
    rows = run_sweep(sweep, DEMO_YAML, overrides, out, echo=lines.append)

    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [r["params"]["algorithms.distillation.temperature"] for r in rows] == [1.0, 4.0]
    for r in rows:  # USI's number: the better of the EMA weights (metrics/eval) and the raw ones
        assert 0 <= r["metrics"]["metrics/eval/top1"] <= r["metrics"]["metrics/eval_best/top1"] <= 1
    stored = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert stored == rows
    # Each point is a normal run, logged to W&B with its own temperature, grouped by the sweep.
    from usi_composer.tracking import read_wandb_run

    for row in rows:
        run = read_wandb_run(row["wandb_run_dir"])
        assert run["config"]["algorithms"]["distillation"]["temperature"] == row["params"][sweep_key(sweep)]
        assert run["group"] == "usi-temperature"
        assert run["summary"]["metrics/eval/top1"] == pytest.approx(row["metrics"]["metrics/eval/top1"])

    lines.clear()
    again = run_sweep(sweep, DEMO_YAML, overrides, out, echo=lines.append)
    assert again == rows
    assert sum("done before, skipped" in line for line in lines) == 2 and not any("running" in ln for ln in lines)
    assert len((out / "results.jsonl").read_text().splitlines()) == 2

    md = table(sweep, rows)
    assert "| algorithms.distillation.temperature | metrics/eval_best/top1 | runs | failed |" in md
    assert f"| 4.0 | {rows[1]['metrics']['metrics/eval_best/top1']:.4f} | 1 | 0 |" in md
    png = plot(sweep, rows, out / "t.png")
    assert matplotlib.image.imread(png).ndim == 3


def sweep_key(sweep: Sweep) -> str:
    return next(iter(sweep.parameters))


def test_runner_survives_a_failing_point_and_retries_it(
    tiny: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the CLI with the demo's yaml: the demo's data/teacher come from prepare_teacher."""
    later = tmp_path / "val-later"  # a val folder that does not exist yet: that point fails
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "fail-then-ok",
                "method": "grid",
                "metric": {"name": "metrics/eval/top1", "goal": "maximize"},
                "parameters": {"data.val_dir": {"values": [str(later), str(tiny["data"] / "val")]}},
                "command": ["composer", "train.py", "yamls/usi.yaml", "${args_no_hyphens}"],
            }
        )
    )
    calls = []

    def fake_prepare_teacher(workdir: Path, yamls: Path, seed: int = 0) -> tuple[Path, Path, None]:
        calls.append((workdir, yamls))
        return tiny["data"], tiny["teacher"], None

    import usi_composer.cli.demo

    monkeypatch.setattr(usi_composer.cli.demo, "prepare_teacher", fake_prepare_teacher)
    tiny_args = [o for o in tiny_overrides(tiny["data"], tiny["teacher"]) if not o.startswith(("data.", "teacher.ch"))]
    args = [str(sweep), "--base", str(DEMO_YAML), "--out", str(tmp_path / "out"), "--demo-workdir", "wd"]
    args += [*tiny_args, f"data.num_classes={4}", "data.image_size=16", "data.num_workers=0"]
    args += ["data.local=null", f"data.train_dir={tiny['data'] / 'train'}"]  # the folder, where val_dir counts

    assert ablate_cli.main(args) == 1
    assert calls == [(Path("wd"), DEMO_YAML.parent)]
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert str(later) in rows[0]["error"] and rows[0]["error"].startswith("exit code 1")
    assert any(f"teacher.checkpoint={tiny['teacher']}" == o for o in rows[1]["overrides"])
    out = capsys.readouterr()
    assert "FAILED" in out.out and "1 of 2 points failed" in out.err
    assert (tmp_path / "out" / "s.md").is_file() and (tmp_path / "out" / "s.png").is_file()

    # Rerun once the folder exists: the failed point runs again, the finished one is skipped.
    (later / "class0").mkdir(parents=True)
    for c in range(4):
        src = tiny["data"] / "val" / f"class{c}"
        (later / f"class{c}").mkdir(exist_ok=True)
        for f in src.iterdir():
            (later / f"class{c}" / f.name).write_bytes(f.read_bytes())
    assert ablate_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "done before, skipped" in out and out.count(": running") == 1
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed", "ok", "ok"]
    assert "| 2 | 0 |" not in (tmp_path / "out" / "s.md").read_text()
    assert (tmp_path / "out" / "s.md").read_text().count("| 1 | 0 |") == 2


def test_table_and_plot_average_over_seeds(tmp_path: Path) -> None:
    sweep = Sweep("t", tmp_path / "t.yaml", "metrics/eval/top1", "maximize", {"x.alpha": [1.0, 5.0]}, None)

    def row(alpha: float, seed: int, top1: float | None) -> dict:
        ok = top1 is not None
        return {
            "params": {"x.alpha": alpha, "trainer.seed": seed},
            "status": "ok" if ok else "failed",
            "metrics": {"metrics/eval/top1": top1} if ok else {},
        }

    rows = [row(1.0, 0, 0.5), row(1.0, 1, 0.7), row(5.0, 0, 0.9), row(5.0, 1, None)]
    md = table(sweep, rows)
    assert "| 1.0 | 0.6000 ± 0.1414 | 2 | 0 |" in md
    assert "| 5.0 | 0.9000 | 1 | 1 |" in md
    image = matplotlib.image.imread(plot(sweep, rows, tmp_path / "p.png"))
    assert image.shape[0] > 100 and image.shape[1] > 100


def test_report_only_tables_the_finished_points_without_running(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    rows = [
        {"point": "p1", "params": {"algorithms.distillation.alpha": 1.0}, "status": "failed", "metrics": {}},
        {"point": "p1", "params": {"algorithms.distillation.alpha": 1.0}, "status": "ok", "metrics": {}},
        {"point": "p2", "params": {"algorithms.distillation.alpha": 5.0}, "status": "ok", "metrics": {}},
    ]
    rows[1]["metrics"]["metrics/eval_best/top1"] = 0.25
    rows[2]["metrics"]["metrics/eval_best/top1"] = 0.75
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert ablate_cli.main([str(SWEEPS / "alpha.yaml"), "--out", str(out), "--report-only"]) == 0
    md = (out / "alpha.md").read_text()
    assert "| 1.0 | 0.2500 | 1 | 0 |" in md and "| 5.0 | 0.7500 | 1 | 0 |" in md  # the retried point counts once
    assert (out / "alpha.png").is_file() and ": running" not in capsys.readouterr().out
    assert ablate_cli.main([str(SWEEPS / "temperature.yaml"), "--out", str(out), "--report-only"]) == 2
