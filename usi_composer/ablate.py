"""Run a W&B sweep file's grid locally, without a W&B server: one normal training run per point.

The sweep files in yamls/sweeps/ are W&B's own format (``wandb sweep`` reads them unchanged).
W&B expands grids on its server, so the grid is expanded here (a cartesian product of the
parameters' ``values``); each point's command line is formatted by wandb's own
``create_sweep_command_args`` (``${args_no_hyphens}``), so a point runs exactly as ``wandb agent``
would run it. Each point is a subprocess (``python -m usi_composer.cli.train``): a crash in one
point cannot take the runner down.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from usi_composer.config import load_config
from usi_composer.errors import UsiError

__all__ = [
    "Sweep",
    "SweepError",
    "finished_rows",
    "grid",
    "load_sweep",
    "plot",
    "point_args",
    "replace_values",
    "run_sweep",
    "table",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
SEED_KEY = "trainer.seed"


class SweepError(UsiError, ValueError):
    """A sweep file the local runner cannot run, with a one-line message."""


@dataclass
class Sweep:
    name: str
    path: Path
    metric: str
    goal: str  # maximize | minimize
    parameters: dict[str, list[Any]]  # dot-path key -> values, in file order
    base: Path | None  # the yaml in the sweep's command


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and check a W&B sweep file (grid method, ``values``/``value`` parameters)."""
    path = Path(path)
    where = str(path)
    if not path.is_file():
        raise SweepError(f"{where}: no such sweep file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{where}: not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(doc, dict):
        raise SweepError(f"{where}: expected a mapping (a W&B sweep definition)")
    if doc.get("method", "grid") != "grid":
        raise SweepError(f"{where}: method: the local runner runs grids only, got '{doc.get('method')}'")
    params = doc.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{where}: parameters: expected a mapping of dot-path keys to {{values: [...]}}")
    parameters: dict[str, list[Any]] = {}
    for key, spec in params.items():
        if isinstance(spec, dict) and isinstance(spec.get("values"), list) and spec["values"]:
            parameters[str(key)] = list(spec["values"])
        elif isinstance(spec, dict) and "value" in spec:
            parameters[str(key)] = [spec["value"]]
        else:
            raise SweepError(f"{where}: parameters.{key}: a grid needs 'values: [...]' (non-empty) or 'value: x'")
    metric = doc.get("metric") or {}
    if not isinstance(metric, dict):
        raise SweepError(f"{where}: metric: expected {{name: ..., goal: maximize|minimize}}")
    goal = metric.get("goal", "maximize")
    if goal not in ("maximize", "minimize"):
        raise SweepError(f"{where}: metric.goal: must be maximize or minimize, got '{goal}'")
    command = doc.get("command") or []
    if command and "${args_no_hyphens}" not in command:
        raise SweepError(f"{where}: command: must pass the parameters as ${{args_no_hyphens}} (key=value overrides)")
    base = next((Path(str(c)) for c in command if str(c).endswith((".yaml", ".yml"))), None)
    return Sweep(
        name=str(doc.get("name") or path.stem),
        path=path,
        metric=str(metric.get("name", "metrics/eval/top1")),
        goal=goal,
        parameters=parameters,
        base=base,
    )


def replace_values(sweep: Sweep, assignments: Sequence[str]) -> Sweep:
    """``key=v1,v2,...`` replaces a swept parameter's values (each value read as YAML), e.g. a
    short epochs grid on the demo: ``trainer.max_duration=3ep,6ep,12ep``."""
    parameters = dict(sweep.parameters)
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        if not sep or not text.strip():
            raise SweepError(f"--values '{assignment}': expected key=v1,v2,...")
        if key not in parameters:
            raise SweepError(f"--values '{assignment}': '{key}' is not swept by {sweep.path} ({', '.join(parameters)})")
        parameters[key] = [yaml.safe_load(v) for v in text.split(",") if v.strip()]
    return Sweep(sweep.name, sweep.path, sweep.metric, sweep.goal, parameters, sweep.base)


def grid(parameters: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the parameters' values, the first parameter varying slowest."""
    keys = list(parameters)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*parameters.values())]


