"""``usi-convert-imagenet SRC OUT``: an ImageNet folder -> MDS shards, locally or in object storage.

    usi-convert-imagenet /data/imagenet s3://my-bucket/imagenet          # SRC/train/<wnid>/*.JPEG [+ SRC/val]
    usi-convert-imagenet /data/imagenet /fast/imagenet-mds --val-labels val.csv   # flat SRC/val/*.JPEG
    python -m usi_composer.data.convert --help

Writes ``OUT/classes.json`` (label -> wnid and description; sorted wnids give the standard
0..999) and one MDS dataset per split, ``OUT/train`` and ``OUT/val``, with the original file
bytes (no re-encode), the integer label and the source path of every image. The source is listed
as :mod:`usi_composer.data.layout` says (hidden folders and ``lost+found`` are no classes; val
takes train's classes). Every image is read once on the way (over ``--workers`` processes): a file
that does not decode, whose header has more than ``--max-pixels`` pixels, whose name is not
UTF-8, or a symlink loop fails the conversion, which lists all of them in one line;
``--skip-corrupt`` leaves them out and reports them. Training samples are written in a seeded
random order, so each shard mixes classes (streaming shuffles within windows of shards).

Nothing is lost, whatever happens to a run:

- Refused before anything is written (exit 2): an OUT that is, contains or lies inside a source
  split (real paths compared; an object-store OUT cannot overlap a local source).
- A split is ``OUT/<split>/index.json`` plus the shards it names. A conversion writes its shards
  (and MDSWriter's own index) into a new generation folder ``OUT/<split>/gen-<UTC time>-<random>/``
  that no index names, then replaces the split's ``index.json``, whose shard names carry the
  ``gen-.../`` prefix (as streaming's own ``merge_index`` writes them), in one atomic step:
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

Exit status: 0 done; 1 the conversion failed on source files (all listed; ``--skip-corrupt``);
2 refused before anything was written (arguments, paths, the source's layout, the output).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import functools
import io
import json
import os
import random
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from PIL import Image
from streaming import MDSWriter
from streaming.base.storage import CloudDownloader, CloudUploader
from tqdm import tqdm

from usi_composer import redaction
from usi_composer.data.layout import IMG_EXTENSIONS, describe_problems, list_images
from usi_composer.data.mds import MDS_COLUMNS
from usi_composer.errors import BadFilesError, SetupError, UsiError, error_line

__all__ = ["ConvertStats", "convert_imagenet", "main"]

HASH = "sha1"  # per-shard hash stored in index.json: enables StreamingDataset(validate_hash='sha1')
GENERATION = re.compile(r"gen-\d{8}T\d{6}Z-[0-9a-f]{8}")  # the only folders in a split we ever delete
SHARD_FILES = ("raw_data", "zip_data", "raw_meta", "zip_meta")  # an index's file entries per shard


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


def _is_remote(path: str) -> bool:
    return "://" in path


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts]) if _is_remote(root) else os.path.join(root, *parts)


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


# --- the output: indexes, generations, atomic replacement -------------------------------------------------------


def _fetch(url: str) -> bytes | None:
    """The bytes of the object at ``url`` (remote), None if there is none."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "object")
        try:
            CloudDownloader.direct_download(url, local, timeout=60)
        except FileNotFoundError:
            return None
        except Exception as e:
            if "not found" in str(e).lower():  # streaming's S3 client reports a missing key as ClientError
                return None
            raise SetupError(f"cannot reach {url}: {type(e).__name__}: {str(e).strip()[:200]}") from e
        return Path(local).read_bytes()


def _read_json(folder: str, name: str) -> Any | None:
    """``folder/name`` parsed, None if it does not exist; a file that is not JSON is a one-line error."""
    where = _join(folder, name)
    local = not _is_remote(folder)
    data = (Path(where).read_bytes() if Path(where).is_file() else None) if local else _fetch(where)
    if data is None:
        return None
    try:
        return json.loads(data)
    except ValueError as e:
        raise SetupError(f"{where} is not readable JSON ({e}); move it away, then convert again") from e


def _read_index(split_out: str) -> dict | None:
    """The split's ``index.json``: its presence is what makes a split complete."""
    index = _read_json(split_out, "index.json")
    if index is not None and not (isinstance(index, dict) and isinstance(index.get("shards"), list)):
        raise SetupError(f"{_join(split_out, 'index.json')} is not an MDS index; move it away, then convert again")
    return index


