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

from usi_composer.config import find_yaml, load_config
from usi_composer.errors import UsiError, first_line
from usi_composer.plotting import new_figure, save_figure
from usi_composer.redaction import redact, redact_argv, redact_text

__all__ = [
    "Estimate",
    "Paired",
    "Sweep",
    "SweepError",
    "TeacherPlan",
    "comparisons",
    "estimate",
    "finished_rows",
    "grid",
    "load_sweep",
    "paired",
    "plan_teacher_caches",
    "plot",
    "point_args",
    "read_rows",
    "reference_point",
    "replace_values",
    "report",
    "run_sweep",
    "table",
    "teachers",
]

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
    """Read and check a W&B sweep file (grid method, ``values``/``value`` parameters); ``path`` may
    name one of the recipe's own sweeps from anywhere (``yamls/sweeps/temperature.yaml``: :func:`find_yaml`)."""
    where = str(path)
    path = find_yaml(path)
    if not path.is_file():
        raise SweepError(f"{where}: no such sweep file")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{where}: not valid YAML: {first_line(e)}") from None
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
        key, text = _swept_assignment("--values", assignment, "key=v1,v2,...", sweep, list(parameters))
        parameters[key] = [yaml.safe_load(v) for v in text.split(",") if v.strip()]
    return Sweep(sweep.name, sweep.path, sweep.metric, sweep.goal, parameters, sweep.base)


def _swept_assignment(option: str, assignment: str, expected: str, sweep: Sweep, keys: list[str]) -> tuple[str, str]:
    """``key=text`` given to ``option`` -> (key, text); a one-line error unless ``key`` is one of ``keys``."""
    key, sep, text = assignment.partition("=")
    if not sep or not text.strip():
        raise SweepError(f"{option} '{assignment}': expected {expected}")
    if key not in keys:
        raise SweepError(f"{option} '{assignment}': '{key}' is not swept by {sweep.path} ({', '.join(keys)})")
    return key, text


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


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``results.jsonl`` in order, ``[]`` for none; a row cut short (a runner killed
    while writing it, always the last) is left out: its point counts as not run."""
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


@dataclass(frozen=True)
class TeacherPlan:
    """Where a point's teacher outputs come from: ``online`` (its teacher runs), ``write`` (its
    teacher runs and fills the cache at ``uri``) or ``read`` (it reads them from ``uri``)."""

    role: str
    uri: str | None = None

    def overrides(self) -> list[str]:
        key = {"write": "cache_write", "read": "cache"}.get(self.role)
        return [f"algorithms.distillation.{key}={self.uri}"] if key else []


def plan_teacher_caches(configs: dict[str, Any], root: str) -> dict[str, TeacherPlan]:
    """Which points share a teacher cache under ``root``: the points whose teacher sees the same
    inputs (``teacher_cache.sweep_group``: a temperature, alpha, ce_weight, learning-rate or
    same-normalization backbone sweep; not a seed, image-size or augmentation one) form a group;
    of two or more, the longest run (the first of the longest, in grid order) fills the group's
    cache and the others read it. A point alone in its group, or one that does not distil, runs
    its teacher online. ``configs``: each point's config, by point id, in grid order."""
    from composer.core import Time

    from usi_composer.teacher_cache import sweep_group

    groups: dict[str, list[str]] = {}
    for pid, cfg in configs.items():
        group = sweep_group(cfg)
        if group is not None:
            groups.setdefault(group, []).append(pid)
    plans = {pid: TeacherPlan("online") for pid in configs}
    for group, pids in groups.items():
        if len(pids) < 2:
            continue
        uri = f"{root.rstrip('/')}/{group}"
        longest = max(pids, key=lambda p: Time.from_timestring(configs[p].trainer.max_duration).value)
        for pid in pids:
            plans[pid] = TeacherPlan("write" if pid == longest else "read", uri)
    return plans


def _run_order(pids: list[str], plans: dict[str, TeacherPlan]) -> list[str]:
    """Grid order, except that a group's writer runs before the first of its readers."""
    writers = {plan.uri: pid for pid, plan in plans.items() if plan.role == "write"}
    order: list[str] = []
    for pid in pids:
        plan = plans.get(pid, TeacherPlan("online"))
        writer = writers.get(plan.uri) if plan.role == "read" else None
        for p in (writer, pid):
            if p is not None and p not in order:
                order.append(p)
    return order


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
    points = _points(sweep, seeds)
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
    by_pid = {_point_id(params): params for params in points}
    by_point: dict[str, dict[str, Any]] = {}
    echo(f"{sweep.name}: {len(points)} points on {base}, results in {results}")
    for i, pid in enumerate(_run_order(list(by_pid), plans), 1):
        params = by_pid[pid]
        point = " ".join(redact_argv(point_args(params)))  # the point as written and printed (redacted)
        step = f"[{i}/{len(points)}] {point}"
        if point in done:
            echo(f"{step}: done before, skipped ({sweep.metric} = {_fmt(done[point], sweep.metric)})")
            by_point[pid] = done[point]
            continue
        plan = _plan_now(plans.get(pid, TeacherPlan("online")), configs[pid])
        by_point[pid] = runner.run(step, point, params, configs[pid], plan)
        _append_row(results, by_point[pid])
    return [by_point[pid] for pid in by_pid]


