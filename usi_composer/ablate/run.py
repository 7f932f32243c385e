"""Running a sweep: every point's config validated first, then one point after another, each a
subprocess (``python -m usi_composer.cli.train``) so that a crash in one point cannot take the runner
down, its output in a log and its row in ``results.jsonl``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from usi_composer.ablate.caches import TeacherPlan, plan_now, plan_teacher_caches, run_order
from usi_composer.ablate.results import append_row, read_rows
from usi_composer.ablate.sweep import Sweep, grid_points, point_args, point_id
from usi_composer.config import load_config
from usi_composer.redaction import redact, redact_argv, redact_text

__all__ = ["run_sweep"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", text)[:150]


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
    teacher_cache: str | None = None,
) -> list[dict[str, Any]]:
    """Run every point of ``sweep``'s grid on ``base`` + ``overrides`` one after another.

    Appends one JSON row per finished point to ``out_dir/results.jsonl`` as soon as it finishes
    (``status`` ok or failed, the metrics, the point's parameters); points already finished with
    the same base, overrides and parameters are skipped, failed ones run again. Every point's
    config is validated before the first one runs. Returns the rows of this grid, in grid order.

    ``teacher_cache``: where the points' teacher outputs are cached (:func:`plan_teacher_caches`:
    the first run of a group fills a cache, the others read it; each row's ``teacher`` says which);
    None: every point runs its teacher. A reader whose cache was not filled (its writer failed)
    runs its teacher online; a writer whose cache is filled already (a rerun with new values, or
    another sweep sharing ``teacher_cache``) reads it.
    """
    points = grid_points(sweep, seeds)
    out_dir = out_dir or Path("runs/ablations") / sweep.path.stem
    fixed = ["trainer.progress_bar=false", *overrides]  # logs go to files: no progress bars
    configs, plans = _validated(points, base, fixed, teacher_cache)
    first = next(iter(configs.values()))
    if first.loggers.wandb is not None and first.loggers.wandb.group is None:
        fixed.append(f"loggers.wandb.group={_slug(sweep.name)}")  # the sweep's runs side by side in W&B

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "logs").mkdir(exist_ok=True)
    results = out_dir / "results.jsonl"
    # What the runner writes (results.jsonl, the logs' first line) is redacted: a point is found
    # again by its redacted command line (secrets do not tell points apart).
    runner = _Runner(
        sweep.metric, base, fixed, out_dir, python, echo, {"base": str(base), "overrides": redact_argv(fixed)}
    )
    done = {
        r["point"]: r
        for r in read_rows(results)
        if r.get("status") == "ok" and all(r.get(k) == v for k, v in runner.signature.items())
    }
    by_pid = {point_id(params): params for params in points}
    by_point: dict[str, dict[str, Any]] = {}
    echo(f"{sweep.name}: {len(points)} points on {base}, results in {results}")
    for i, pid in enumerate(run_order(list(by_pid), plans), 1):
        params = by_pid[pid]
        point = " ".join(redact_argv(point_args(params)))  # the point as written and printed (redacted)
        step = f"[{i}/{len(points)}] {point}"
        if point in done:
            echo(f"{step}: done before, skipped ({sweep.metric} = {_fmt(done[point], sweep.metric)})")
            by_point[pid] = done[point]
            continue
        plan = plan_now(plans.get(pid, TeacherPlan("online")), configs[pid])
        by_point[pid] = runner.run(step, point, params, configs[pid], plan)
        append_row(results, by_point[pid])
    return [by_point[pid] for pid in by_pid]


def _validated(
    points: list[dict[str, Any]], base: Path, fixed: list[str], teacher_cache: str | None
) -> tuple[dict[str, Any], dict[str, TeacherPlan]]:
    """Every point's config (validated before any point runs) and its teacher plan."""
    configs = {point_id(params): load_config(base, [*fixed, *point_args(params)]) for params in points}
    plans = plan_teacher_caches(configs, teacher_cache) if teacher_cache else {}
    for params in points:  # with the cache keys on top, each point's config is still valid
        if plans and plans[point_id(params)].overrides():
            load_config(base, [*fixed, *point_args(params), *plans[point_id(params)].overrides()])
    return configs, plans


@dataclass
class _Runner:
    """Runs one point as a subprocess training run, its output in a log, and makes its row."""

    metric: str
    base: Path
    fixed: list[str]
    out_dir: Path
    python: str
    echo: Callable[[str], None]
    signature: dict[str, Any]

    def run(self, step: str, point: str, params: dict[str, Any], cfg: Any, plan: TeacherPlan) -> dict[str, Any]:
        log = self.out_dir / "logs" / f"{_slug(point)}.log"
        metrics_file = self.out_dir / "logs" / f"{_slug(point)}.metrics.json"
        metrics_file.unlink(missing_ok=True)
        command = [self.python, "-m", "usi_composer.cli.train", str(self.base), *self.fixed, *point_args(params)]
        command += [*plan.overrides(), "--metrics-out", str(metrics_file)]
        if cfg.loggers.wandb is not None and cfg.loggers.wandb.name is None:
            command.insert(-2, f"loggers.wandb.name={_slug(point)[:128]}")  # the W&B run named after its point
        cached = {"online": "", "write": ", filling the teacher cache", "read": ", reading the teacher cache"}
        self.echo(f"{step}: running{cached[plan.role]} (log: {log})")
        start = time.perf_counter()
        with log.open("w") as f:
            f.write(" ".join(redact_argv(command)) + "\n\n")
            f.flush()
            returncode = subprocess.call(command, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        seconds = round(time.perf_counter() - start, 1)
        teacher = {"online": "online", "write": f"filled {plan.uri}", "read": f"read {plan.uri}"}[plan.role]
        row: dict[str, Any] = {
            "point": point,
            "params": redact(params),
            "model": cfg.model.name,
            **self.signature,
            "seconds": seconds,
            "log": str(log),
            "teacher": teacher,
        }
        if returncode == 0 and metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            row.update(status="ok", wandb_run_dir=metrics.pop("wandb_run_dir", None), metrics=metrics)
            self.echo(f"{step}: ok, {self.metric} = {_fmt(row, self.metric)} ({seconds:.0f} s)")
        else:
            row.update(status="failed", error=redact_text(_error_line(log, returncode)), metrics={})
            self.echo(f"{step}: FAILED ({row['error']}); continuing")
        return row


def _fmt(row: dict[str, Any], metric: str) -> str:
    value = row.get("metrics", {}).get(metric)
    return "n/a" if value is None else f"{value:.4f}"