def _split_complete(out: str) -> bool:
    """Whether ``out`` (a split's folder) holds a complete split, of this converter or the earlier one."""
    return _read_index(out) is not None


def _index_files(index: dict | None) -> list[str]:
    """Every file an index names, relative to its split's folder."""
    entries = [
        shard.get(key) for shard in (index or {}).get("shards", []) if isinstance(shard, dict) for key in SHARD_FILES
    ]
    return [e["basename"] for e in entries if isinstance(e, dict) and isinstance(e.get("basename"), str)]


def _generations(index: dict | None) -> set[str]:
    return {name.split("/")[0] for name in _index_files(index) if GENERATION.fullmatch(name.split("/")[0])}


def _fsync(path: str | Path) -> None:
    with contextlib.suppress(OSError):  # a folder cannot be fsynced on some file systems: best effort
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _put_text(folder: str, name: str, text: str) -> None:
    """Replace ``folder/name`` in one atomic step: a reader sees the old file or the new one, never a mix."""
    if _is_remote(folder):
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, name).write_text(text)
            CloudUploader.get((tmp, folder), exist_ok=True).upload_file(name)  # one PUT of the object
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    tmp_path = Path(folder, f".{name}.tmp")  # the run holds the output's lock: no one else writes it
    with open(tmp_path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_path, Path(folder, name))
    _fsync(folder)  # the rename itself survives a power loss


@contextlib.contextmanager
def _output_lock(out: str) -> Iterator[None]:
    """Hold ``flock`` on a local output folder: a second run into it is refused instead of removing
    the first one's generation as stale. Released by the kernel when the process dies."""
    if _is_remote(out):
        yield
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SetupError(f"another usi-convert-imagenet is writing to {out}; let it finish first") from None
        except OSError:
            pass  # a file system without flock (some network mounts): unlocked, as an object store
        yield
    finally:
        os.close(fd)


def _remote_generations(split_out: str) -> set[str]:
    """Names of the generation folders under a remote split (empty where streaming cannot list)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            keys = CloudUploader.get((tmp, split_out), exist_ok=True).list_objects() or []
        except NotImplementedError:  # streaming lists S3, GCS, OCI, Alipan only
            return set()
    prefix = urllib.parse.urlparse(split_out).path.strip("/") + "/"
    rests = (key[len(prefix) :] if key.startswith(prefix) else key for key in keys)
    return {rest.split("/")[0] for rest in rests if "/" in rest and GENERATION.fullmatch(rest.split("/")[0])}


def _clear_stale(split_out: str, index: dict | None) -> list[str]:
    """Remove (local) or report (remote) generations that ``index`` does not name: a killed run's."""
    named = _generations(index)
    if _is_remote(split_out):
        stale = sorted(_remote_generations(split_out) - named)
        if not stale:
            return []
        where = ", ".join(_join(split_out, g) + "/" for g in stale)
        return [
            f"{where} hold(s) shards of an unfinished conversion that no index names: "
            "delete them once no conversion writes there"
        ]
    if not os.path.isdir(split_out):
        return []
    Path(split_out, ".index.json.tmp").unlink(missing_ok=True)
    with os.scandir(split_out) as entries:
        stale = sorted(
            e.name
            for e in entries
            if e.is_dir(follow_symlinks=False) and GENERATION.fullmatch(e.name) and e.name not in named
        )
    for name in stale:
        shutil.rmtree(os.path.join(split_out, name))
    return (
        [f"removed {len(stale)} unfinished generation(s) of an interrupted conversion: {', '.join(stale)}"]
        if stale
        else []
    )


def _retire(split_out: str, old: dict | None, new: dict) -> list[str]:
    """After ``new`` replaced ``old`` as the split's index: delete (local) or report (remote) ``old``'s files."""
    keep = set(_index_files(new))
    files = [name for name in _index_files(old) if name not in keep]
    if not files:
        return []
    if _is_remote(split_out):
        folders = sorted({_join(split_out, os.path.dirname(f)) + "/" if "/" in f else split_out + "/" for f in files})
        return [
            f"the previous split's {len(files)} file(s) are left in {', '.join(folders)} (no index names them now): "
            "delete them once no run reads them"
        ]
    split_dir = Path(split_out)
    removed = 0
    for name in files:
        if os.path.isabs(name) or ".." in Path(name).parts:
            continue  # names a file outside the split: not one of ours
        with contextlib.suppress(FileNotFoundError):
            (split_dir / name).unlink()
            removed += 1
    for generation in _generations(old):
        (split_dir / generation / "index.json").unlink(missing_ok=True)  # MDSWriter's own, of that generation
        with contextlib.suppress(OSError):  # not empty: something else is in it, kept
            (split_dir / generation).rmdir()
    return [f"removed the previous split's {removed} file(s)"]


