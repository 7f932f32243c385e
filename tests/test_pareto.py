"""usi-benchmark-backbones: throughput, top-1 from finished runs, the frontier, the outputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from usi_composer.cli import benchmark as benchmark_cli
from usi_composer.errors import UsiError
from usi_composer.pareto import (
    Throughput,
    Top1,
    load_top1,
    markdown_table,
    measure_throughput,
    pareto_front,
    plot_pareto,
)

FAST = ["--batch-size", "2", "--image-size", "16", "--num-classes", "4", "--warmup", "1", "--min-run-time", "0.05"]


def test_pareto_front_keeps_only_undominated_points() -> None:
    points = [(100.0, 0.70), (50.0, 0.80), (80.0, 0.60), (100.0, 0.65), (10.0, 0.80), (200.0, 0.50)]
    assert pareto_front(points) == [True, True, False, False, False, True]
    assert pareto_front([(1.0, 1.0), (1.0, 1.0)]) == [True, True]  # ties dominate nobody


def test_throughput_is_measured_with_batchnorm_folded() -> None:
    kwargs = dict(batch_size=2, image_size=16, num_classes=4, warmup=1, min_run_time=0.05)
    folded = measure_throughput("resnet10t", **kwargs)
    plain = measure_throughput("resnet10t", fold_bn=False, channels_last=False, **kwargs)
    assert folded.bn_folded > 0 and plain.bn_folded == 0
    for t in (folded, plain):
        assert t.images_per_s > 0 and t.runs >= 1
        assert t.images_per_s == pytest.approx(2 / (t.median_ms / 1e3))
    assert folded.params_m == pytest.approx(plain.params_m)


def test_transformers_are_timed_at_the_size_they_are_built_for() -> None:
    kwargs = dict(batch_size=2, num_classes=4, warmup=1, min_run_time=0.05)
    assert measure_throughput("deit_tiny_patch16_224", image_size=32, **kwargs).images_per_s > 0  # 2x2 patches
    with pytest.raises(UsiError, match=r"deit_tiny_patch16_224 cannot run at 8 px"):
        measure_throughput("deit_tiny_patch16_224", image_size=8, **kwargs)  # smaller than one patch


@pytest.fixture(scope="module")
def wandb_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished W&B offline run written by wandb itself (no training needed to test the join)."""
    tmp = tmp_path_factory.mktemp("wb")
    code = (
        "import wandb\n"
        f"run = wandb.init(mode='offline', dir={str(tmp)!r}, project='p', "
        "config={'model': {'name': 'resnet10t'}})\n"
        "run.log({'metrics/eval/top1': 0.40}); run.log({'metrics/eval/top1': 0.75}); run.finish()\n"
    )
    env = {**os.environ, "WANDB_SILENT": "true"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120, capture_output=True)
    return tmp / "wandb"


def test_top1_is_the_mean_and_spread_over_each_models_runs_from_every_source(
    tmp_path: Path, wandb_run_dir: Path
) -> None:
    results = tmp_path / "results.jsonl"
    (wandb_id,) = [p.name.rsplit("-", 1)[-1] for p in wandb_run_dir.glob("offline-run-*")]
    rows = [
        {"status": "ok", "model": "lcnet_050", "point": "a", "metrics": {"metrics/eval/top1": 0.5}},
        {"status": "failed", "model": "lcnet_050", "point": "b", "metrics": {}},
        {"status": "ok", "model": "lcnet_050", "point": "b", "metrics": {"metrics/eval/top1": 0.6}},  # b, retried
        {  # USI's better-of-EMA-and-raw top-1 is preferred when a run has it
            "status": "ok",
            "model": "lcnet_050",
            "point": "e",
            "metrics": {"metrics/eval/top1": 0.9, "metrics/eval_best/top1": 0.7},
        },
        {"status": "ok", "model": "resnet10t", "point": "d", "metrics": {"metrics/eval/top1": 0.7}},
        {  # the W&B run below, also recorded by the runner: counted once
            "status": "ok",
            "model": "resnet10t",
            "point": "w",
            "wandb_run_dir": f"elsewhere/offline-run-20260101_000000-{wandb_id}",
            "metrics": {"metrics/eval/top1": 0.75},
        },
        {"status": "ok", "model": "resnet18", "point": "f", "metrics": {"metrics/eval/top1": 0.8}},
        {"status": "failed", "model": "resnet18", "point": "f", "metrics": {}},  # f's latest try failed
    ]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = tmp_path / "t.csv"
    table.write_text("model,top1\nmobilenetv3_small_050,0.55\nmobilenetv3_small_050,0.45\n")
    top1 = load_top1([results], [wandb_run_dir], [table])
    assert sorted(top1) == ["lcnet_050", "mobilenetv3_small_050", "resnet10t"]
    assert (top1["lcnet_050"].mean, top1["lcnet_050"].runs) == (pytest.approx(0.6), 3)
    assert top1["lcnet_050"].std == pytest.approx(0.1)  # sample std of 0.5, 0.6, 0.7
    assert (top1["resnet10t"].mean, top1["resnet10t"].runs) == (pytest.approx(0.725), 2)
    assert top1["resnet10t"].std == pytest.approx(0.05 / math.sqrt(2))
    assert sum(s.startswith("W&B run") for s in top1["resnet10t"].sources) == 1
    assert (top1["mobilenetv3_small_050"].mean, top1["mobilenetv3_small_050"].runs) == (pytest.approx(0.5), 2)
    assert load_top1(csvs=[tmp_path / "t.csv"])["mobilenetv3_small_050"].std == pytest.approx(0.1 / math.sqrt(2))


