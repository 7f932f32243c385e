"""``usi-convert-imagenet SRC --out OUT``: an ImageNet folder -> MDS shards, locally or in object storage.

    usi-convert-imagenet /data/imagenet --out s3://my-bucket/imagenet          # SRC/train/<wnid>/*.JPEG [+ SRC/val]
    usi-convert-imagenet /data/imagenet --out /fast/imagenet-mds --val-labels val.csv   # flat SRC/val/*.JPEG
    python -m usi_composer.cli.convert --help      # the command's arguments: usi_composer/cli/convert.py

Writes ``OUT/classes.json`` (label -> wnid and description; sorted wnids give the standard
0..999) and one MDS dataset per split, ``OUT/train`` and ``OUT/val``, with the original file
bytes (no re-encode), the integer label and the source path of every image. The source is listed
as :mod:`usi_composer.data.layout` says (hidden folders and ``lost+found`` are no classes; val
takes train's classes). Every image is read once on the way (over ``--workers`` processes): a file
that does not decode, whose header has more than ``--max-pixels`` pixels, whose name is not
UTF-8, a symlink loop, or a folder link leading out of its class folder (never walked: its files
would be labelled by the wrong class) fails the conversion, which lists all of them in one line;
``--skip-corrupt`` leaves them out and reports them. Training samples are written in a seeded
random order, so each shard mixes classes (streaming shuffles within windows of shards).

Nothing is lost, whatever happens to a run:

- Refused before anything is written (exit 2): an output that is, contains or lies inside a source
  split: ``OUT``, each ``OUT/<split>`` converted and ``OUT/classes.json`` are compared by their real
  paths, links followed (an object-store OUT cannot overlap a local source).
- A split (:mod:`usi_composer.data.generations`) is ``OUT/<split>/index.json`` plus the shards it
  names. A conversion writes its shards (and MDSWriter's own index) into a new generation folder
  ``OUT/<split>/gen-<UTC time>-<random>/`` that no index names, then replaces the split's
  ``index.json``, whose shard names carry the ``gen-.../`` prefix (as streaming's own
  ``merge_index`` writes them), in one atomic step (:func:`usi_composer.storage.atomic_write`):
  locally a file written beside it, fsynced with the shards, and renamed over it (``os.replace``);
  in object storage one upload of the object (atomic on S3 and GCS). Until that step every reader
  sees the previous split, after it the new one. A failed, interrupted or killed run (SIGKILL
  included) never takes that step, so the previous complete split stays exactly as it was.
- After the step, locally, exactly the files the previous index named are deleted (and their
  generation's own index and folder); in object storage they are left (streaming's and
  Composer's object-store clients cannot delete) and one line says where they are.
- A generation that no index names (left by a killed run) is removed locally by the next run
  and reported for object storage. A local OUT is locked (``flock``) during a run, so a second
  conversion into it is refused rather than deleting the first one's generation; do not run two
  conversions into one object-store OUT.

Restartable: a split is complete once its ``index.json`` exists (also one written by the earlier
converter, whose shards lie directly in ``OUT/<split>/``). Re-running the same command skips
complete splits and converts the others; ``--overwrite`` rewrites all (each stays the previous
split until the new one is complete).

``OUT/classes.json`` agrees with the splits. Keeping a complete split while ``classes.json`` lists
other classes than SRC has is refused (exit 2; ``--overwrite`` rewrites them). Where the file
changes, it is written once, atomically like an index: when no complete split exists, just before
the first split is published (so a later split's failure leaves the published ones usable);
otherwise (new labels for existing splits) every split is converted before any is published, and
the indexes are replaced one after the other within milliseconds, ``classes.json`` last, so that
a kill between them is caught by the next run's check.

Exit status (``usi_composer.cli._common.fail``, as every command): 0 done; 2 a refusal a rerun
cannot fix (arguments, paths, the source's layout, the output, source files that cannot be
converted: all listed, ``--skip-corrupt``); 1 anything else (an object store that did not answer).
"""

