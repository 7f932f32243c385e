"""``usi-convert-imagenet SRC --out OUT``: an ImageNet folder -> MDS shards (the conversion itself, and what
it guarantees, is ``usi_composer/data/convert.py``). This module holds the command alone, so that its
``--help`` imports neither PIL nor streaming."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from usi_composer import redaction, storage
from usi_composer.cli._common import add_no_progress, fail, new_parser
from usi_composer.errors import UsiError

if TYPE_CHECKING:
    from usi_composer.data.convert import ConvertStats

__all__ = ["build_parser", "main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        "usi-convert-imagenet",
        "Convert an ImageNet folder (SRC/train/<wnid>/*.JPEG, optional SRC/val) to MDS shards "
        "at OUT: a local path or a remote (s3://, gs://, oci://, azure://, ...). "
        "For a local S3-compatible server set S3_ENDPOINT_URL. A split becomes visible only once complete: "
        "a failed or killed run leaves the previous split as it was.",
        epilog="exit status: 0 done; 2 refused, a rerun would fail the same way (arguments, paths, the source's "
        "layout, an output that overlaps a source split, complete splits kept with other classes, source files "
        "that cannot be converted: listed, --skip-corrupt leaves them out); 1 anything else (the network).",
    )
    parser.add_argument("src", metavar="SRC", help="ImageNet root holding train/ (and optionally val/)")
    # the output was a second positional argument before --out: still taken, for one release
    parser.add_argument("old_out", nargs="?", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", help="output root: local path or s3://bucket/prefix etc.; not inside a source split (required)"
    )
    parser.add_argument("--splits", nargs="+", help="splits to convert (default: train, and val where SRC has it)")
    parser.add_argument(
        "--val-labels", metavar="CSV", help="CSV 'file,wnid-or-label' for a flat val/ folder (default: none)"
    )
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="decode-check processes")
    parser.add_argument("--shard-size", default="64mb", help="shard size limit")
    parser.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave out the files that cannot be converted (undecodable, over --max-pixels, names not UTF-8, "
        "symlink loops) and list them",
    )
    parser.add_argument(
        "--max-pixels",
        type=_positive_int,
        help="refuse images with more pixels than this, read from their header (default: PIL's "
        "decompression-bomb threshold, Image.MAX_IMAGE_PIXELS)",
    )
    parser.add_argument("--overwrite", action="store_true", help="rewrite splits that are already complete")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training samples' write order")
    add_no_progress(parser)
    return parser


def _output(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """``--out``, or the deprecated positional OUT (with one line on stderr)."""
    if args.old_out is not None and args.out is not None:
        parser.error("give the output once: --out OUT")
    if args.old_out is not None:
        print(
            f"{parser.prog}: OUT as a second positional argument is deprecated and goes in the next release: "
            f"pass --out {args.old_out}",
            file=sys.stderr,
        )
        return args.old_out
    if args.out is None:
        parser.error("the following arguments are required: --out")
    return args.out


def main(argv: Sequence[str] | None = None) -> int:
    redaction.install()
    parser = build_parser()
    args = parser.parse_args(argv)
    out = _output(parser, args)
    from usi_composer.data.convert import convert_imagenet  # heavy imports after --help

    try:
        all_stats = convert_imagenet(
            args.src,
            out,
            splits=args.splits,
            val_labels=args.val_labels,
            workers=max(1, args.workers),
            shard_size=args.shard_size,
            skip_corrupt=args.skip_corrupt,
            overwrite=args.overwrite,
            seed=args.seed,
            progress=not args.no_progress,
            max_pixels=args.max_pixels,
        )
    except UsiError as e:
        return fail(e)
    for stats in all_stats:
        _report(stats, out)
    return 0


def _report(s: ConvertStats, out: str) -> None:
    """What one split's conversion did, for the person who ran it."""
    from usi_composer.data.layout import describe_problems

    where = storage.join(out, s.split)
    if s.already_complete:
        print(f"{s.split}: already complete at {where} (pass --overwrite to rewrite)")
    else:
        rate = f"{s.seconds:.1f} s ({s.images_per_second:.0f} images/s)"
        print(f"{s.split}: {s.written} images in {rate} -> {where}")
    for note in s.notes:
        print(f"{s.split}: {note}")
    if s.skipped:
        skipped = describe_problems(s.skipped)
        print(f"{s.split}: skipped {len(s.skipped)} file(s) that cannot be converted: {skipped}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
