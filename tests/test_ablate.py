"""The sweep files and the local grid runner (usi-ablate)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import yaml

from helpers import DEMO_CPU, DEMO_YAML, NUM_CLASSES, REPO, TEACHER, tiny_run
from usi_composer.ablate import (
    Sweep,
    SweepError,
    comparisons,
    estimate,
    grid,
    load_sweep,
    paired,
    plot,
    point_args,
    reference_point,
    replace_values,
    report,
    run_sweep,
    table,
)
from usi_composer.cli import ablate as ablate_cli
from usi_composer.config import load_config

SWEEPS = REPO / "yamls" / "sweeps"
PAPER_GRIDS = {
    "epochs": ("trainer.max_duration", ["100ep", "200ep", "300ep", "600ep", "1000ep"]),
    "temperature": ("algorithms.distillation.temperature", [0.5, 1.0, 2.0, 4.0]),
    "alpha": ("algorithms.distillation.alpha", [1.0, 2.5, 5.0, 10.0]),
    "kd_only": ("algorithms.distillation.ce_weight", [0.0, 1.0]),
}


@pytest.mark.parametrize("name", [*PAPER_GRIDS, "backbones", "backbones_demo"])
def test_sweep_files_are_wandb_grids_over_the_recipe(name: str) -> None:
    doc = yaml.safe_load((SWEEPS / f"{name}.yaml").read_text())
    base = "yamls/demo.yaml" if name.endswith("_demo") else "yamls/usi.yaml"
    assert doc["method"] == "grid"
    # run as a module: the same from a checkout and from a wheel install (no train.py there)
    assert doc["command"] == ["composer", "-m", "usi_composer.cli.train", base, "${args_no_hyphens}"]
    assert doc["metric"] == {"name": "metrics/eval_best/top1", "goal": "maximize"}
    sweep = load_sweep(SWEEPS / f"{name}.yaml")
    if name in PAPER_GRIDS:
        assert sweep.parameters == dict([PAPER_GRIDS[name]])
    # Every point is a valid config for the yaml the command names (unknown keys would fail here).
    for params in grid(sweep.parameters):
        cfg = load_config(REPO / base, point_args(params))
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


@pytest.mark.slow
def test_two_point_grid_runs_logs_to_wandb_and_is_skipped_when_rerun(
    tiny_folder: Path, saved_teacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    out = tmp_path / "two"
    path = tmp_path / "temperature.yaml"
    path.write_text((SWEEPS / "temperature.yaml").read_text())

    sweep = replace_values(load_sweep(path), ["algorithms.distillation.temperature=1.0,4.0"])
    teacher = saved_teacher(TEACHER, NUM_CLASSES)
    overrides = [*tiny_run(tiny_folder, teacher_weights=teacher, **DEMO_CPU), f"loggers.wandb.dir={tmp_path / 'wb'}"]
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
        assert run["name"] == row["point"], "each W&B run is named after its point"
        assert run["summary"]["metrics/eval/top1"] == pytest.approx(row["metrics"]["metrics/eval/top1"])

    lines.clear()
    again = run_sweep(sweep, DEMO_YAML, overrides, out, echo=lines.append)
    assert again == rows
    assert sum("done before, skipped" in line for line in lines) == 2 and not any("running" in ln for ln in lines)
    assert len((out / "results.jsonl").read_text().splitlines()) == 2

    md = table(sweep, rows)
    assert (
        "| algorithms.distillation.temperature | metrics/eval_best/top1 (mean ± std) | 95% CI | runs | failed |" in md
    )
    assert f"| 4.0 | {rows[1]['metrics']['metrics/eval_best/top1']:.4f} | n/a | 1 | 0 |" in md
    png = plot(sweep, rows, out / "t.png")
    assert matplotlib.image.imread(png).ndim == 3


def sweep_key(sweep: Sweep) -> str:
    return next(iter(sweep.parameters))


@pytest.mark.slow
def test_runner_survives_a_failing_point_and_retries_it(
    tiny_folder: Path,
    saved_teacher,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through the CLI with the demo's yaml: the demo's data/teacher come from prepare_teacher."""
    tiny = {"data": tiny_folder, "teacher": saved_teacher(TEACHER, NUM_CLASSES)}
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

    import usi_composer.demo

    monkeypatch.setattr(usi_composer.demo, "prepare_teacher", fake_prepare_teacher)
    run_args = tiny_run(tiny["data"], teacher_weights=tiny["teacher"], **DEMO_CPU)
    tiny_args = [o for o in run_args if not o.startswith(("data.", "teacher.ch"))]
    args = [str(sweep), "--base", str(DEMO_YAML), "--out", str(tmp_path / "out"), "--workdir", "wd"]
    args += [*tiny_args, f"data.num_classes={4}", "data.image_size=16", "data.num_workers=0"]
    args += ["data.local=null", f"data.train_dir={tiny['data'] / 'train'}"]  # the folder, where val_dir counts

    assert ablate_cli.main(args) == 2  # its one failed point was refused (a missing folder): not retryable
    assert calls == [(Path("wd"), DEMO_YAML.parent)]
    rows = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["failed", "ok"]
    assert str(later) in rows[0]["error"] and rows[0]["error"].startswith("exit code 2")
    assert any(f"teacher.checkpoint={tiny['teacher']}" == o for o in rows[1]["overrides"])
    out = capsys.readouterr()
    assert "FAILED" in out.out and "1 of 2 points failed (fix what the logs name" in out.err
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
    # 95% CI: 0.6 ± t(0.975, 1 df) * 0.1414 / sqrt(2) = 0.6 ± 12.7062 * 0.1
    assert "| 1.0 | 0.6000 ± 0.1414 | [-0.6706, 1.8706] | 2 | 0 |" in md
    assert "| 5.0 | 0.9000 | n/a | 1 | 1 |" in md
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
    assert "| 1.0 | 0.2500 | n/a | 1 | 0 |" in md and "| 5.0 | 0.7500 | n/a | 1 | 0 |" in md  # retried: counted once
    assert (out / "alpha.png").is_file() and ": running" not in capsys.readouterr().out
    assert ablate_cli.main([str(SWEEPS / "temperature.yaml"), "--out", str(out), "--report-only"]) == 2