from __future__ import annotations

import csv
import functools
import io
import os
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image
from streaming import MDSWriter
from tqdm import tqdm

from usi_composer import storage
from usi_composer.data.generations import Generation, clear_stale, new_generation, output_lock, read_index
from usi_composer.data.layout import IMG_EXTENSIONS, describe_problems, list_images
from usi_composer.data.mds import MDS_COLUMNS
from usi_composer.errors import BadFilesError, SetupError, UnreachableError, UsiError, reason

__all__ = ["ConvertStats", "convert_imagenet"]

HASH = "sha1"  # per-shard hash stored in index.json: enables StreamingDataset(validate_hash='sha1')


@dataclass
class ConvertStats:
    split: str
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, why)
    seconds: float = 0.0
    already_complete: bool = False
    notes: list[str] = field(default_factory=list)  # lines for the user: what was removed, what is left

    @property
    def images_per_second(self) -> float:
        return (self.written + len(self.skipped)) / self.seconds if self.seconds > 0 else 0.0


def _csv_samples(split_dir: Path, classes: list[str], labels_csv: Path) -> list[tuple[str, int]]:
    """``(path, label)`` of the flat ``split_dir/<image>`` files that a labels CSV names.

    The CSV has rows ``<file name or stem>,<wnid or integer label>`` (a header row is allowed; a
    second column holding several words, like Kaggle's ``PredictionString``, uses the first).
    """
    if not labels_csv.is_file():
        raise SetupError(f"labels CSV not found: {labels_csv}")
    class_to_idx = {c: i for i, c in enumerate(classes)}
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


