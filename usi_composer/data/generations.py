"""A converted MDS split's folder: its ``index.json``, the generations of shards it names, and the
one atomic step that replaces one generation by the next (see :mod:`usi_composer.data.convert`).

A split is ``<split>/index.json`` plus the shards it names. New shards go to a generation folder
``<split>/gen-<UTC time>-<random>/`` that no index names; :meth:`Generation.publish` then replaces
the split's ``index.json`` whole (:func:`usi_composer.storage.atomic_write`), after which the
previous generation's files are deleted (locally) or reported (object stores: left for runs still
reading them). Reads and writes go through :mod:`usi_composer.storage`; the shards themselves are
written by streaming's ``MDSWriter``.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from usi_composer import storage
from usi_composer.errors import SetupError

__all__ = ["GENERATION", "Generation", "clear_stale", "new_generation", "output_lock", "read_index", "split_complete"]

GENERATION = re.compile(r"gen-\d{8}T\d{6}Z-[0-9a-f]{8}")  # the only folders in a split we ever delete
SHARD_FILES = ("raw_data", "zip_data", "raw_meta", "zip_meta")  # an index's file entries per shard
# Temporary files a killed run can leave: storage's, and the earlier converter's ``.index.json.tmp``.
LEFTOVERS = (f"{storage.TEMP_PREFIX}*", ".*.json.tmp")


def read_index(split_out: str) -> dict | None:
    """The split's ``index.json`` (None where there is none): its presence is what makes a split complete."""
    where = storage.join(split_out, "index.json")
    try:
        index = storage.read_json(where)
    except storage.StorageError as e:
        if e.retryable:
            raise
        raise SetupError(f"{e}; move it away, then convert again") from None
    if index is not None and not (isinstance(index, dict) and isinstance(index.get("shards"), list)):
        raise SetupError(f"{where} is not an MDS index; move it away, then convert again")
    return index


def split_complete(split_out: str) -> bool:
    """Whether ``split_out`` holds a complete split, of this converter or the earlier one."""
    return read_index(split_out) is not None


def _index_files(index: dict | None) -> list[str]:
    """Every file an index names, relative to its split's folder."""
    entries = [
        shard.get(key) for shard in (index or {}).get("shards", []) if isinstance(shard, dict) for key in SHARD_FILES
    ]
    return [e["basename"] for e in entries if isinstance(e, dict) and isinstance(e.get("basename"), str)]


def _generations(index: dict | None) -> set[str]:
    return {name.split("/")[0] for name in _index_files(index) if GENERATION.fullmatch(name.split("/")[0])}


@contextlib.contextmanager
def output_lock(out: str) -> Iterator[None]:
    """Hold ``flock`` on a local output folder: a second run into it is refused instead of removing
    the first one's generation as stale. Released by the kernel when the process dies."""
    if storage.is_remote(out):
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
        for pattern in LEFTOVERS:  # of a run killed while writing classes.json: we hold the lock
            for path in glob.glob(os.path.join(glob.escape(out), pattern)):
                Path(path).unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)


def clear_stale(split_out: str, index: dict | None) -> list[str]:
    """Remove (local) or report (remote) generations that ``index`` does not name: a killed run's."""
    named = _generations(index)
    if storage.is_remote(split_out):
        stale = sorted(name for name in storage.listdir(split_out) if GENERATION.fullmatch(name) and name not in named)
        if not stale:
            return []
        where = ", ".join(storage.join(split_out, g) + "/" for g in stale)
        return [
            f"{where} hold(s) shards of an unfinished conversion that no index names: "
            "delete them once no conversion writes there"
        ]
    if not os.path.isdir(split_out):
        return []
    for pattern in LEFTOVERS:
        for path in glob.glob(os.path.join(glob.escape(split_out), pattern)):
            Path(path).unlink(missing_ok=True)
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
    if storage.is_remote(split_out):
        folders = sorted({storage.join(split_out, os.path.dirname(f)).rstrip("/") + "/" for f in files})
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
class Generation:
    """A split's new shards, written where no index points until :meth:`publish` makes them the split."""

    split_out: str
    name: str
    previous: dict | None  # the index it replaces
    index: dict = field(default_factory=dict)  # the split's index to publish, once complete

    @property
    def out(self) -> str:
        return storage.join(self.split_out, self.name)

    def take(self, shards: list[dict]) -> None:
        """Make the split's index to publish from ``shards`` (MDSWriter's entries, named inside this
        generation): their file names get the ``gen-.../`` prefix, as streaming's ``merge_index`` writes them."""
        prefixed = []
        for shard in shards:
            shard = dict(shard)
            for key in SHARD_FILES:
                if shard.get(key):
                    shard[key] = {**shard[key], "basename": f"{self.name}/{shard[key]['basename']}"}
            prefixed.append(shard)
        self.index = {"version": 2, "shards": prefixed}

    def publish(self) -> list[str]:
        """Make this generation the split (one atomic replacement of ``index.json``); what was retired."""
        if not storage.is_remote(self.out):
            for f in os.scandir(self.out):  # MDSWriter's shards durable before an index names them
                storage.fsync(f.path)
            storage.fsync(self.out)
        index = json.dumps(self.index, sort_keys=True).encode()
        storage.atomic_write(storage.join(self.split_out, "index.json"), index)
        return _retire(self.split_out, self.previous, self.index)

    def discard(self) -> None:
        """Remove an unpublished local generation (ours: a fresh name); remote ones are reported by the next run."""
        if not storage.is_remote(self.out):
            shutil.rmtree(self.out, ignore_errors=True)


def new_generation(split_out: str, previous: dict | None) -> Generation:
    """A generation under ``split_out`` with a fresh name, replacing ``previous`` (the split's index) once published."""
    while True:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        generation = Generation(split_out, f"gen-{stamp}-{secrets.token_hex(4)}", previous)
        if storage.is_remote(split_out) or not os.path.lexists(generation.out):
            return generation