def point_args(params: dict[str, Any]) -> list[str]:
    """``key=value`` arguments for one point, formatted as ``wandb agent`` formats ``${args_no_hyphens}``."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})["args_no_hyphens"]


def _point_id(params: dict[str, Any]) -> str:
    return " ".join(point_args(params))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)[:150]


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a row cut short by a killed runner: that point runs again
                continue
    return rows


def _append_row(path: Path, row: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _error_line(log: Path, returncode: int) -> str:
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.is_file() else []
    errors = [ln for ln in lines if ln.startswith("error:") or re.match(r"^\w*(Error|Exception)\b", ln)]
    detail = (errors or lines or ["no output"])[-1][:300]
    return f"exit code {returncode}: {detail}"


def run_sweep(
    sweep: Sweep,
    base: Path,
    overrides: Sequence[str] = (),
    out_dir: Path | None = None,
    seeds: Sequence[int] = (),
    python: str = sys.executable,
    echo: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every point of ``sweep``'s grid on ``base`` + ``overrides`` one after another.

    Appends one JSON row per finished point to ``out_dir/results.jsonl`` as soon as it finishes
    (``status`` ok or failed, the metrics, the point's parameters); points already finished with
    the same base, overrides and parameters are skipped, failed ones run again. Every point's
    config is validated before the first one runs. Returns the rows of this grid.
    """
    parameters = dict(sweep.parameters)
    if seeds:
        if SEED_KEY in parameters:
            raise SweepError(f"{sweep.path}: parameters.{SEED_KEY}: already swept; drop --seeds")
        parameters[SEED_KEY] = list(seeds)
    points = grid(parameters)
    out_dir = out_dir or Path("runs/ablations") / sweep.path.stem
    fixed = ["trainer.progress_bar=false", *overrides]  # logs go to files: no progress bars

    configs = {}
    for params in points:  # validate the whole grid before spending time on any point
        configs[_point_id(params)] = load_config(base, [*fixed, *point_args(params)])
    first = next(iter(configs.values()))
    if first.loggers.wandb is not None and first.loggers.wandb.group is None:
        fixed.append(f"loggers.wandb.group={_slug(sweep.name)}")  # the sweep's runs side by side in W&B

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    results = out_dir / "results.jsonl"
    signature = {"base": str(base), "overrides": fixed}
    done = {
        r["point"]: r
        for r in _read_rows(results)
        if r.get("status") == "ok" and r.get("base") == signature["base"] and r.get("overrides") == fixed
    }
    rows: list[dict[str, Any]] = []
    echo(f"{sweep.name}: {len(points)} points on {base}, results in {results}")
    for i, params in enumerate(points, 1):
        pid = _point_id(params)
        if pid in done:
            echo(f"[{i}/{len(points)}] {pid}: done before, skipped ({sweep.metric} = {_fmt(done[pid], sweep.metric)})")
            rows.append(done[pid])
            continue
        log = out_dir / "logs" / f"{_slug(pid)}.log"
        metrics_file = out_dir / "logs" / f"{_slug(pid)}.metrics.json"
        metrics_file.unlink(missing_ok=True)
        command = [python, "-m", "usi_composer.cli.train", str(base), *fixed, *point_args(params)]
        command += ["--metrics-out", str(metrics_file)]
        echo(f"[{i}/{len(points)}] {pid}: running (log: {log})")
        start = time.perf_counter()
        with log.open("w") as f:
            f.write(" ".join(command) + "\n\n")
            f.flush()
            returncode = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        seconds = round(time.perf_counter() - start, 1)
        row: dict[str, Any] = {
            "point": pid,
            "params": params,
            "model": configs[pid].model.name,
            **signature,
            "seconds": seconds,
            "log": str(log),
        }
        if returncode == 0 and metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            row.update(status="ok", wandb_run_dir=metrics.pop("wandb_run_dir", None), metrics=metrics)
            echo(f"[{i}/{len(points)}] {pid}: ok, {sweep.metric} = {_fmt(row, sweep.metric)} ({seconds:.0f} s)")
        else:
            row.update(status="failed", error=_error_line(log, returncode), metrics={})
            echo(f"[{i}/{len(points)}] {pid}: FAILED ({row['error']}); continuing")
        _append_row(results, row)
        rows.append(row)
    return rows


