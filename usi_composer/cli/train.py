"""``composer train.py YAML [key=value ...]``: train a timm backbone with the USI scheme.

Also ``python train.py ...`` (one process) and the ``usi-train`` console script.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from usi_composer import redaction
from usi_composer.cli._common import add_no_progress, config_parser, fail
from usi_composer.errors import UsiError

if TYPE_CHECKING:
    from usi_composer.config import Config

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = config_parser(
        "usi-train",
        "Train any timm backbone with the USI scheme (knowledge distillation, EMA, "
        "MixUp/CutMix). Overrides use dot paths, e.g. model.name=resnet50 trainer.max_duration=100ep.",
        script="train.py",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="run every check that needs no weights or network (the config, the data's folders and classes, "
        "the checkpoints and their shapes, the models' kwargs and sizes: one forward on PyTorch's meta device), "
        "print the resolved config and the run plan as YAML and exit; on stderr, the size each model is built for",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="validate the config, print it resolved as YAML with the run plan, and exit: nothing on disk "
        "is checked (for a config written on one machine to run on another; --dry-run checks everything)",
    )
    parser.add_argument(
        "--metrics-out",
        type=Path,
        metavar="JSON",
        help="after training, write the final eval metrics (metrics/eval/top1, ...) to this JSON file "
        "(default: none written)",
    )
    add_no_progress(parser)  # = trainer.progress_bar=false
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    redaction.install()
    args = build_parser().parse_intermixed_args(argv)  # options may sit among the key=value overrides
    from usi_composer.config import load_config  # heavy imports after --help

    overrides = [*args.overrides, *(["trainer.progress_bar=false"] if args.no_progress else [])]
    try:
        cfg = load_config(args.config, overrides)
    except UsiError as e:
        return fail(e)
    if args.dry_run or args.print_config:
        return _dry_run(cfg, check=args.dry_run)
    from usi_composer.console import show_library_logs  # heavy imports only when training
    from usi_composer.training import final_metrics, run_summary, train

    show_library_logs()  # what was loaded, one line each (stdout)
    try:
        trainer = train(cfg)
    except UsiError as e:  # a ConfigError found while building (a model that cannot run at its size, ...): 2
        return fail(e)
    metrics = final_metrics(trainer)
    summary = run_summary(trainer, cfg, redaction.redact_text(shlex.join([args.config, *args.overrides])))
    trainer.close()  # finishes the W&B run (its summary and files) before we report success
    if args.metrics_out is not None:
        from usi_composer import storage

        storage.write_json(args.metrics_out, metrics)
        summary.append(f"metrics: {args.metrics_out}")
    print("\n".join(summary), flush=True)
    return 0


def _dry_run(cfg: Config, check: bool) -> int:
    """Print the resolved config and the run plan (as YAML comments, so the output loads back as a config);
    ``check``: first run the pre-flight, and print on stderr what each model is built for."""
    from usi_composer.config import dump_config
    from usi_composer.plan import describe, resolve
    from usi_composer.preflight import preflight

    try:
        plan = resolve(cfg)
        sizes = preflight(cfg, plan) if check else []
    except UsiError as e:
        return fail(e)
    print(dump_config(cfg, redacted=True), end="")
    print("# the run plan: what the config and this machine resolve to (usi_composer/plan.py)")
    print("\n".join(f"# {line}" for line in describe(plan)))
    print("\n".join([*sizes, *plan.notes]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