def test_a_results_file_cut_short_by_a_killed_runner_is_read_as_usi_ablate_reads_it(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    row = {"status": "ok", "model": "lcnet_050", "point": "a", "metrics": {"metrics/eval/top1": 0.5}}
    cut = json.dumps({**row, "point": "b", "metrics": {"metrics/eval/top1": 0.9}})[:40]  # killed mid-write
    results.write_text(json.dumps(row) + "\n" + cut)
    top1 = load_top1([results])
    assert (top1["lcnet_050"].mean, top1["lcnet_050"].runs) == (0.5, 1)


def _top1(mean: float, std: float = 0.0, runs: int = 1) -> Top1:
    return Top1(mean, std, runs, ("test",) * runs)


def test_markdown_table_marks_the_frontier_and_models_without_runs() -> None:
    def t(model: str, speed: float) -> Throughput:
        return Throughput(model, speed, 1.0, 0.1, 3, 8, 32, "cpu", "fp32", True, 5, 1.0)

    md = markdown_table(
        [t("a", 100), t("b", 50), t("c", 80), t("d", 10)],
        {"a": _top1(0.7, 0.01, 3), "b": _top1(0.8), "c": _top1(0.6, 0.02, 3)},
    )
    lines = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert lines["a"].endswith("| 0.7000 ± 0.0100 (3 runs) | ★ |") and lines["b"].endswith("| 0.8000 (1 run) | ★ |")
    assert lines["c"].endswith("| 0.6000 ± 0.0200 (3 runs) |  |") and "no run" in lines["d"]


def test_plot_draws_each_models_spread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.pyplot as plt

    def t(model: str, speed: float) -> Throughput:
        return Throughput(model, speed, 1.0, 0.1, 3, 8, 32, "cpu", "fp32", True, 5, 1.0)

    drawn = {}
    real_savefig = plt.Figure.savefig

    def savefig(fig: plt.Figure, *args, **kwargs) -> None:  # read the bars off the figure as it is saved
        (ax,) = fig.axes
        for c in ax.containers:
            if c.has_yerr:
                for segment in c.lines[2][0].get_segments():
                    drawn[round(float(segment[0][0]))] = (float(segment[0][1]), float(segment[1][1]))
        real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", savefig)
    png = plot_pareto([t("a", 100), t("b", 50)], {"a": _top1(0.7, 0.01, 3), "b": _top1(0.8)}, tmp_path / "p.png")
    assert matplotlib.image.imread(png).ndim == 3
    assert drawn[100] == pytest.approx((0.69, 0.71)) and drawn[50] == pytest.approx((0.8, 0.8))


def test_cli_draws_the_plot_and_table_from_real_runs(tmp_path: Path, wandb_run_dir: Path) -> None:
    table = tmp_path / "t.csv"
    table.write_text("model,top1\nlcnet_050,0.5\n")
    out = tmp_path / "out"
    code = benchmark_cli.main(["--csv", str(table), "--wandb-dir", str(wandb_run_dir), "--out", str(out), *FAST])
    assert code == 0
    md = (out / "pareto.md").read_text()
    assert "| lcnet_050 |" in md and "| resnet10t |" in md and "0.7500" in md
    speeds = json.loads((out / "throughput.json").read_text())
    assert sorted(s["model"] for s in speeds) == ["lcnet_050", "resnet10t"]
    assert all(s["bn_folded"] > 0 and s["image_size"] == 16 for s in speeds)
    assert matplotlib.image.imread(out / "pareto.png").ndim == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["no_such_model_xyz"], "no_such_model_xyz"),
        ([], "no models"),
        (["--results", "/nonexistent/results.jsonl"], "no such results file"),
        (["--batch-size", "0", "resnet10t"], "--batch-size >= 1"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    assert benchmark_cli.main([*args, "--out", str(tmp_path), "--warmup", "0", "--min-run-time", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err


def _row(point: str, model: str, top1: float, **params: object) -> dict:
    params = {"model.name": model, **params}
    return {"status": "ok", "model": model, "point": point, "params": params, "metrics": {"metrics/eval/top1": top1}}


def test_runs_of_different_sweep_points_are_not_pooled(tmp_path: Path) -> None:
    results = tmp_path / "results.jsonl"
    rows = [
        _row("a0", "lcnet_050", 0.5, **{"trainer.seed": 0, "optimizer.lr": 0.1}),
        _row("a1", "lcnet_050", 0.6, **{"trainer.seed": 1, "optimizer.lr": 0.1}),  # its seeds: pooled
        _row("b0", "lcnet_050", 0.9, **{"trainer.seed": 0, "optimizer.lr": 0.2}),
        _row("c0", "resnet10t", 0.7, **{"trainer.seed": 0, "optimizer.lr": 0.1}),
    ]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UsiError, match=r"lcnet_050: its runs come from 2 different sweep points \(optimizer.lr = 0.1 "):
        load_top1([results])
    top1 = load_top1([results], where=["optimizer.lr=0.1"])
    assert (top1["lcnet_050"].runs, top1["lcnet_050"].mean) == (2, pytest.approx(0.55)) and top1["resnet10t"].runs == 1
    assert load_top1([results], where=["optimizer.lr=0.2"])["lcnet_050"].runs == 1 and "resnet10t" not in load_top1(
        [results], where=["optimizer.lr=0.2"]
    )
    with pytest.raises(UsiError, match="--where: expected KEY=VALUE"):
        load_top1([results], where=["optimizer.lr"])


def test_the_table_says_what_each_column_holds() -> None:
    t = Throughput("a", 100.0, 1.25, 0.5, 3, 8, 32, "cpu", "fp32", True, 5, 1.0)
    lines = markdown_table([t], {"a": _top1(0.7, 0.01, 3)}).splitlines()
    assert "| ms/batch (median) | ms/batch (IQR) |" in lines[0] and "| 1.25 | 0.50 |" in lines[2]
    assert "±" not in lines[2].split("|")[3] and "precision=fp32" in lines[-1]


def test_a_model_name_typo_gets_a_suggestion(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert benchmark_cli.main(["resnet10", "--out", str(tmp_path), *FAST]) == 2
    assert "did you mean 'resnet10t'" in capsys.readouterr().err


def test_the_cli_reads_the_runs_yaml_and_prints_no_stray_line(tmp_path: Path) -> None:
    """In a fresh interpreter: torch.utils.cpp_extension's "No CUDA runtime is found" line is printed
    once, at its import, which a test process may have done already."""
    table = tmp_path / "t.csv"
    table.write_text("model,top1\nresnet10t,0.5\n")
    fast = ["--batch-size", "2", "--warmup", "1", "--min-run-time", "0.05", "--device", "cpu"]
    command = [sys.executable, "-m", "usi_composer.cli.benchmark", "--config", "yamls/demo.yaml", "data.image_size=16"]
    command += ["--csv", str(table), "--out", str(tmp_path / "out"), *fast]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.startswith("yamls/demo.yaml: 16 px, 10 classes\n[1/1] resnet10t: timing ... ")
    (speed,) = json.loads((tmp_path / "out" / "throughput.json").read_text())
    assert (speed["image_size"], speed["precision"]) == (16, "fp32")


def test_overrides_need_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        benchmark_cli.main(["resnet10t", "data.image_size=16", "--out", str(tmp_path)])
    assert "key=value overrides need --config YAML" in capsys.readouterr().err
