"""``usi-benchmark-backbones``: the speed-accuracy Pareto plot of timm backbones from real runs.

    usi-benchmark-backbones --results runs/ablations/backbones/results.jsonl --image-size 32 --num-classes 10
    usi-benchmark-backbones resnet50 deit_small_patch16_224 --wandb-dir wandb/ --device cuda --amp bf16

Measures each model's inference throughput (BatchNorm folded, warm-up, median over timed
blocks), takes each model's top-1 from finished runs (the runner's results.jsonl, W&B run
folders, or a CSV with model,top1 columns; mean and standard deviation over a model's runs, e.g.
its seeds) and writes <out>/pareto.png (the spread drawn as error bars), pareto.md and
throughput.json. Models not given: those that have a finished run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from usi_composer import redaction
from usi_composer.cli._common import fail
from usi_composer.errors import UsiError
from usi_composer.pareto import (
    AMP_DTYPES,
    DEFAULT_METRICS,
    load_top1,
    markdown_table,
    measure_throughput,
    plot_pareto,
    throughput_json,
)

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    redaction.install()
    parser = argparse.ArgumentParser(prog="usi-benchmark-backbones", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="timm model names (default: the models with finished runs)")
    parser.add_argument("--results", action="append", default=[], help="usi-ablate results.jsonl (repeatable)")
    parser.add_argument("--wandb-dir", action="append", default=[], help="W&B run folder(s), e.g. wandb/ (repeatable)")
    parser.add_argument("--csv", action="append", default=[], help="CSV with columns model,top1 (repeatable)")
    parser.add_argument(
        "--metric",
        action="append",
        help="accuracy metric to read from the runs (repeatable: the first a run has wins; default: "
        + " then ".join(DEFAULT_METRICS)
        + ")",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224, help="input resolution (pixels)")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default="none", help="autocast dtype")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True, help="as the paper does")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed batches per model")
    parser.add_argument("--out", type=Path, default=Path("runs/pareto"))
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1 or args.image_size < 8 or args.warmup < 0 or args.min_run_time <= 0:
            raise UsiError("--batch-size >= 1, --image-size >= 8, --warmup >= 0 and --min-run-time > 0, please")
        metrics = args.metric or list(DEFAULT_METRICS)
        top1 = load_top1(args.results, args.wandb_dir, args.csv, metrics)
        models = args.models or sorted(top1)
        if not models:
            raise UsiError("no models: name some, or point --results/--wandb-dir/--csv at finished runs")
        speeds = []
        for i, name in enumerate(models, 1):
            print(f"[{i}/{len(models)}] {name}: timing ...", end=" ", flush=True)
            s = measure_throughput(
                name,
                batch_size=args.batch_size,
                image_size=args.image_size,
                num_classes=args.num_classes,
                device=args.device,
                amp=args.amp,
                channels_last=args.channels_last,
                fold_bn=args.fold_bn,
                warmup=args.warmup,
                min_run_time=args.min_run_time,
            )
            print(f"{s.images_per_s:.1f} images/s (median of {s.runs}, {s.bn_folded} BN folded)", flush=True)
            speeds.append(s)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "throughput.json").write_text(throughput_json(speeds) + "\n")
        report = markdown_table(speeds, top1)
        (args.out / "pareto.md").write_text(f"# Speed-accuracy Pareto\n\n{report}\n")
        png = plot_pareto(speeds, top1, args.out / "pareto.png", "top-1 (" + " or ".join(metrics) + ")")
    except UsiError as e:
        return fail(e)
    print(f"\n{report}\n\ntable: {args.out / 'pareto.md'}\nplot:  {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
