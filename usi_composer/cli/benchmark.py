"""``usi-benchmark-backbones``: the speed-accuracy Pareto plot of timm backbones from real runs.

    usi-benchmark-backbones --config yamls/demo.yaml --results runs/ablations/backbones/results.jsonl
    usi-benchmark-backbones resnet50 deit_small_patch16_224 --wandb-dir wandb/ --device cuda --precision amp_bf16

Measures each model's inference throughput (BatchNorm folded, warm-up, median over timed
blocks), takes each model's top-1 from finished runs (the runner's results.jsonl, W&B run
folders, or a CSV with model,top1 columns; mean and standard deviation over a model's runs, e.g.
its seeds; runs of different sweep points are refused: --where picks one) and writes
<out>/pareto.png (the spread drawn as error bars), pareto.md and throughput.json. Models not
given: those that have a finished run. The image size and the class count come from the runs'
yaml (--config YAML [key=value ...]), or --image-size and --num-classes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from usi_composer import redaction, storage
from usi_composer.cli._common import PRECISIONS, fail, new_parser
from usi_composer.errors import UsiError

__all__ = ["build_parser", "main"]

METRICS_HELP = "metrics/eval_best/top1 then metrics/eval/top1"  # pareto.DEFAULT_METRICS (a test holds it)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser("usi-benchmark-backbones", __doc__.splitlines()[0])
    parser.add_argument(
        "models",
        nargs="*",
        metavar="MODEL or key=value",
        help="timm model names (default: the models with finished runs), and overrides of --config",
    )
    parser.add_argument(
        "--config",
        metavar="YAML",
        help="the runs' yaml, whose data.image_size and data.num_classes the models are built for "
        "(default: none; --image-size and --num-classes)",
    )
    parser.add_argument(
        "--results", action="append", default=[], help="usi-ablate results.jsonl (repeatable; default: none)"
    )
    parser.add_argument(
        "--wandb-dir", action="append", default=[], help="W&B run folder(s), e.g. wandb/ (repeatable; default: none)"
    )
    parser.add_argument(
        "--csv", action="append", default=[], help="CSV with columns model,top1 (repeatable; default: none)"
    )
    parser.add_argument(
        "--metric",
        action="append",
        help=f"accuracy metric to read from the runs (repeatable: the first a run has wins; default: {METRICS_HELP})",
    )
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only the runs with this value: a swept parameter of a results.jsonl row, a config key of a W&B run "
        "(repeatable; default: every run)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per timed batch")
    parser.add_argument(
        "--image-size", type=int, help="input resolution in pixels (default: data.image_size of --config, else 224)"
    )
    parser.add_argument(
        "--num-classes", type=int, help="classifier outputs (default: data.num_classes of --config, else 1000)"
    )
    parser.add_argument("--device", help="torch device (default: cuda where available, else cpu)")
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="fp32", help="as trainer.precision: autocast dtype of the forward"
    )
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels-last memory format"
    )
    parser.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True, help="as the paper does")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--min-run-time", type=float, default=2.0, help="seconds of timed batches per model")
    parser.add_argument("--out", type=Path, default=Path("runs/pareto"), help="output folder")
    return parser


def _sizes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[list[str], int, int]:
    """The model names, the image size and the class count (from --config where given)."""
    models = [a for a in args.models if "=" not in a]
    overrides = [a for a in args.models if "=" in a]
    image_size, num_classes = args.image_size, args.num_classes
    if overrides and args.config is None:
        parser.error(f"{overrides[0]}: key=value overrides need --config YAML")
    if args.config is not None:
        from usi_composer.config import load_config

        data = load_config(args.config, overrides).data
        image_size = image_size or data.image_size
        num_classes = num_classes or data.num_classes
        print(f"{args.config}: {image_size} px, {num_classes} classes")
    return models, image_size or 224, num_classes or 1000


def main(argv: Sequence[str] | None = None) -> int:
    redaction.install()
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)  # options may sit among the models and overrides
    try:
        models, image_size, num_classes = _sizes(parser, args)
        if args.batch_size < 1 or image_size < 8 or args.warmup < 0 or args.min_run_time <= 0:
            raise UsiError("--batch-size >= 1, --image-size >= 8, --warmup >= 0 and --min-run-time > 0, please")
        from usi_composer import pareto  # heavy imports after --help

        metrics = args.metric or list(pareto.DEFAULT_METRICS)
        top1 = pareto.load_top1(args.results, args.wandb_dir, args.csv, metrics, where=args.where)
        models = models or sorted(top1)
        if not models:
            raise UsiError("no models: name some, or point --results/--wandb-dir/--csv at finished runs")
        device = args.device or ("cuda" if pareto.torch.cuda.is_available() else "cpu")
        speeds = []
        for i, name in enumerate(models, 1):
            print(f"[{i}/{len(models)}] {name}: timing ...", end=" ", flush=True)
            s = pareto.measure_throughput(
                name,
                batch_size=args.batch_size,
                image_size=image_size,
                num_classes=num_classes,
                device=device,
                precision=args.precision,
                channels_last=args.channels_last,
                fold_bn=args.fold_bn,
                warmup=args.warmup,
                min_run_time=args.min_run_time,
            )
            print(f"{s.images_per_s:.1f} images/s (median of {s.runs}, {s.bn_folded} BN folded)", flush=True)
            speeds.append(s)
        report, png = _write(args.out, speeds, top1, metrics)
    except UsiError as e:
        return fail(e)
    print(f"\n{report}\n\ntable: {args.out / 'pareto.md'}\nplot:  {png}")
    return 0


def _write(out: Path, speeds: list, top1: dict, metrics: list[str]) -> tuple[str, Path]:
    from usi_composer.pareto import markdown_table, plot_pareto, throughput_json

    out.mkdir(parents=True, exist_ok=True)
    storage.atomic_write(out / "throughput.json", (throughput_json(speeds) + "\n").encode())
    report = markdown_table(speeds, top1)
    storage.atomic_write(out / "pareto.md", f"# Speed-accuracy Pareto\n\n{report}\n".encode())
    return report, plot_pareto(speeds, top1, out / "pareto.png", "top-1 (" + " or ".join(metrics) + ")")


if __name__ == "__main__":
    sys.exit(main())
