"""``usi-convert-imagenet SRC OUT``: an ImageNet folder -> MDS shards, locally or in object storage.

    usi-convert-imagenet /data/imagenet s3://my-bucket/imagenet          # SRC/train/<wnid>/*.JPEG [+ SRC/val]
    usi-convert-imagenet /data/imagenet /fast/imagenet-mds --val-labels val.csv   # flat SRC/val/*.JPEG
    python -m usi_composer.data.convert --help

Writes ``OUT/classes.json`` (label -> wnid and description; sorted wnids give the standard
0..999) and one MDS dataset per split, ``OUT/train`` and ``OUT/val``, with the original file
bytes (no re-encode), the integer label and the source path of every image. Every image is
decoded once on the way (over ``--workers`` processes) to find files that cannot be decoded:
by default the conversion then fails and lists all of them; ``--skip-corrupt`` leaves them out
and reports them. Training samples are written in a seeded random order, so each shard mixes
classes (streaming shuffles within windows of shards).

Restartable: a split is complete once its ``index.json`` exists (streaming cannot open a split
without it, and it is uploaded strictly after the shards). Re-running the same command skips
complete splits and rewrites incomplete ones from scratch; ``--overwrite`` rewrites all.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

from PIL import Image
from streaming import MDSWriter
from streaming.base.storage import CloudDownloader, CloudUploader
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset
from tqdm import tqdm

from usi_composer.data.mds import MDS_COLUMNS
from usi_composer.errors import SetupError, UsiError

__all__ = ["ConvertStats", "convert_imagenet", "main"]

HASH = "sha1"  # per-shard hash stored in index.json: enables StreamingDataset(validate_hash='sha1')


@dataclass
class ConvertStats:
    split: str
    written: int = 0
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0
    already_complete: bool = False

    @property
    def images_per_second(self) -> float:
        return (self.written + len(self.skipped)) / self.seconds if self.seconds > 0 else 0.0


def _is_remote(path: str) -> bool:
    return "://" in path


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if _is_remote(root) else os.path.join(root, *parts)


def list_classes(train_dir: Path) -> list[str]:
    """Sorted class folder names (for ImageNet, the wnids: their order gives labels 0..999)."""
    if not train_dir.is_dir():
        raise SetupError(f"no training folder at {train_dir} (expected {train_dir}/<wnid>/<image>)")
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise SetupError(f"no class folders in {train_dir} (expected {train_dir}/<wnid>/<image>)")
    return classes


def list_samples(split_dir: Path, classes: list[str], labels_csv: Path | None = None) -> list[tuple[str, int]]:
    """``(path, label)`` of every image: ``<split_dir>/<wnid>/<image>``, or flat files + a labels CSV.

    The CSV has rows ``<file name or stem>,<wnid or integer label>`` (a header row is allowed; a
    second column holding several words, like Kaggle's ``PredictionString``, uses the first).
    """
    class_to_idx = {c: i for i, c in enumerate(classes)}
    if labels_csv is None:
        unknown = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and p.name not in class_to_idx)
        if unknown:
            raise SetupError(f"{split_dir}: class folders not in the training classes: {', '.join(unknown[:10])}")
        present = {c: i for c, i in class_to_idx.items() if (split_dir / c).is_dir()}
        if not present:
            raise SetupError(f"{split_dir}: no class folders (for a flat folder pass --val-labels CSV)")
        return make_dataset(str(split_dir), present, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not labels_csv.is_file():
        raise SetupError(f"labels CSV not found: {labels_csv}")
    files = {p.stem: p for p in split_dir.iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS}
    samples: list[tuple[str, int]] = []
    with labels_csv.open(newline="") as f:
        for row_number, row in enumerate(csv.reader(f), 1):
            if not row or not row[0].strip():
                continue
            name, label_text = row[0].strip(), (row[1].split() or [""])[0] if len(row) > 1 else ""
            label = class_to_idx.get(label_text, int(label_text) if label_text.isdigit() else None)
            if label is None or not 0 <= label < len(classes):
                if row_number == 1:
                    continue  # header
                raise SetupError(f"{labels_csv}:{row_number}: unknown label '{label_text}'")
            path = files.get(Path(name).stem)
            if path is None:
                raise SetupError(f"{labels_csv}:{row_number}: no image '{name}' in {split_dir}")
            samples.append((str(path), label))
    return sorted(samples)


def _read_and_check(path: str) -> tuple[bytes, str | None]:
    """The file's bytes, and why it cannot be decoded to RGB (None if it can)."""
    try:
        data = Path(path).read_bytes()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            # A 1/8-scale JPEG decode still parses every entropy-coded block (truncation and
            # corrupt data fail here) at a fraction of the cost of a full decode.
            img.draft(None, (max(1, img.size[0] // 8), max(1, img.size[1] // 8)))
            img.convert("RGB")
        return data, None
    except Exception as e:  # PIL raises many types for broken files
        return b"", f"{type(e).__name__}: {e}"


def _split_complete(out: str) -> bool:
    index = _join(out, "index.json")
    if not _is_remote(out):
        return Path(index).is_file()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            CloudDownloader.direct_download(index, os.path.join(tmp, "index.json"), timeout=60)
        except FileNotFoundError:
            return False
        except Exception as e:
            if "not found" in str(e).lower():  # streaming's S3 client reports a missing key as ClientError
                return False
            raise SetupError(f"cannot reach {out}: {type(e).__name__}: {str(e).strip()[:200]}") from e
    return True


def _write_classes(out: str, classes: list[str]) -> None:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()  # ImageNet-21k synsets; a folder name it does not know is its own name

    def describe(wnid: str) -> str:
        try:
            return info.label_name_to_description(wnid)
        except KeyError:
            return wnid

    names = [describe(c) for c in classes]
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "classes.json").write_text(json.dumps({"wnids": classes, "names": names}, indent=1))
        if _is_remote(out):
            CloudUploader.get((tmp, out), exist_ok=True).upload_file("classes.json")
        else:
            Path(out).mkdir(parents=True, exist_ok=True)
            Path(tmp, "classes.json").replace(Path(out, "classes.json"))


def _worker_pool(workers: int):
    """A process pool whose workers die on ``terminate()`` whatever SIGTERM handler the caller has.

    Composer installs a SIGTERM handler that exits through Python; forked workers would inherit it,
    and a worker stuck in a lock inherited from another thread (the caller's streaming threads, in
    the test process) never runs it: terminate() then waited forever (seen once on Python 3.13).
    The default disposition is set around the fork, so only the workers get it.
    """
    ctx = get_context("fork" if sys.platform.startswith("linux") else "spawn")
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is None:
        return ctx.Pool(workers)  # signal.signal works only there, and only on a handler Python knows
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        return ctx.Pool(workers)
    finally:
        signal.signal(signal.SIGTERM, previous)


def convert_split(
    samples: list[tuple[str, int]],
    out: str,
    split: str,
    *,
    workers: int = 2,
    shard_size: str = "64mb",
    skip_corrupt: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    root: Path | None = None,
) -> ConvertStats:
    """Write ``samples`` as an MDS dataset at ``out``; see the module doc for restarts and corrupt files."""
    stats = ConvertStats(split)
    if not overwrite and _split_complete(out):
        stats.already_complete = True
        return stats
    start = time.perf_counter()
    # max_workers=1: one upload thread, first in first out, so index.json (what makes the split
    # look complete) reaches the remote strictly after every shard.
    writer = MDSWriter(
        out=out,
        columns=MDS_COLUMNS,
        hashes=[HASH],
        size_limit=shard_size,
        exist_ok=True,
        max_workers=1,
    )
    bad: list[tuple[str, str]] = []
    pool = _worker_pool(workers) if workers > 1 else None
    try:
        paths = [p for p, _ in samples]
        results = pool.imap(_read_and_check, paths, chunksize=16) if pool else map(_read_and_check, paths)
        bar = tqdm(total=len(samples), desc=f"{split} -> {out}", unit="img", disable=not progress, file=sys.stderr)
        for (path, label), (data, error) in zip(samples, results, strict=True):
            bar.update()
            if error is not None:
                bad.append((path, error))
                continue
            if bad and not skip_corrupt:
                continue  # the conversion will fail: keep checking, stop writing
            key = os.path.relpath(path, root) if root else path
            writer.write({"image": data, "label": label, "key": key})
        bar.close()
    except BaseException:
        writer.cancel_future_jobs()  # no index.json: the partial split does not look complete
        raise
    finally:
        if pool:
            pool.terminate()
    if bad and not skip_corrupt:
        writer.cancel_future_jobs()
        listing = "; ".join(f"{p} ({e})" for p, e in bad)
        raise SetupError(
            f"{len(bad)} file(s) in {split} cannot be decoded: {listing} "
            "(nothing usable was written; pass --skip-corrupt to leave them out)"
        )
    writer.finish()
    stats.written = len(samples) - len(bad)
    stats.skipped = [p for p, _ in bad]
    stats.seconds = time.perf_counter() - start
    return stats


def convert_imagenet(
    src: str | Path,
    out: str,
    *,
    splits: Sequence[str] | None = None,
    val_labels: str | Path | None = None,
    workers: int = 2,
    shard_size: str = "64mb",
    skip_corrupt: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> list[ConvertStats]:
    """Convert ``src/train`` (and ``src/val`` where present) to MDS under ``out``; see the module doc."""
    src = Path(src)
    classes = list_classes(src / "train")
    splits = list(splits) if splits else [s for s in ("train", "val") if (src / s).is_dir()]
    _write_classes(out, classes)
    all_stats = []
    for split in splits:
        split_dir = src / split
        if not split_dir.is_dir():
            raise SetupError(f"no {split} folder at {split_dir}")
        csv_path = Path(val_labels) if (val_labels and split != "train") else None
        samples = list_samples(split_dir, classes, csv_path)
        if not samples:
            raise SetupError(f"no images in {split_dir}")
        if split == "train":
            random.Random(seed).shuffle(samples)
        all_stats.append(
            convert_split(
                samples,
                _join(out, split),
                split,
                workers=workers,
                shard_size=shard_size,
                skip_corrupt=skip_corrupt,
                overwrite=overwrite,
                progress=progress,
                root=split_dir,
            )
        )
    return all_stats


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="usi-convert-imagenet",
        description="Convert an ImageNet folder (SRC/train/<wnid>/*.JPEG, optional SRC/val) to MDS shards "
        "at OUT: a local path or a remote (s3://, gs://, oci://, azure://, ...). "
        "For a local S3-compatible server set S3_ENDPOINT_URL.",
    )
    parser.add_argument("src", help="ImageNet root holding train/ (and optionally val/)")
    parser.add_argument("out", help="output root: local path or s3://bucket/prefix etc.")
    parser.add_argument("--splits", nargs="+", help="splits to convert (default: train and val where present)")
    parser.add_argument("--val-labels", help="CSV 'file,wnid-or-label' for a flat val/ folder")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="decode-check processes")
    parser.add_argument("--shard-size", default="64mb", help="shard size limit (default 64mb)")
    parser.add_argument("--skip-corrupt", action="store_true", help="leave out undecodable files and list them")
    parser.add_argument("--overwrite", action="store_true", help="rewrite splits that are already complete")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training samples' write order")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        all_stats = convert_imagenet(
            args.src,
            args.out,
            splits=args.splits,
            val_labels=args.val_labels,
            workers=max(1, args.workers),
            shard_size=args.shard_size,
            skip_corrupt=args.skip_corrupt,
            overwrite=args.overwrite,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except UsiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for s in all_stats:
        where = _join(args.out, s.split)
        if s.already_complete:
            print(f"{s.split}: already complete at {where} (pass --overwrite to rewrite)")
            continue
        print(f"{s.split}: {s.written} images in {s.seconds:.1f} s ({s.images_per_second:.0f} images/s) -> {where}")
        if s.skipped:
            print(f"{s.split}: skipped {len(s.skipped)} undecodable file(s): {', '.join(s.skipped)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