def _points(sweep: Sweep, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The grid, with ``trainer.seed`` swept over ``seeds`` too."""
    parameters = dict(sweep.parameters)
    if seeds:
        if SEED_KEY in parameters:
            raise SweepError(f"{sweep.path}: parameters.{SEED_KEY}: already swept; drop --seeds")
        parameters[SEED_KEY] = list(seeds)
    return grid(parameters)


def _validated(
    points: list[dict[str, Any]], base: Path, fixed: list[str], teacher_cache: str | None
) -> tuple[dict[str, Any], dict[str, TeacherPlan]]:
    """Every point's config (validated before any point runs) and its teacher plan."""
    configs = {_point_id(params): load_config(base, [*fixed, *point_args(params)]) for params in points}
    plans = plan_teacher_caches(configs, teacher_cache) if teacher_cache else {}
    for params in points:  # with the cache keys on top, each point's config is still valid
        if plans and plans[_point_id(params)].overrides():
            load_config(base, [*fixed, *point_args(params), *plans[_point_id(params)].overrides()])
    return configs, plans


def _plan_now(plan: TeacherPlan, cfg: Any) -> TeacherPlan:
    """The plan, as the caches stand now: a reader whose writer did not fill its cache runs online;
    a writer whose cache is filled already (a rerun, or another sweep into the same cache) reads it."""
    filled = plan.role != "online" and _cache_filled(plan.uri, cfg)
    if plan.role == "read" and not filled:
        return TeacherPlan("online")
    if plan.role == "write" and filled:
        return TeacherPlan("read", plan.uri)
    return plan


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


def _cache_filled(uri: str | None, cfg: Any) -> bool:
    from usi_composer.teacher_cache import cache_covers

    return uri is not None and cache_covers(uri, cfg.trainer.max_duration, cfg.trainer.global_batch_size)


def finished_rows(sweep: Sweep, out_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``out_dir/results.jsonl`` for ``sweep``'s parameters, the latest per point."""
    rows = [r for r in read_rows(out_dir / "results.jsonl") if set(_swept(sweep)) <= set(r.get("params", {}))]
    if not rows:
        raise SweepError(f"{out_dir / 'results.jsonl'}: no finished points of {sweep.path} to report")
    latest = list({r["point"]: r for r in rows}.values())
    # in grid order (a sweep with cached teacher outputs runs each group's longest point first)
    order = [tuple(str(v) for v in p.values()) for p in grid({k: sweep.parameters[k] for k in _swept(sweep)})]
    position = {values: i for i, values in enumerate(order)}
    return sorted(latest, key=lambda r: position.get(tuple(str(r["params"].get(k)) for k in _swept(sweep)), len(order)))


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


@dataclass(frozen=True)
class Estimate:
    """Mean of ``n`` values with their sample standard deviation and a t-interval for the mean."""

    mean: float
    std: float  # sample standard deviation (n - 1); 0 for one value
    n: int
    low: float  # the confidence interval; nan for fewer than 2 values
    high: float


def estimate(values: Sequence[float], level: float = 0.95) -> Estimate:
    """Mean, standard deviation and the ``level`` t-interval (Student's t, n - 1 degrees of freedom)."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, 0, math.nan, math.nan)
    mean = statistics.fmean(values)
    if n == 1:
        return Estimate(mean, 0.0, 1, math.nan, math.nan)
    std = statistics.stdev(values)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return Estimate(mean, std, n, mean - half, mean + half)


@dataclass(frozen=True)
class Paired:
    """A point against the reference over the seeds both finished: differences point - reference."""

    diff: Estimate  # mean difference and its t-interval
    t_p: float  # two-sided paired t-test p-value; nan for fewer than 2 pairs
    better: int  # seeds where the point beat the reference
    worse: int
    tied: int
    sign_p: float  # two-sided exact sign test p-value over the untied pairs


def paired(values: Sequence[float], reference: Sequence[float], level: float = 0.95) -> Paired:
    """Paired comparison of ``values`` with ``reference`` (the same seeds, in the same order):
    the mean difference with its t-interval, the paired t-test and the sign test, which assumes
    nothing about the differences' distribution (with 5 pairs its smallest p is 2/32 = 0.0625)."""
    from scipy import stats

    diffs = [v - r for v, r in zip(values, reference, strict=True)]
    diff = estimate(diffs, level)
    if diff.n < 2:
        t_p = math.nan
    elif diff.std == 0:  # every seed moved by the same amount: t is infinite, or 0/0 when nothing moved
        t_p = 1.0 if diff.mean == 0 else 0.0
    else:
        t = diff.mean / (diff.std / math.sqrt(diff.n))
        t_p = float(2 * stats.t.sf(abs(t), diff.n - 1))
    better, worse = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    sign_p = float(stats.binomtest(better, better + worse).pvalue) if better + worse else 1.0
    return Paired(diff, t_p, better, worse, len(diffs) - better - worse, sign_p)


def _ok_values(group: list[dict[str, Any]], metric: str) -> dict[Any, float]:
    """The metric of each finished run, by seed (None where the seed is the base config's)."""
    return {
        r["params"].get(SEED_KEY): r["metrics"][metric]
        for r in group
        if r.get("status") == "ok" and metric in r.get("metrics", {})
    }


def _stats(group: list[dict[str, Any]], metric: str) -> Estimate:
    return estimate(list(_ok_values(group, metric).values()))


def _number(x: float, sign: str = "") -> str:
    return f"{round(x, 4) + 0.0:{sign}.4f}"  # + 0.0: a difference rounding to zero shows no minus sign


def _interval(e: Estimate, sign: str = "") -> str:
    return "n/a" if math.isnan(e.low) else f"[{_number(e.low, sign)}, {_number(e.high, sign)}]"


def table(sweep: Sweep, rows: list[dict[str, Any]]) -> str:
    """Markdown table: one line per swept value, the metric's mean ± standard deviation over seeds,
    the 95% t-interval of the mean, runs, failures."""
    keys = _swept(sweep)
    header = [*keys, f"{sweep.metric} (mean ± std)", "95% CI", "runs", "failed"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for values, group in _groups(rows, keys).items():
        e = _stats(group, sweep.metric)
        shown = "n/a" if e.n == 0 else (f"{e.mean:.4f} ± {e.std:.4f}" if e.n > 1 else f"{e.mean:.4f}")
        failed = sum(r.get("status") != "ok" for r in group)
        lines.append("| " + " | ".join([*(str(v) for v in values), shown, _interval(e), str(e.n), str(failed)]) + " |")
    return "\n".join(lines)


def _same(a: Any, b: Any) -> bool:
    return a == b or str(a) == str(b)


def reference_point(sweep: Sweep, config: Any, assignments: Sequence[str] = ()) -> dict[str, Any] | None:
    """The point the others are compared with: ``key=value`` ``assignments`` (values read as YAML),
    and for the swept keys they leave out, the value ``config`` (the base config) has.
    None when that point is not in the grid (no comparison, e.g. a backbone sweep)."""
    keys = _swept(sweep)
    reference: dict[str, Any] = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = getattr(node, part, None)
        reference[key] = node
    for assignment in assignments:
        key, text = _swept_assignment("--reference", assignment, "key=value", sweep, keys)
        value = yaml.safe_load(text)
        if not any(_same(value, v) for v in sweep.parameters[key]):
            raise SweepError(f"--reference '{assignment}': not one of the swept values {sweep.parameters[key]}")
        reference[key] = value
    if not all(any(_same(reference[k], v) for v in sweep.parameters[k]) for k in keys):
        return None
    return {k: next(v for v in sweep.parameters[k] if _same(reference[k], v)) for k in keys}


def comparisons(sweep: Sweep, rows: list[dict[str, Any]], reference: dict[str, Any]) -> str:
    """Markdown table of every point against ``reference``, paired by seed (the same seed means the
    same initialization and data order): mean difference, its 95% t-interval, paired t-test and sign test."""
    keys = _swept(sweep)
    groups = _groups(rows, keys)
    ref_key = tuple(reference[k] for k in keys)
    ref_values = _ok_values(groups.get(ref_key, []), sweep.metric)
    name = ", ".join(f"{k}={v}" for k, v in reference.items())
    header = [*keys, "pairs", "mean difference", "95% CI", "paired t-test p", "better / worse / tied", "sign test p"]
    lines = [
        f"Each point minus the reference ({name}), paired by seed; {sweep.metric}, "
        f"higher is {'better' if sweep.goal == 'maximize' else 'worse'}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for values, group in groups.items():
        cells = [str(v) for v in values]
        if values == ref_key:
            lines.append("| " + " | ".join([*cells, str(len(ref_values)), "reference", "", "", "", ""]) + " |")
            continue
        mine = _ok_values(group, sweep.metric)
        seeds = [s for s in mine if s in ref_values]
        if not seeds:
            lines.append("| " + " | ".join([*cells, "0", "n/a", "", "", "", ""]) + " |")
            continue
        p = paired([mine[s] for s in seeds], [ref_values[s] for s in seeds])
        t_p = "n/a" if math.isnan(p.t_p) else f"{p.t_p:.3f}"
        cells += [str(p.diff.n), _number(p.diff.mean, "+"), _interval(p.diff, "+"), t_p]
        cells += [f"{p.better} / {p.worse} / {p.tied}", f"{p.sign_p:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def teachers(rows: list[dict[str, Any]]) -> str:
    """Markdown table of where each point's teacher outputs came from (rows written without one: online)."""
    lines = [
        "Teacher outputs: `online` ran the teacher; `filled` ran it and stored its outputs (every logit, "
        "bit for bit) for the points that `read` them instead of running it (`usi-ablate --no-teacher-cache`: "
        "every point online).",
        "",
        "| point | teacher |",
        "|---|---|",
    ]
    lines += [f"| {r.get('point', '')} | {r.get('teacher', 'online')} |" for r in rows]
    return "\n".join(lines)


def report(sweep: Sweep, rows: list[dict[str, Any]], reference: dict[str, Any] | None) -> str:
    """The sweep's markdown report: the per-point table, with a reference the paired comparisons, and
    where the points read cached teacher outputs, which point's teacher ran and which read them."""
    parts = [f"# {sweep.name}", "", table(sweep, rows)]
    if reference is not None:
        parts += ["", comparisons(sweep, rows, reference)]
    if any(str(r.get("teacher", "online")) != "online" for r in rows):
        parts += ["", teachers(rows)]
    return "\n".join(parts) + "\n"


def _as_number(value: Any) -> float | None:
    match = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:e[-+]?\d+)?)\s*(ep|ba|sp|tok|dur)?\s*", str(value))
    return float(match.group(1)) if match else None


def plot(sweep: Sweep, rows: list[dict[str, Any]], path: Path, reference: dict[str, Any] | None = None) -> Path:
    """PNG of the metric against the first swept parameter (one line per value of any others):
    each seed's run as a dot, the mean over seeds, bars: its 95% t-interval; the reference ringed."""
    keys = _swept(sweep)
    x_key, rest = keys[0], keys[1:]
    x_values = sweep.parameters[x_key]
    numeric = all(_as_number(v) is not None for v in x_values)
    position = {str(v): (_as_number(v) if numeric else i) for i, v in enumerate(x_values)}
    fig, ax = new_figure((6, 4))
    by_rest = _groups(rows, rest) if rest else {(): rows}
    for rest_values, group in by_rest.items():
        xs, ys, lows, highs, dots = [], [], [], [], []
        for (x,), cell in _groups(group, [x_key]).items():
            e = _stats(cell, sweep.metric)
            if e.n:
                xs.append(position[str(x)])
                ys.append(e.mean)
                lows.append(0.0 if math.isnan(e.low) else e.mean - e.low)
                highs.append(0.0 if math.isnan(e.high) else e.high - e.mean)
                dots += [(position[str(x)], v) for v in _ok_values(cell, sweep.metric).values()]
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        label = ", ".join(f"{k}={v}" for k, v in zip(rest, rest_values, strict=True)) or "mean, 95% CI"
        line = ax.errorbar(
            [xs[i] for i in order],
            [ys[i] for i in order],
            yerr=[[lows[i] for i in order], [highs[i] for i in order]],
            marker="o",
            linestyle="-" if numeric else "none",  # no line between unordered categories (backbones)
            capsize=4,
            label=label,
            zorder=3,
        )
        if dots:
            color = line.lines[0].get_color()
            seeds_label = "one run per seed" if not rest else None
            ax.scatter(*zip(*dots, strict=True), s=10, color=color, alpha=0.35, zorder=2, label=seeds_label)
        if reference is not None and rest_values == tuple(reference[k] for k in rest):
            ref = _stats(_groups(group, [x_key]).get((reference[x_key],), []), sweep.metric)
            if ref.n:
                ax.scatter(
                    [position[str(reference[x_key])]],
                    [ref.mean],
                    s=160,
                    facecolors="none",
                    edgecolors="black",
                    zorder=4,
                    label="reference",
                )
    long_names = max(len(str(v)) for v in x_values) * len(x_values) > 48
    ax.set_xticks(
        list(position.values()),
        [str(v) for v in x_values],
        rotation=25 if long_names else 0,
        ha="right" if long_names else "center",
    )
    ax.set_xlabel(x_key)
    ax.set_ylabel(sweep.metric)
    n_seeds = len({str(r["params"].get(SEED_KEY)) for r in rows})
    ax.set_title(f"{sweep.name} ({n_seeds} seed{'s' if n_seeds != 1 else ''} per point; bars: 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save_figure(fig, path)
