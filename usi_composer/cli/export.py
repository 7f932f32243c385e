"""``usi-export CONFIG [key=value ...] --out FOLDER``: a trained student in timm's Hugging Face layout."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from usi_composer import redaction
from usi_composer.cli._common import add_checkpoint_options, config_parser, fail
from usi_composer.errors import UsiError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = config_parser(
        "usi-export",
        "Write the trained student of a run (its EMA weights where EMA ran; the raw weights where "
        "BestOfEMAAndRaw kept them) in timm's Hugging Face layout: FOLDER/model.safetensors and "
        "FOLDER/config.json, whose pretrained_cfg holds the input size, interpolation, crop_pct and mean/std the "
        "recipe evaluated with and the class names (label_names, label_descriptions), and FOLDER/README.md, a "
        "model card. timm loads it with timm.create_model('local-dir:FOLDER', pretrained=True). "
        "Give the config and overrides the run was trained with (the model, the classes and the eval transform "
        "come from them).",
        overrides="the run's config overrides, in order",
    )
    add_checkpoint_options(
        parser,
        "a Composer checkpoint of the recipe (local path, s3://, gs://, ...), a weights file of "
        "save_weights, or a save folder (its latest-rank0.pt)",
    )
    parser.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="the folder to write")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the model.safetensors, config.json and README.md FOLDER holds"
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="also upload it to the Hugging Face hub with timm's push_to_hf_hub (needs network and a token: "
        "HF_TOKEN or huggingface-cli login; default: no upload)",
    )
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    redaction.install()
    args = build_parser().parse_intermixed_args(argv)  # options may sit among the key=value overrides
    from usi_composer.config import load_config  # heavy imports after --help

    try:
        cfg = load_config(args.config, args.overrides)
        from usi_composer.export import export_for_timm, push_to_hub  # heavy imports

        export = export_for_timm(cfg, args.out, args.checkpoint, trust=args.trust_checkpoint, overwrite=args.overwrite)
    except UsiError as e:
        return fail(e)
    pretrained = export.config["pretrained_cfg"]
    size = pretrained["input_size"][-1]
    print(f"exported {export.config['architecture']} ({export.config['num_classes']} classes) to {export.folder}")
    print(f"  from {export.checkpoint}: {export.weights}")
    print(
        f"  eval transform: {size} px, crop_pct {pretrained['crop_pct']}, {pretrained['interpolation']}, "
        f"mean {list(pretrained['mean'])}, std {list(pretrained['std'])}"
    )
    labels = export.labels
    print(
        f"  label names: {len(labels.names)} from {labels.source}"
        if labels.names
        else f"  label names: none ({labels.source})"
    )
    top1 = "not measured" if export.top1 is None else f"{export.top1:.4f} (the run's last evaluation)"
    print(f"  model card: {export.folder / 'README.md'} (top-1 {top1})")
    print(f"  timm: timm.create_model('local-dir:{export.folder}', pretrained=True)")
    if args.push_to_hub:
        try:
            url = push_to_hub(export, args.push_to_hub, private=args.private)
        except UsiError as e:
            return fail(e)
        print(f"pushed to {url}: timm.create_model('hf-hub:{args.push_to_hub}', pretrained=True)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