# --------------------------------------------------------------------------- the statistics of the report

T_975 = {1: 12.706204736, 4: 2.776445105}  # Student's t 97.5% quantiles, from printed tables


def t_two_sided_p_4df(t: float) -> float:
    """Two-sided p of Student's t with 4 degrees of freedom, from its closed-form CDF."""
    u = t * t / (4 + t * t)
    return 1 - 1.5 * math.sqrt(u) * (1 - u / 3)


def test_estimate_is_mean_std_and_the_t_interval() -> None:
    values = [0.90, 0.92, 0.95, 0.91, 0.93]
    e = estimate(values)
    half = T_975[4] * np.std(values, ddof=1) / math.sqrt(5)
    assert e.n == 5 and e.mean == pytest.approx(np.mean(values)) and e.std == pytest.approx(np.std(values, ddof=1))
    assert (e.low, e.high) == pytest.approx((np.mean(values) - half, np.mean(values) + half))
    two = estimate([0.5, 0.7])
    assert (two.low, two.high) == pytest.approx((0.6 - T_975[1] * 0.1, 0.6 + T_975[1] * 0.1))
    one = estimate([0.8])
    assert (one.mean, one.std, one.n) == (0.8, 0.0, 1) and math.isnan(one.low) and math.isnan(one.high)
    assert estimate([]).n == 0 and math.isnan(estimate([]).mean)


def test_paired_comparison_tests_the_per_seed_differences() -> None:
    reference = [0.90, 0.80, 0.70, 0.95, 0.60]  # very different seeds: only the pairing sees the gain
    values = [r + d for r, d in zip(reference, [0.01, 0.02, 0.03, 0.04, 0.05], strict=True)]
    p = paired(values, reference)
    # differences 0.01..0.05: mean 0.03, std sqrt(2.5) * 0.01, t = 0.03 / (0.01 * sqrt(0.5)) = 4.2426
    assert p.diff.mean == pytest.approx(0.03) and p.diff.std == pytest.approx(math.sqrt(2.5) * 0.01)
    half = T_975[4] * 0.01 * math.sqrt(0.5)
    assert (p.diff.low, p.diff.high) == pytest.approx((0.03 - half, 0.03 + half))
    assert p.t_p == pytest.approx(t_two_sided_p_4df(0.03 / (0.01 * math.sqrt(0.5))), rel=1e-6)
    assert p.t_p == pytest.approx(0.01324, abs=1e-5)
    assert (p.better, p.worse, p.tied) == (5, 0, 0) and p.sign_p == pytest.approx(2 / 32)
    # Unpaired, the seeds' spread would hide the gain; the paired test must not.
    assert estimate(values).low < estimate(reference).high

    mixed = paired([1.0, 1.0, 1.0, 0.5, 0.2], [0.0, 0.0, 0.0, 0.5, 0.3])
    assert (mixed.better, mixed.worse, mixed.tied) == (3, 1, 1)
    assert mixed.sign_p == pytest.approx(2 * (1 + 4) / 16)  # ties dropped: P(<= 1 of 4) twice
    assert paired([0.75, 0.5], [0.5, 0.25]).t_p == 0.0  # the same gain on every seed (exact in binary)
    assert paired([0.7, 0.8], [0.7, 0.8]).t_p == 1.0 and paired([0.7, 0.8], [0.7, 0.8]).sign_p == 1.0
    single = paired([0.9], [0.8])
    assert math.isnan(single.t_p) and math.isnan(single.diff.low) and single.sign_p == 1.0


def _row(params: dict, top1: float | None, metric: str = "metrics/eval_best/top1") -> dict:
    ok = top1 is not None
    point = " ".join(f"{k}={v}" for k, v in params.items())
    return {
        "point": point,
        "params": params,
        "status": "ok" if ok else "failed",
        "metrics": {metric: top1} if ok else {},
    }


