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
        return Throughput(model, speed, 1.0, 0.1, 3, 8, 32, "cpu", "none", True, 5, 1.0)

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
        return Throughput(model, speed, 1.0, 0.1, 3, 8, 32, "cpu", "none", True, 5, 1.0)

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
