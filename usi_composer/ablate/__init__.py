"""Run a W&B sweep file's grid locally, without a W&B server: one normal training run per point.

The sweep files in yamls/sweeps/ are W&B's own format (``wandb sweep`` reads them unchanged).
W&B expands grids on its server, so the grid is expanded here (a cartesian product of the
parameters' ``values``); each point's command line is formatted by wandb's own
``create_sweep_command_args`` (``${args_no_hyphens}``), so a point runs exactly as ``wandb agent``
would run it. Each point is a subprocess (``python -m usi_composer.cli.train``): a crash in one
point cannot take the runner down.

- :mod:`~usi_composer.ablate.sweep`: the sweep file, read and checked, and its grid;
- :mod:`~usi_composer.ablate.caches`: which points share a teacher cache;
- :mod:`~usi_composer.ablate.run`: the runner, one subprocess per point;
- :mod:`~usi_composer.ablate.results`: ``results.jsonl``, written whole on each row, read back;
- :mod:`~usi_composer.ablate.stats`: t-intervals, the paired t-test and the sign test;
- :mod:`~usi_composer.ablate.report`: the markdown report and the plot.

The names below are re-exported so ``from usi_composer.ablate import run_sweep`` keeps working.
"""

from __future__ import annotations

from usi_composer.ablate.caches import TeacherPlan, plan_teacher_caches
from usi_composer.ablate.report import comparisons, plot, reference_point, report, table, teachers
from usi_composer.ablate.results import finished_rows, read_rows
from usi_composer.ablate.run import run_sweep
from usi_composer.ablate.stats import Estimate, Paired, estimate, paired
from usi_composer.ablate.sweep import Sweep, SweepError, grid, load_sweep, point_args, replace_values

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
