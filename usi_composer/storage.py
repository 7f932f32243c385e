"""One way to read and write the recipe's files, on a local disk or in an object store.

Every writer of the recipe (the converter's indexes and ``classes.json``, the teacher cache,
checkpoints and exported weights, ``--metrics-out``, a sweep's ``results.jsonl``) goes through here,
so each of them has the same guarantee: a reader sees the previous bytes or the complete new ones,
never a part. Locally that is a temporary file beside the target, flushed to the disk (``fsync``),
renamed over it (``os.replace``), and the folder fsynced so the rename survives a power loss. In an
object store it is one upload of the whole object (a PUT is atomic in every store Composer supports).

A location is a local path or a URI Composer's ``maybe_create_object_store_from_uri`` takes
(``s3://``, ``gs://``, ``oci://``, ``dbfs:/Volumes``, ...). Composer's object stores are what we use
for the network: they read credentials the way the rest of a Composer run does.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from usi_composer.errors import SetupError, UnreachableError

__all__ = [
    "TEMP_PREFIX",
    "StorageError",
    "StorageUnreachableError",
    "atomic_file",
    "atomic_write",
    "check",
    "exists",
    "failure",
    "fsync",
    "is_final",
    "is_remote",
    "join",
    "listdir",
    "missing",
    "put",
    "read",
    "read_json",
    "write_json",
]


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: set back at once, at import (no threads yet)
    os.umask(mask)
    return mask


_UMASK = _read_umask()
# Temporary files start with this (a dot: no name pattern of checkpoints, shards or caches matches them).
TEMP_PREFIX = ".tmp-"


class StorageError(SetupError):
    """A location that cannot be read or written (not a store Composer knows, not JSON): a retry fails too."""


class StorageUnreachableError(StorageError, UnreachableError):
    """An object store that did not answer: a retry may succeed (exit 1, not 2)."""


def is_remote(location: str | os.PathLike) -> bool:
    """Whether ``location`` is an object-store URI rather than a local path."""
    return "://" in os.fspath(location) or os.fspath(location).startswith("dbfs:/")


def join(root: str | os.PathLike, *parts: str) -> str:
    """``root/part/...``: with ``/`` in a URI, with the platform's separator for a local path."""
    root = os.fspath(root)
    return "/".join([root.rstrip("/"), *parts]) if is_remote(root) else os.path.join(root, *parts)


@functools.lru_cache(maxsize=16)
def _bucket(scheme: str, bucket: str) -> Any:
    """Composer's object store for one bucket, made once per process (its client is thread-safe)."""
    from composer.utils import maybe_create_object_store_from_uri

    try:
        return maybe_create_object_store_from_uri(f"{scheme}://{bucket}")
    except (NotImplementedError, ValueError) as e:
        raise StorageError(f"{scheme}://{bucket}: not a local path or an object store Composer can use ({e})") from None


def _remote(location: str) -> tuple[Any, str]:
    """The object store holding ``location``, and the object's name in it."""
    from composer.utils import parse_uri

    scheme, bucket, path = parse_uri(location)
    return _bucket(scheme, bucket), path.lstrip("/")


def check(location: str | os.PathLike) -> None:
    """A :class:`StorageError` where ``location`` is a URI no object store of Composer's takes (no request is made)."""
    if is_remote(location):
        _remote(os.fspath(location))


