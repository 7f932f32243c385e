"""A sweep's report: the markdown tables (per point, against the reference, where the teacher's
outputs came from) and the plot of the metric against the swept values."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from usi_composer.ablate.stats import Estimate, estimate, paired
from usi_composer.ablate.sweep import SEED_KEY, Sweep, SweepError, swept, swept_assignment
from usi_composer.plotting import new_figure, save_figure

__all__ = ["comparisons", "plot", "reference_point", "report", "table", "teachers"]


def _groups(rows: list[dict[str, Any]], keys: list[str]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(row["params"].get(k) for k in keys), []).append(row)
    return groups


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
    keys = swept(sweep)
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
    keys = swept(sweep)
    reference: dict[str, Any] = {}
    for key in keys:
        node = config
        for part in key.split("."):
            node = getattr(node, part, None)
        reference[key] = node
    for assignment in assignments:
        key, text = swept_assignment("--reference", assignment, "key=value", sweep, keys)
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
    keys = swept(sweep)
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
    keys = swept(sweep)
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
    _label(ax, sweep, rows, x_key, position)
    return save_figure(fig, path)


def _label(ax: Any, sweep: Sweep, rows: list[dict[str, Any]], x_key: str, position: dict[str, Any]) -> None:
    """The plot's ticks (the swept values, slanted where long), axis names, title, grid and legend."""
    x_values = sweep.parameters[x_key]
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