@dataclass
class _Generation:
    """A split's new shards, written where no index points until :meth:`publish` makes them the split."""

    split_out: str
    name: str
    previous: dict | None  # the index it replaces
    index: dict = field(default_factory=dict)  # the split's index to publish, once complete

    @property
    def out(self) -> str:
        return _join(self.split_out, self.name)

    def publish(self) -> list[str]:
        if not _is_remote(self.out):
            for f in os.scandir(self.out):  # shards durable before an index names them
                _fsync(f.path)
            _fsync(self.out)
        _put_text(self.split_out, "index.json", json.dumps(self.index, sort_keys=True))
        return _retire(self.split_out, self.previous, self.index)

    def discard(self) -> None:
        """Remove an unpublished local generation (ours: a fresh name); remote ones are reported by the next run."""
        if not _is_remote(self.out):
            shutil.rmtree(self.out, ignore_errors=True)


def _new_generation(split_out: str, previous: dict | None) -> _Generation:
    while True:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        generation = _Generation(split_out, f"gen-{stamp}-{secrets.token_hex(4)}", previous)
        if _is_remote(split_out) or not os.path.lexists(generation.out):
            return generation


def _write_classes(out: str, classes: list[str]) -> None:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()  # ImageNet-21k synsets; a folder name it does not know is its own name

    def describe(wnid: str) -> str:
        try:
            return info.label_name_to_description(wnid)
        except KeyError:
            return wnid

    _put_text(out, "classes.json", json.dumps({"wnids": classes, "names": [describe(c) for c in classes]}, indent=1))


def _check_output_apart(src: Path, splits: Sequence[str], out: str) -> None:
    """Refuse an ``out`` that is, contains or lies inside a source split: writing it could destroy the source."""
    if _is_remote(out):
        return
    target = Path(os.path.realpath(out))
    for split in sorted({*splits, "train", "val"}):
        folder = src / split
        if not folder.exists():
            continue
        real = Path(os.path.realpath(folder))
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
            raise SetupError(
                f"the output {out} {relation} the source split {folder}: choose an output outside the source's splits"
            )