def _read_and_check(path: str, max_pixels: int | None) -> tuple[bytes, str | None]:
    """The file's bytes, and why it cannot be converted (None if it can)."""
    try:
        data = Path(path).read_bytes()
        with warnings.catch_warnings():
            # PIL's warnings (its decompression-bomb one included: max_pixels replaces it) are no errors
            warnings.simplefilter("ignore")
            img = Image.open(io.BytesIO(data))
            width, height = img.size  # from the header: nothing is decoded yet
            if max_pixels is not None and width * height > max_pixels:
                return b"", f"{width}x{height} = {width * height} pixels, over --max-pixels {max_pixels}"
            # A 1/8-scale JPEG decode still parses every entropy-coded block (truncation and
            # corrupt data fail here) at a fraction of the cost of a full decode.
            img.draft(None, (max(1, width // 8), max(1, height // 8)))
            img.convert("RGB")
        return data, None
    except Exception as e:  # PIL raises many types for broken files (over twice its own limit: DecompressionBombError)
        return b"", f"{type(e).__name__}: {e}"


def _write_classes(out: str, classes: list[str]) -> None:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()  # ImageNet-21k synsets; a folder name it does not know is its own name

    def describe(wnid: str) -> str:
        try:
            return info.label_name_to_description(wnid)
        except KeyError:
            return wnid

    storage.write_json(storage.join(out, "classes.json"), {"wnids": classes, "names": [describe(c) for c in classes]})


def _check_output_apart(src: Path, splits: Sequence[str], out: str) -> None:
    """Refuse, before anything is written, an output whose written paths (``out``, each ``out/<split>``
    converted, ``out/classes.json``), links followed, is, contains or lie inside a source split."""
    if storage.is_remote(out):
        return  # an object store cannot overlap a local source
    folders = [src / split for split in sorted({*splits, "train", "val"})]
    sources = [(folder, Path(os.path.realpath(folder))) for folder in folders if folder.exists()]
    for written in [out, *(storage.join(out, s) for s in splits), storage.join(out, "classes.json")]:
        target = Path(os.path.realpath(written))  # follows every link, also one at the last component
        for folder, real in sources:
            relation = (
                "is"
                if target == real
                else "lies inside"
                if target.is_relative_to(real)
                else "contains"
                if real.is_relative_to(target)
                else None
            )
            if relation:
                via = f" (a link to {target})" if os.path.abspath(written) != str(target) else ""
                raise SetupError(
                    f"the output {written}{via} {relation} the source split {folder}: "
                    "choose an output outside the source's splits"
                )


def _check_classes(
    out: str, classes: list[str], published: list[str] | None, kept: list[str], splits: Sequence[str], overwrite: bool
) -> None:
    """Refuse keeping complete splits (``kept``) labelled by other classes than the source's."""
    if not kept or published is None or published == classes:
        return
    first = next((i for i, (a, b) in enumerate(zip(published, classes, strict=False)) if a != b), None)
    if first is None:
        first = min(len(published), len(classes))
    differs = (
        f"first difference at label {first}: '{published[first] if first < len(published) else '(none)'}' "
        f"vs '{classes[first] if first < len(classes) else '(none)'}'"
    )
    # --overwrite rewrites only the splits converted: with --splits, the kept ones must be named too
    every = " ".join(dict.fromkeys([*splits, *kept]))
    hint = f"add them to --splits (--overwrite --splits {every})" if overwrite else "pass --overwrite to rewrite them"
    raise SetupError(
        f"{storage.join(out, 'classes.json')} lists {len(published)} classes, the source has {len(classes)} "
        f"({differs}), and the complete split(s) {', '.join(kept)} would keep the old labels: {hint}"
    )


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


def _stage_split(
    samples: list[tuple[str, int]],
    problems: list[tuple[str, str]],
    generation: Generation,
    split: str,
    *,
    workers: int,
    shard_size: str,
    skip_corrupt: bool,
    max_pixels: int | None,
    progress: bool,
    root: Path,
) -> ConvertStats:
    """Write ``samples`` into ``generation`` (nothing reads it yet); ``problems``: files the listing refused."""
    stats = ConvertStats(split)
    start = time.perf_counter()
    # A fresh folder: exist_ok (MDSWriter then deletes an existing one) is never needed. MDSWriter uploads
    # each shard as it fills it (storage.put would need all staged by us); the index goes through storage.
    writer = MDSWriter(out=generation.out, columns=MDS_COLUMNS, hashes=[HASH], size_limit=shard_size)
    bad = list(problems)
    pool = _worker_pool(workers) if workers > 1 else None
    try:
        paths = [p for p, _ in samples]
        check = functools.partial(_read_and_check, max_pixels=max_pixels)
        results = pool.imap(check, paths, chunksize=16) if pool else map(check, paths)
        desc = f"{split} -> {generation.split_out}"
        bar = tqdm(total=len(samples), desc=desc, unit="img", disable=not progress, file=sys.stderr)
        for (path, label), (data, error) in zip(samples, results, strict=True):
            bar.update()
            if error is not None:
                bad.append((path, error))
                continue
            if bad and not skip_corrupt:
                continue  # the conversion will fail: keep checking, stop writing
            writer.write({"image": data, "label": label, "key": os.path.relpath(path, root)})
        bar.close()
        if bad and not skip_corrupt:
            raise BadFilesError(
                f"{len(bad)} file(s) in {split} cannot be converted: {describe_problems(bad)} "
                "(nothing was published; pass --skip-corrupt to leave them out)"
            )
        writer.finish()
    except BaseException as e:
        writer.cancel_future_jobs()
        generation.discard()
        if writer.remote:
            shutil.rmtree(writer.local, ignore_errors=True)  # MDSWriter's staging folder of the uploads
            if isinstance(e, Exception) and not isinstance(e, UsiError):  # its upload threads' errors: the network
                raise UnreachableError(f"cannot upload the shards of {split} to {generation.out}: {reason(e)}") from e
        raise
    finally:
        if pool:
            pool.terminate()
    generation.take(writer.shards)
    stats.written = len(samples) - (len(bad) - len(problems))
    stats.skipped = bad
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
    max_pixels: int | None = None,
) -> list[ConvertStats]:
    """Convert ``src/train`` (and ``src/val`` where present) to MDS under ``out``; see the module doc.

    ``max_pixels`` None: PIL's decompression-bomb threshold (``Image.MAX_IMAGE_PIXELS``)."""
    src = Path(src)
    max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    splits = list(dict.fromkeys(splits)) if splits else [s for s in ("train", "val") if (src / s).is_dir()]
    _check_output_apart(src, splits, out)
    # Every split is listed before anything is written: a layout error must not come after hours of train.
    train = list_images(src / "train")
    listed = {split: _list_split(src, split, train, val_labels, seed) for split in splits}
    stage = functools.partial(
        _stage_split,
        workers=workers,
        shard_size=shard_size,
        skip_corrupt=skip_corrupt,
        max_pixels=max_pixels,
        progress=progress,
    )
    with output_lock(out):
        indexes = {s: read_index(storage.join(out, s)) for s in sorted({*splits, "train", "val"})}
        rewrite = [s for s in splits if overwrite or indexes[s] is None]
        kept = [s for s, index in indexes.items() if index is not None and s not in rewrite]
        published = storage.read_json(storage.join(out, "classes.json"))
        published = published.get("wnids") if isinstance(published, dict) else None
        _check_classes(out, train.classes, published, kept, splits, overwrite)
        notes = {split: clear_stale(storage.join(out, split), indexes[split]) for split in splits}
        all_stats = [ConvertStats(s, already_complete=True, notes=notes[s]) for s in splits if s not in rewrite]
        staged = {s: (listed[s], src / s, indexes[s], notes[s]) for s in splits if s in rewrite}
        return all_stats + _convert_and_publish(out, staged, train.classes, published, indexes, stage)


def _convert_and_publish(
    out: str,
    staged: dict[str, tuple[Any, Path, dict | None, list[str]]],
    classes: list[str],
    published: list[str] | None,
    indexes: dict[str, dict | None],
    stage: Any,
) -> list[ConvertStats]:
    """Convert each split of ``staged`` (samples and problems, source folder, index, notes) and publish it.

    ``classes.json`` goes first only while no complete split exists that it could disagree with; new
    labels for existing splits publish every split at once, ``classes.json`` last."""
    classes_first = published != classes and all(index is None for index in indexes.values())
    together = published != classes and not classes_first
    all_stats, pending = [], []
    try:
        for split, ((samples, problems), root, index, notes) in staged.items():
            generation = new_generation(storage.join(out, split), index)
            stats = stage(samples, problems, generation, split, root=root)
            stats.notes = notes
            all_stats.append(stats)
            if together:
                pending.append((generation, stats))
                continue
            if classes_first:
                _write_classes(out, classes)
                classes_first = False
            stats.notes += generation.publish()
    except BaseException:
        for generation, _ in pending:
            generation.discard()
        raise
    for generation, stats in pending:
        stats.notes += generation.publish()
    if together:
        _write_classes(out, classes)
    return all_stats


def _list_split(
    src: Path, split: str, train: Any, val_labels: str | Path | None, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """One split's ``(path, label)`` samples (train's: in a seeded random order, so each shard mixes
    classes) and the files that cannot be used; ``train``: the training split's listing."""
    split_dir = src / split
    if not split_dir.is_dir():
        raise SetupError(f"no {split} folder at {split_dir}")
    if val_labels and split != "train":
        samples, problems = _csv_samples(split_dir, train.classes, Path(val_labels)), []
    else:
        listing = train if split == "train" else list_images(split_dir, train.classes)
        samples, problems = list(listing.samples), listing.problems
    if not samples and not problems:
        flat = " (for a flat folder pass --val-labels CSV)" if split != "train" else ""
        raise SetupError(f"no images in {split_dir}{flat}")
    if split == "train":
        random.Random(seed).shuffle(samples)
    return samples, problems


if __name__ == "__main__":  # the command lives in usi_composer.cli.convert (its --help imports nothing heavy)
    import runpy

    runpy.run_module("usi_composer.cli.convert", run_name="__main__", alter_sys=True)