def test_comparisons_pair_each_point_with_the_reference_by_seed(tmp_path: Path) -> None:
    key = "algorithms.distillation.temperature"
    sweep = Sweep("t", Path("t.yaml"), "metrics/eval_best/top1", "maximize", {key: [1.0, 2.0, 4.0, 8.0]}, None)
    ref = {0: 0.90, 1: 0.80, 2: 0.70, 3: 0.95, 4: 0.60}
    rows = [_row({key: 1.0, "trainer.seed": s}, v) for s, v in ref.items()]
    # T=2: +0.01..+0.05 over the same seeds, listed in another order; T=4: seed 4 failed, seed 5 has no reference
    rows += [_row({key: 2.0, "trainer.seed": s}, ref[s] + 0.01 * (s + 1)) for s in (4, 2, 0, 3, 1)]
    rows += [_row({key: 4.0, "trainer.seed": s}, ref[s] - 0.02) for s in (0, 1, 2, 3)]
    rows += [_row({key: 4.0, "trainer.seed": 4}, None), _row({key: 4.0, "trainer.seed": 5}, 0.99)]
    rows += [_row({key: 8.0, "trainer.seed": s}, ref[s] + (-0.02 if s else 0.08)) for s in ref]  # mean: -2e-17
    md = comparisons(sweep, rows, {key: 1.0})
    lines = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "reference (algorithms.distillation.temperature=1.0)" in md
    assert lines["1.0"].startswith("| 1.0 | 5 | reference |")
    half = T_975[4] * 0.01 * math.sqrt(0.5)
    assert (
        lines["2.0"] == f"| 2.0 | 5 | +0.0300 | [{0.03 - half:+.4f}, {0.03 + half:+.4f}] | 0.013 | 5 / 0 / 0 | 0.062 |"
    )
    assert lines["4.0"] == "| 4.0 | 4 | -0.0200 | [-0.0200, -0.0200] | 0.000 | 0 / 4 / 0 | 0.125 |"
    assert lines["8.0"] == "| 8.0 | 5 | +0.0000 | [-0.0555, +0.0555] | 1.000 | 1 / 4 / 0 | 0.375 |"
    text = report(sweep, rows, {key: 1.0})
    assert text.startswith("# t\n") and table(sweep, rows) in text and md in text
    assert report(sweep, rows, None) == f"# t\n\n{table(sweep, rows)}\n"
    assert matplotlib.image.imread(plot(sweep, rows, tmp_path / "p.png", {key: 1.0})).ndim == 3


def test_the_reference_is_the_base_configs_point_unless_given() -> None:
    cfg = load_config(DEMO_YAML)  # temperature 1.0, alpha 5.0, 3 epochs
    temperature = load_sweep(SWEEPS / "temperature.yaml")
    assert reference_point(temperature, cfg) == {"algorithms.distillation.temperature": 1.0}
    given = reference_point(temperature, cfg, ["algorithms.distillation.temperature=4"])
    assert given == {"algorithms.distillation.temperature": 4.0}
    epochs = replace_values(load_sweep(SWEEPS / "epochs.yaml"), ["trainer.max_duration=3ep,6ep"])
    assert reference_point(epochs, cfg) == {"trainer.max_duration": "3ep"}
    assert reference_point(load_sweep(SWEEPS / "epochs.yaml"), cfg) is None  # 3ep is not in the paper's grid
    with pytest.raises(SweepError, match=r"'trainer\.seed' is not swept"):
        reference_point(temperature, cfg, ["trainer.seed=0"])
    with pytest.raises(SweepError, match="not one of the swept values"):
        reference_point(temperature, cfg, ["algorithms.distillation.temperature=3.0"])


def test_report_only_compares_with_the_given_reference(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    key = "algorithms.distillation.alpha"
    rows = [
        _row({key: a, "trainer.seed": s}, 0.5 + 0.1 * s + (0.01 * s if a == 10.0 else 0))
        for a in (5.0, 10.0)
        for s in (0, 1, 2)
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [str(SWEEPS / "alpha.yaml"), "--out", str(tmp_path), "--report-only"]
    assert ablate_cli.main(args) == 0  # default reference: usi.yaml's alpha = 5
    md = (tmp_path / "alpha.md").read_text()
    assert (
        "| 5.0 | 3 | reference |" in md
        and "| 10.0 | 3 | +0.0100 | [-0.0148, +0.0348] | 0.225 | 2 / 0 / 1 | 0.500 |" in md
    )
    assert ablate_cli.main([*args, "--reference", f"{key}=10.0"]) == 0
    assert "| 5.0 | 3 | -0.0100 |" in (tmp_path / "alpha.md").read_text()
    assert ablate_cli.main([*args, "--reference", f"{key}=7.0"]) == 2
    assert "not one of the swept values" in capsys.readouterr().err
