"""``usi-demo`` (``make demo``): USI end to end on a small real dataset, on the CPU, in minutes.

A teacher, then the same student without and with USI distillation at each seed, on scikit-learn's
digits (``usi_composer.demo``); prints top-1 on the held-out split, averaged over the seeds.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from usi_composer import redaction
from usi_composer.cli._common import add_no_progress, fail, new_parser, seed_list
from usi_composer.errors import UsiError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("usi-demo", __doc__.splitlines()[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(".cache/usi-demo"),
        help="where the digits and the teacher's weights go (reused when present)",
    )
    parser.add_argument(
        "--seeds",
        type=seed_list,
        default=[0, 1, 2],
        metavar="S1,S2",
        help="train each student at these trainer.seed values, the teacher once at the first (default: 0,1,2)",
    )
    parser.add_argument(
        "--yamls",
        type=Path,
        help="folder holding demo.yaml and demo_teacher.yaml (default: the recipe's own, installed with it)",
    )
    parser.add_argument(
        "--batches",
        type=int,
        metavar="N",
        help="train each run for N batches only: a quick check that an install works "
        "(the accuracies then mean nothing; its teacher is kept apart from the real one; default: full runs)",
    )
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="overrides for the two student runs")
    add_no_progress(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    redaction.install()
    args = build_parser().parse_args(argv)
    from usi_composer.demo import run_demo  # heavy imports after --help

    try:
        result = run_demo(
            args.workdir, args.yamls, args.seeds, args.overrides, progress=not args.no_progress, batches=args.batches
        )
    except UsiError as e:
        return fail(e)
    print(result.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
