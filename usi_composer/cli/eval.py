"""``usi-eval CONFIG [key=value ...]``: top-1 and top-5 of trained weights, as training evaluates them."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from usi_composer import redaction
from usi_composer.cli._common import add_checkpoint_options, add_no_progress, config_parser, fail
from usi_composer.errors import UsiError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = config_parser(
        "usi-eval",
        "Evaluate trained weights on the config's validation split (data.val_dir, or the MDS split "
        "data.streaming.val_split of data.remote / data.local) with the recipe's eval transform, loader, "
        "precision and metrics: the numbers training reported for those weights (metrics/eval/top1 for the "
        "EMA weights; metrics/eval_best/top1 where BestOfEMAAndRaw kept the raw ones). Print top-1 and top-5.",
        overrides="config overrides, in order (e.g. data.val_dir=...)",
    )
    add_checkpoint_options(
        parser,
        "a Composer checkpoint of the recipe (local path, s3://, gs://, ...), a weights file, a folder "
        "written by usi-export, or a save folder (its latest-rank0.pt)",
    )
    parser.add_argument(
        "--metrics-out",
        type=Path,
        metavar="JSON",
        help="also write the metrics (metrics/eval/top1, metrics/eval/top5), the sample count and which "
        "weights were evaluated to this JSON file (default: none written)",
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
        from usi_composer.evaluation import evaluate  # heavy imports

        result = evaluate(cfg, args.checkpoint, trust=args.trust_checkpoint)
    except UsiError as e:
        return fail(e)
    top1, top5 = result.metrics["metrics/eval/top1"], result.metrics["metrics/eval/top5"]
    print(f"top-1 {top1:.4f}  top-5 {top5:.4f}  ({result.samples} images of {result.split})")
    print(f"  {result.checkpoint}: {result.weights}")
    if args.metrics_out is not None:
        from usi_composer import storage

        report = {**result.metrics, "samples": result.samples, "checkpoint": result.checkpoint}
        storage.write_json(args.metrics_out, {**report, "weights": result.weights})
    return 0


if __name__ == "__main__":
    sys.exit(main())