def _check_classes(out: str, classes: list[str], published: list[str] | None, kept: list[str]) -> None:
    if not kept or published is None or published == classes:
        return
    first = next((i for i, (a, b) in enumerate(zip(published, classes, strict=False)) if a != b), None)
    if first is None:
        first = min(len(published), len(classes))
    differs = (
        f"first difference at label {first}: '{published[first] if first < len(published) else '(none)'}' "
        f"vs '{classes[first] if first < len(classes) else '(none)'}'"
    )
    raise SetupError(
        f"{_join(out, 'classes.json')} lists {len(published)} classes, the source has {len(classes)} ({differs}), "
        f"and the complete split(s) {', '.join(kept)} would keep the old labels: pass --overwrite to rewrite them"
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
    generation: _Generation,
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
    # a fresh folder, so exist_ok (which makes MDSWriter delete an existing one) is never needed
    writer = MDSWriter(out=generation.out, columns=MDS_COLUMNS, hashes=[HASH], size_limit=shard_size)
    bad = list(problems)
    pool = _worker_pool(workers) if workers > 1 else None
    try:
        paths = [p for p, _ in samples]
        check = functools.partial(_read_and_check, max_pixels=max_pixels)
        results = pool.imap(check, paths, chunksize=16) if pool else map(check, paths)
        bar = tqdm(
            total=len(samples),
            desc=f"{split} -> {generation.split_out}",
            unit="img",
            disable=not progress,
            file=sys.stderr,
        )
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
    except BaseException:
        writer.cancel_future_jobs()
        generation.discard()
        if writer.remote:
            shutil.rmtree(writer.local, ignore_errors=True)  # MDSWriter's staging folder of the uploads
        raise
    finally:
        if pool:
            pool.terminate()
    prefixed = []
    for shard in writer.shards:  # what MDSWriter wrote to the generation's own index.json
        shard = dict(shard)
        for key in SHARD_FILES:
            if shard.get(key):
                shard[key] = {**shard[key], "basename": f"{generation.name}/{shard[key]['basename']}"}
        prefixed.append(shard)
    generation.index = {"version": 2, "shards": prefixed}
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

    with _output_lock(out):
        if not _is_remote(out):
            Path(out, ".classes.json.tmp").unlink(missing_ok=True)  # of a run killed while writing it
        indexes = {s: _read_index(_join(out, s)) for s in sorted({*splits, "train", "val"})}
        rewrite = [s for s in splits if overwrite or indexes[s] is None]
        kept = [s for s, index in indexes.items() if index is not None and s not in rewrite]
        published = _read_json(out, "classes.json")
        published = published.get("wnids") if isinstance(published, dict) else None
        _check_classes(out, train.classes, published, kept)
        # classes.json goes first only while no complete split exists that it could disagree with
        classes_first = published != train.classes and all(index is None for index in indexes.values())
        together = published != train.classes and not classes_first  # new labels: publish all splits at once
        notes = {split: _clear_stale(_join(out, split), indexes[split]) for split in splits}
        stage_args: dict[str, Any] = dict(
            workers=workers, shard_size=shard_size, skip_corrupt=skip_corrupt, max_pixels=max_pixels
        )
        all_stats, pending = [], []
        try:
            for split in splits:
                if split not in rewrite:
                    all_stats.append(ConvertStats(split, already_complete=True, notes=notes[split]))
                    continue
                generation = _new_generation(_join(out, split), indexes[split])
                stats = _stage_split(
                    *listed[split], generation, split, progress=progress, root=src / split, **stage_args
                )
                stats.notes = notes[split]
                all_stats.append(stats)
                if together:
                    pending.append((generation, stats))
                    continue
                if classes_first:
                    _write_classes(out, train.classes)
                    classes_first = False
                stats.notes += generation.publish()
        except BaseException:
            for generation, _ in pending:
                generation.discard()
            raise
        for generation, stats in pending:
            stats.notes += generation.publish()
        if together:
            _write_classes(out, train.classes)
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    redaction.install()
    parser = argparse.ArgumentParser(
        prog="usi-convert-imagenet",
        description="Convert an ImageNet folder (SRC/train/<wnid>/*.JPEG, optional SRC/val) to MDS shards "
        "at OUT: a local path or a remote (s3://, gs://, oci://, azure://, ...). "
        "For a local S3-compatible server set S3_ENDPOINT_URL. A split becomes visible only once complete: "
        "a failed or killed run leaves the previous split as it was.",
        epilog="exit status: 0 done; 1 the conversion failed on source files (listed; --skip-corrupt leaves "
        "them out); 2 refused before anything was written (arguments, paths, the source's layout, an output "
        "that overlaps a source split, complete splits kept with other classes).",
    )
    parser.add_argument("src", help="ImageNet root holding train/ (and optionally val/)")
    parser.add_argument("out", help="output root: local path or s3://bucket/prefix etc.; not inside a source split")
    parser.add_argument("--splits", nargs="+", help="splits to convert (default: train and val where present)")
    parser.add_argument("--val-labels", help="CSV 'file,wnid-or-label' for a flat val/ folder")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="decode-check processes")
    parser.add_argument("--shard-size", default="64mb", help="shard size limit (default 64mb)")
    parser.add_argument(
        "--skip-corrupt",
        action="store_true",
        help="leave out the files that cannot be converted (undecodable, over --max-pixels, names not UTF-8, "
        "symlink loops) and list them",
    )
    parser.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=Image.MAX_IMAGE_PIXELS,
        help="refuse images with more pixels than this, read from their header (default: PIL's "
        "decompression-bomb threshold, %(default)s)",
    )
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
            max_pixels=args.max_pixels,
        )
    except BadFilesError as e:
        print(error_line(e), file=sys.stderr)
        return 1
    except UsiError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    for stats in all_stats:
        _report(stats, args.out)
    return 0


def _report(s: ConvertStats, out: str) -> None:
    """What one split's conversion did, for the person who ran it."""
    where = _join(out, s.split)
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