def read(location: str | os.PathLike) -> bytes:
    """The bytes at ``location``; ``FileNotFoundError`` where there are none."""
    location = os.fspath(location)
    if not is_remote(location):
        return Path(location).read_bytes()
    store, name = _remote(location)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "object")
        try:
            store.download_object(name, local, overwrite=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # each store's client raises its own types
            if missing(e):
                raise FileNotFoundError(location) from None
            raise failure("read", location, e) from e
        return Path(local).read_bytes()


def failure(verb: str, location: str, error: BaseException) -> StorageError:
    """A store's or server's failure as one line: final (:class:`StorageError`) where :func:`is_final`,
    else retryable (:class:`StorageUnreachableError`)."""
    kind = StorageError if is_final(error) else StorageUnreachableError
    return kind(f"cannot {verb} {location}: {type(error).__name__}: {str(error).strip()[:200]}")


def is_final(error: BaseException) -> bool:
    """Whether a store's or server's error repeats on a retry: no such object or bucket, access denied,
    a request refused (HTTP 4xx). Anything else (no answer, a timeout, a 5xx) may not."""
    text = str(error).lower().replace(" ", "")
    status = getattr(getattr(error, "response", None), "status_code", None)  # requests' HTTPError
    denied = isinstance(error, PermissionError) or any(
        word in text for word in ("403", "accessdenied", "forbidden", "permission")
    )
    no_bucket = "nosuchbucket" in text or "bucketdoesnotexist" in text
    return missing(error) or denied or no_bucket or (isinstance(status, int) and 400 <= status < 500)


def missing(error: BaseException) -> bool:
    """Whether a store client's error says there is no such object (a retry finds none either)."""
    if isinstance(error, FileNotFoundError):
        return True
    text = str(error).lower()
    return "not found" in text or "404" in text or "nosuchkey" in text


def read_json(location: str | os.PathLike) -> Any | None:
    """The JSON document at ``location``, None where there is none; bytes that are not JSON are a
    one-line :class:`StorageError` naming the location."""
    try:
        data = read(location)
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise StorageError(f"{os.fspath(location)} is not readable JSON ({e})") from None


def exists(location: str | os.PathLike) -> bool:
    """Whether something is stored at ``location`` (a file, or a folder locally)."""
    location = os.fspath(location)
    if not is_remote(location):
        return os.path.lexists(location)
    store, name = _remote(location)
    try:
        store.get_object_size(name)
    except FileNotFoundError:
        return False
    except Exception as e:
        if missing(e):
            return False
        raise failure("reach", location, e) from e
    return True


def listdir(location: str | os.PathLike) -> list[str]:
    """The names directly under ``location`` (a folder, or a prefix in an object store), sorted; [] where
    there is nothing."""
    location = os.fspath(location)
    if not is_remote(location):
        return sorted(os.listdir(location)) if os.path.isdir(location) else []
    store, prefix = _remote(location)
    prefix = f"{prefix.rstrip('/')}/" if prefix else ""
    try:
        names = store.list_objects(prefix)
    except Exception as e:
        raise failure("list", location, e) from e
    return sorted({name[len(prefix) :].split("/", 1)[0] for name in names if name.startswith(prefix)})


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """A temporary local name beside ``path`` to write to, moved over ``path`` once the write has
    finished and reached the disk; removed if the write failed. ``path`` is never a partial file. The
    temporary name keeps ``path``'s ending (writers such as ``torch.save`` pick the format by it) and
    starts with :data:`TEMP_PREFIX`."""
    path = os.fspath(path)
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    fsync(folder or ".")


def fsync(path: str | os.PathLike) -> None:
    """Flush a local file or folder to the disk (a folder: the renames and new names in it); for files
    another writer made, such as streaming's shards. Best effort: some file systems cannot fsync a folder."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(location: str | os.PathLike, data: bytes, mode: int | None = None) -> None:
    """Replace ``location`` with ``data`` whole: locally beside it, fsynced, renamed (its folder is made
    where missing); in an object store, one upload. ``mode``: a local file's permissions (default:
    what the umask gives a new file, as ``open`` would)."""
    location = os.fspath(location)
    if is_remote(location):
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "object")
            Path(local).write_bytes(data)
            put(local, location)
        return
    os.makedirs(os.path.dirname(location) or ".", exist_ok=True)
    with atomic_file(location) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode if mode is not None else 0o666 & ~_UMASK)


def write_json(location: str | os.PathLike, value: Any, indent: int | None = 1) -> None:
    """:func:`atomic_write` of ``value`` as JSON (a final newline)."""
    atomic_write(location, (json.dumps(value, indent=indent) + "\n").encode())


def put(local_file: str | os.PathLike, location: str | os.PathLike) -> None:
    """Store the finished local file at ``location``: an upload, or an atomic copy locally."""
    location = os.fspath(location)
    if not is_remote(location):
        atomic_write(location, Path(local_file).read_bytes())
        return
    store, name = _remote(location)
    try:
        store.upload_object(name, os.fspath(local_file))
    except Exception as e:
        raise failure("write", location, e) from e
