"""``usi-ablate SWEEP.yaml [--base YAML] [key=value ...]``: run a W&B sweep's grid locally.

    usi-ablate yamls/sweeps/temperature.yaml --base yamls/demo.yaml --seeds 0,1,2

One training run per grid point, one after another; results are appended to
``<out>/results.jsonl`` as each point finishes (rerun to resume: finished points are skipped,
failed ones retried), then a markdown report and a PNG plot of the sweep's metric against the
swept value are written next to it: per point the mean, standard deviation and 95% t-interval over
seeds, and each point against a reference point (``--reference``, default: the base config's
values) paired by seed. ``--report-only`` (or rerunning a finished sweep) rewrites them. With the
embedded demo's yaml as base (``yamls/demo.yaml``), the demo's data and teacher are prepared first
(reused when present), as ``usi-demo`` does.

The teacher runs once per group of points that feed it the same inputs (a temperature, alpha,
ce_weight, learning-rate, duration or same-normalization backbone sweep; per seed): the group's
longest point fills a cache of its outputs (``<out>/teacher-cache/``, or ``--teacher-cache URI``)
and the others read it, training exactly as with the online teacher. The report says which point
used which; ``--no-teacher-cache`` runs every point's teacher.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from usi_composer import redaction, storage
from usi_composer.cli._common import fail, new_parser, seed_list
from usi_composer.errors import UsiError

__all__ = ["build_parser", "main"]


def _resolve_base(base: Path | None, sweep_base: Path | None) -> Path:
    from usi_composer.config import find_yaml

    path = base or sweep_base
    if path is None:
        raise UsiError("the sweep's command names no yaml: pass --base YAML")
    path = find_yaml(path)  # the sweep files name the recipe's own yamls (yamls/usi.yaml)
    if not path.is_file():
        raise UsiError(f"{path}: no such base config")
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("usi-ablate", "Run a W&B sweep file's grid locally, one training run per point, no W&B server.")
    parser.add_argument("sweep", type=Path, help="W&B sweep file, e.g. yamls/sweeps/temperature.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for every point")
    parser.add_argument("--base", type=Path, help="training yaml (default: the one in the sweep's command)")
    parser.add_argument("--out", type=Path, help="output folder (default: runs/ablations/<sweep file name>)")
    parser.add_argument(
        "--values",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="replace a swept parameter's values (repeatable), e.g. trainer.max_duration=3ep,6ep,12ep "
        "(default: the sweep file's values)",
    )
    parser.add_argument(
        "--seeds",
        type=seed_list,
        default=[],
        metavar="S1,S2",
        help="repeat each point with these trainer.seed values (default: the base config's seed only)",
    )
    parser.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="the point the others are compared with, paired by seed (repeatable; default: the base config's values)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: write the table and plot from the points already in results.jsonl",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".cache/usi-demo"),
        help="with the demo's yaml as base: the demo's data and teacher, as usi-demo --workdir",
    )
    parser.add_argument(
        "--teacher-cache",
        metavar="URI",
        help="where the teacher outputs are cached: a folder or object-store URI (default: <out>/teacher-cache)",
    )
    parser.add_argument(
        "--no-teacher-cache", action="store_true", help="run every point's teacher (no cached teacher outputs)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    redaction.install()
    args = build_parser().parse_intermixed_args(argv)  # overrides may come before or after the flags
    # heavy imports after --help
    from usi_composer.ablate.report import plot, reference_point, report
    from usi_composer.ablate.results import finished_rows
    from usi_composer.ablate.run import run_sweep
    from usi_composer.ablate.sweep import load_sweep, replace_values
    from usi_composer.config import load_config
    from usi_composer.demo import demo_overrides

    try:
        sweep = replace_values(load_sweep(args.sweep), args.values)
        base = _resolve_base(args.base, sweep.base)
        out = args.out or Path("runs/ablations") / args.sweep.stem
        reference = reference_point(sweep, load_config(base, args.overrides), args.reference)
        if args.report_only:
            rows = finished_rows(sweep, out)
        else:
            overrides = [*demo_overrides(base, args.workdir), *args.overrides]
            cache = None if args.no_teacher_cache else args.teacher_cache or str(out / "teacher-cache")
            rows = run_sweep(sweep, base, overrides, out, seeds=args.seeds, teacher_cache=cache)
    except UsiError as e:
        return fail(e)
    except KeyboardInterrupt:
        print("\ninterrupted: finished points are in results.jsonl; rerun the same command to resume", file=sys.stderr)
        return 130
    text = report(sweep, rows, reference)
    storage.atomic_write(out / f"{args.sweep.stem}.md", text.encode())
    png = plot(sweep, rows, out / f"{args.sweep.stem}.png", reference)
    print(f"\n{text}\ntable: {out / (args.sweep.stem + '.md')}\nplot:  {png}")
    return _exit_code(rows)


def _exit_code(rows: list[dict]) -> int:
    """0 when every point finished; 2 when every failed point was refused (a rerun fails the same way
    until something is fixed), else 1. Each point is a training run exiting through ``fail()``; its
    row's error starts ``exit code N:``."""
    failed = [r for r in rows if r.get("status") != "ok"]
    if not failed:
        return 0
    refused = all(str(r.get("error", "")).startswith("exit code 2:") for r in failed)
    fix = "fix what the logs name, then rerun" if refused else "see the logs; rerun to retry them"
    print(f"{len(failed)} of {len(rows)} points failed ({fix})", file=sys.stderr)
    return 2 if refused else 1


if __name__ == "__main__":
    sys.exit(main())
