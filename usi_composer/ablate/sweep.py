"""A W&B sweep file, read and checked for the local runner, and its grid of points.

W&B expands grids on its server, so the grid is expanded here (a cartesian product of the
parameters' ``values``); each point's command line is formatted by wandb's own
``create_sweep_command_args`` (``${args_no_hyphens}``), so a point runs exactly as ``wandb agent``
would run it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from usi_composer.config import find_yaml
from usi_composer.errors import UsiError, first_line

__all__ = [
    "SEED_KEY",
    "Sweep",
    "SweepError",
    "grid",
    "grid_points",
    "load_sweep",
    "point_args",
    "point_id",
    "replace_values",
    "swept",
    "swept_assignment",
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
        key, text = swept_assignment("--values", assignment, "key=v1,v2,...", sweep, list(parameters))
        parameters[key] = [yaml.safe_load(v) for v in text.split(",") if v.strip()]
    return Sweep(sweep.name, sweep.path, sweep.metric, sweep.goal, parameters, sweep.base)


def swept_assignment(option: str, assignment: str, expected: str, sweep: Sweep, keys: list[str]) -> tuple[str, str]:
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


def point_id(params: dict[str, Any]) -> str:
    """A point's identity: its ``key=value`` arguments, as one string."""
    return " ".join(point_args(params))


def grid_points(sweep: Sweep, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The grid, with ``trainer.seed`` swept over ``seeds`` too."""
    parameters = dict(sweep.parameters)
    if seeds:
        if SEED_KEY in parameters:
            raise SweepError(f"{sweep.path}: parameters.{SEED_KEY}: already swept; drop --seeds")
        parameters[SEED_KEY] = list(seeds)
    return grid(parameters)


def swept(sweep: Sweep) -> list[str]:
    """The swept keys a report tells apart (every one but the seed)."""
    return [k for k in sweep.parameters if k != SEED_KEY]
