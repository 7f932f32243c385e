"""``composer train.py YAML [key=value ...]``: train a timm backbone with the USI scheme.

Also ``python train.py ...`` (one process) and the ``usi-train`` console script.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from usi_composer import redaction
from usi_composer.cli._common import config_parser, fail
from usi_composer.config import dump_config, load_config
from usi_composer.errors import UsiError

__all__ = ["main"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = config_parser(
        "train.py",
        "Train any timm backbone with the USI scheme (knowledge distillation, EMA, "
        "MixUp/CutMix). Overrides use dot paths, e.g. model.name=resnet50 trainer.max_duration=100ep.",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, print it resolved as YAML and exit; on stderr, the size each model "
        "is built for (checked by one forward on PyTorch's meta device: no weights, no data, no training)",
    )
    parser.add_argument(
        "--metrics-out",
        type=Path,
        metavar="JSON",
        help="after training, write the final eval metrics (metrics/eval/top1, ...) to this JSON file",
    )
    return parser.parse_intermixed_args(argv)  # options may sit among the key=value overrides


def main(argv: Sequence[str] | None = None) -> int:
    redaction.install()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except UsiError as e:
        return fail(e)
    if args.dry_run:
        from usi_composer.builders import check_model_sizes

        try:
            sizes = check_model_sizes(cfg)
        except UsiError as e:
            return fail(e)
        print(dump_config(cfg, redacted=True), end="")
        print("\n".join(sizes), file=sys.stderr)
        return 0
    from usi_composer.training import final_metrics, train  # heavy imports only when training

    try:
        trainer = train(cfg)
    except UsiError as e:  # a ConfigError found while building (a model that cannot run at its size, ...): 2
        return fail(e)
    metrics = final_metrics(trainer)
    trainer.close()  # finishes the W&B run (its summary and files) before we report success
    if args.metrics_out is not None:
        args.metrics_out.parent.mkdir(parents=True, exist_ok=True)
        args.metrics_out.write_text(json.dumps(metrics, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