def finished_rows(sweep: Sweep, out_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``out_dir/results.jsonl`` for ``sweep``'s parameters, the latest per point."""
    rows = [r for r in _read_rows(out_dir / "results.jsonl") if set(_swept(sweep)) <= set(r.get("params", {}))]
    if not rows:
        raise SweepError(f"{out_dir / 'results.jsonl'}: no finished points of {sweep.path} to report")
    return list({r["point"]: r for r in rows}.values())


def _fmt(row: dict[str, Any], metric: str) -> str:
    value = row.get("metrics", {}).get(metric)
    return "n/a" if value is None else f"{value:.4f}"


# --------------------------------------------------------------------------- report


def _swept(sweep: Sweep) -> list[str]:
    return [k for k in sweep.parameters if k != SEED_KEY]


def _groups(rows: list[dict[str, Any]], keys: list[str]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row["params"].get(k) for k in keys), []).append(row)
    return groups


def _stats(group: list[dict[str, Any]], metric: str) -> tuple[float, float, int]:
    values = [r["metrics"][metric] for r in group if r.get("status") == "ok" and metric in r.get("metrics", {})]
    if not values:
        return math.nan, math.nan, 0
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def table(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per swept value, the metric's mean (and std over seeds), runs, failures."""
    keys = _swept(sweep)
    header = [*keys, sweep.metric, "runs", "failed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for values, group in _groups(rows, keys).items():
        mean, std, n = _stats(group, sweep.metric)
        shown = "n/a" if n == 0 else (f"{mean:.4f} ± {std:.4f}" if n > 1 else f"{mean:.4f}")
        failed = sum(r.get("status") != "ok" for r in group)
        lines.append("| " + " | ".join([*(str(v) for v in values), shown, str(n), str(failed)]) + " |")
    return "\n".join(lines)


def _as_number(value: Any) -> float | None:
    match = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:e[-+]?\d+)?)\s*(ep|ba|sp|tok|dur)?\s*", str(value))
    return float(match.group(1)) if match else None


def plot(sweep: Sweep, rows: list[dict[str, Any]], path: Path) -> Path:
    """PNG of the metric against the first swept parameter (one line per value of any others;
    mean over seeds, bars: std)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _swept(sweep)
    x_key, rest = keys[0], keys[1:]
    x_values = sweep.parameters[x_key]
    numeric = all(_as_number(v) is not None for v in x_values)
    position = {str(v): (_as_number(v) if numeric else i) for i, v in enumerate(x_values)}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    by_rest = _groups(rows, rest) if rest else {(): rows}
    for rest_values, group in by_rest.items():
        xs, ys, errs = [], [], []
        for (x,), cell in _groups(group, [x_key]).items():
            mean, std, n = _stats(cell, sweep.metric)
            if n:
                xs.append(position[str(x)])
                ys.append(mean)
                errs.append(std)
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        label = ", ".join(f"{k}={v}" for k, v in zip(rest, rest_values, strict=True)) or None
        ax.errorbar(
            [xs[i] for i in order],
            [ys[i] for i in order],
            yerr=[errs[i] for i in order],
            marker="o",
            capsize=3,
            label=label,
        )
    ax.set_xticks(list(position.values()), [str(v) for v in x_values])
    ax.set_xlabel(x_key)
    ax.set_ylabel(sweep.metric)
    n_seeds = len({str(r["params"].get(SEED_KEY)) for r in rows})
    ax.set_title(f"{sweep.name} ({n_seeds} seed{'s' if n_seeds != 1 else ''} per point)")
    ax.grid(alpha=0.3)
    if rest:
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
