"""Where a teacher cache lives: a local folder or a prefix in an object store, read and written
through ``usi_composer/storage.py`` (atomic replacement, one upload per object)."""

from __future__ import annotations

import os
from typing import Any

from usi_composer import storage
from usi_composer.errors import ConfigError
from usi_composer.teacher_cache.format import REPAIR, CorruptCacheError

__all__ = ["CacheStore"]


class CacheStore:
    """The objects of the cache at ``uri``, by their names inside it (``cache.json``, ``rank0/...``)."""

    def __init__(self, uri: str, key: str = "algorithms.distillation.cache") -> None:
        self.uri = uri.rstrip("/") or uri
        try:
            storage.check(self.uri)
        except storage.StorageError as e:
            raise ConfigError(key, str(e)) from None

    def where(self, name: str) -> str:
        return storage.join(self.uri, name)

    def read(self, name: str) -> bytes:
        """The object's bytes; ``FileNotFoundError`` where it is absent."""
        return storage.read(self.where(name))

    def read_json(self, name: str) -> Any | None:
        """A JSON document, None where it is absent; a corrupt one is a :class:`CorruptCacheError`."""
        try:
            return storage.read_json(self.where(name))
        except storage.StorageError as e:
            raise CorruptCacheError(f"teacher cache: {e}; {REPAIR}") from None

    def write(self, name: str, data: bytes) -> None:
        """Replace the object whole (a reader sees the old bytes or the new ones, never a part)."""
        storage.atomic_write(self.where(name), data)

    def write_json(self, name: str, value: Any) -> None:
        storage.write_json(self.where(name), value)

    def holds_other_files(self) -> bool:
        """A local folder that exists with files in it (and no cache.json): someone else's data."""
        return not storage.is_remote(self.uri) and os.path.isdir(self.uri) and bool(os.listdir(self.uri))
