"""ImageNet as MDS shards (written by ``usi-convert-imagenet``), streamed with mosaicml-streaming.

Each sample holds the original encoded bytes (``image``), the integer label (``label``) and the
source path relative to the split folder (``key``). The dataset decodes and transforms on the
loader workers and yields ``(uint8 CHW tensor, label)``; float conversion and normalization run
batched on the device (:class:`~usi_composer.data.transforms.DeviceNormalize`). A sample's random
draws come from ``sample_rng(seed, epoch, sample id)``, so they resume exactly with the position.

Mid-epoch resumption comes from streaming itself: Composer saves ``dataset.state_dict()`` in
each checkpoint and loads it into the dataset of the resumed run, which then continues at the
exact sample position (deterministic shuffle, same for any number of workers). The state holds
``num_canonical_nodes`` (streaming's default when unset: the first run's node count), which
fixes the epoch's global batches, so a run may resume on another number of nodes or processes;
:func:`check_resumable` refuses, before training, the node counts streaming cannot lay it out on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from streaming import StreamingDataLoader

from usi_composer import storage
from usi_composer.data.draws import sample_rng
from usi_composer.data.transforms import transform_sample
from usi_composer.errors import LoaderWorkerError, SetupError, UnreachableError, reason
from usi_composer.patches.streaming_dataset import StreamingDatasetFixes

__all__ = [
    "MDS_COLUMNS",
    "CorruptShardError",
    "ImageNetMDS",
    "LabelError",
    "StreamingDataError",
    "check_resumable",
    "default_cache_dir",
    "read_classes_json",
    "refresh_cached_index",
    "streaming_dataloader",
]

log = logging.getLogger(__name__)

MDS_COLUMNS = {"image": "bytes", "label": "int", "key": "str"}


class StreamingDataError(LoaderWorkerError):
    """A shard could not be read: the one-line message names the remote, the split and the shard.
    A download that failed may succeed on a retry (exit 1)."""

    retryable = True


class CorruptShardError(StreamingDataError):
    """A shard whose bytes differ from its index's hash, or that is not there: a retry reads the same (exit 2)."""

    retryable = False


class LabelError(LoaderWorkerError):
    """A sample whose label is not a class index of ``data.num_classes``: names the sample."""


class ImageNetMDS(StreamingDatasetFixes):
    """A ``StreamingDataset`` of converted ImageNet shards yielding ``(transform(image bytes), label)``.

    Shard failures (download, missing object, hash mismatch, server gone) raise
    :class:`StreamingDataError` naming the remote and the shard: streaming's own message for a
    failure in its background download thread is only "Background thread failed".
    """

    def __init__(
        self,
        *,
        transform: Callable[[bytes, np.random.Generator], Any],
        seed: int = 0,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.transform, self.seed, self.num_classes = transform, seed, num_classes
        self.epoch = 0  # the epoch this process (loader worker) iterates: on_epoch
        self._shard_error: StreamingDataError | None = None

    def __getitem__(self, idx: int) -> tuple[Any, int]:  # type: ignore[override]
        """``idx`` is the global sample id (streaming's ``__iter__`` maps its sample ids here), so
        ``rng`` is the same for this sample in this epoch on any rank, worker or resumed run."""
        sample = super().__getitem__(idx)
        rng = sample_rng(self.seed, self.epoch, idx)
        where = lambda: f"sample {idx} ('{sample.get('key')}') in {self.describe_shard(self.spanner[idx][0])}"  # noqa: E731
        label = int(sample["label"])
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            # Checked here, on the host: on a GPU an index out of range is an opaque device-side assert.
            raise LabelError(
                f"{where()} has label {label}, not a class of data.num_classes={self.num_classes} "
                f"(0..{self.num_classes - 1}): is data.num_classes right for this dataset?"
            )
        return transform_sample(self.transform, sample["image"], rng, where), label

    def on_epoch(self, epoch: int) -> None:
        # Each worker process holds its own copy of the dataset, so the attribute is per worker.
        self.epoch = epoch

    def load_state_dict(self, obj: dict[str, Any]) -> None:
        """Composer hands the checkpoint's dataset state here before training resumes."""
        world = self.parallel_world
        check_resumable(obj, world.num_nodes, world.ranks_per_node, self.batch_size or 1)
        stored = obj.get("num_canonical_nodes")
        if self.num_canonical_nodes is not None and stored and stored != self.num_canonical_nodes:
            log.warning(
                "data.streaming.num_canonical_nodes=%d is not used until the next run: "
                "the resumed run keeps the checkpoint's %d (its sample order)",
                self.num_canonical_nodes,
                stored,
            )
        super().load_state_dict(obj)

    def describe_shard(self, shard_id: int) -> str:
        stream = self.streams[self.stream_per_shard[shard_id]]
        raw_data = getattr(self.shards[shard_id], "raw_data", None)
        basename = raw_data.basename if raw_data is not None else f"#{shard_id}"
        where = os.path.join(stream.remote, stream.split or "") if stream.remote else stream.local
        return f"shard '{basename}' of {where}"

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as e:
            kind = CorruptShardError if _corrupt(e) or storage.missing(e) else StreamingDataError
            error = kind(f"cannot read {self.describe_shard(shard_id)}: {_reason(e)}")
            self._shard_error = self._shard_error or error
            raise error from e

    def __iter__(self) -> Iterator[Any]:
        self._shard_error = None
        try:
            yield from super().__iter__()
        except RuntimeError:
            # streaming reports a failed download thread as "Background thread failed"; the
            # thread recorded the real cause here (same process: threads share the dataset).
            if self._shard_error is not None:
                raise self._shard_error from None
            raise
        # streaming's iterator can also just stop early once its download thread failed: an
        # epoch must never end silently short.
        if self._shard_error is not None:
            raise self._shard_error


def check_resumable(state: dict[str, Any], num_nodes: int, ranks_per_node: int, batch_size: int) -> None:
    """Raise :class:`SetupError` if streaming cannot continue ``state`` (a checkpoint's dataset
    state) on ``num_nodes`` x ``ranks_per_node`` processes with ``batch_size`` samples each.

    streaming keeps the checkpoint's ``num_canonical_nodes`` (NCN) and lays the rest of the epoch
    out again for the new world: directly when the node count divides NCN or is a multiple of
    it, else by re-slicing the first run's layout, which needs the global batch to divide by the
    first run's node count times today's processes per node. Otherwise it fails only once
    iteration starts, deep in the loader; this says so before training, with what to do.
    """
    ncn, initial = state.get("num_canonical_nodes"), state.get("initial_physical_nodes")
    if not ncn or ncn % num_nodes == 0 or num_nodes % ncn == 0:
        return
    if initial is not None and (num_nodes * ranks_per_node * batch_size) % (initial * ranks_per_node) == 0:
        return
    divisors = ", ".join(str(d) for d in range(1, ncn + 1) if ncn % d == 0)
    first = f" over {initial} nodes" if initial else ""
    resliced = f" (or with a global batch that divides by {initial} x {ranks_per_node})" if initial else ""
    raise SetupError(
        f"cannot resume this checkpoint on {num_nodes} nodes x {ranks_per_node} processes: its epoch is laid out "
        f"for num_canonical_nodes={ncn}{first}, which streaming can continue only on {divisors} or a multiple of "
        f"{ncn} nodes{resliced}; resume on such a node count (new runs: set "
        "data.streaming.num_canonical_nodes to a multiple of every node count you may resume on, e.g. 64)"
    )


def _open_error(where: str, e: Exception) -> SetupError:
    """Why a dataset could not be opened: final where there is no index, or streaming refuses the arguments
    or the index (exit 2); else the store did not answer (exit 1)."""
    final = storage.is_final(e) or isinstance(e, ValueError | TypeError | KeyError)
    return (SetupError if final else UnreachableError)(f"cannot open the MDS dataset at {where}: {_reason(e)}")


def _corrupt(e: BaseException) -> bool:
    return "Checksum failure" in str(e)


def _reason(e: BaseException) -> str:
    if _corrupt(e):
        return "hash validation failed (the shard's bytes differ from the index)"
    return reason(e, None)


def refresh_cached_index(remote: str, local: str, split: str) -> None:
    """Make the cache's copy of ``<remote>/<split>/index.json`` the remote's own.

    streaming downloads a split's index into the cache once and reads that copy ever after, so a
    split the converter replaced in the object store (``--overwrite``: a new index naming a new
    generation of shards) would silently stay the old one. The remote index is small: it is read
    at every start and replaces a cached copy that differs (atomically: a reader sees one or the
    other). Shards are named by generation, so the new index never points at an old cached shard.
    """
    cached = Path(local, split, "index.json")
    if not cached.is_file():
        return  # streaming downloads it
    url = storage.join(remote, split, "index.json")
    try:
        fresh = storage.read(url)
    except FileNotFoundError:
        raise SetupError(f"no MDS dataset at {storage.join(remote, split)} (missing {url})") from None
    if fresh != cached.read_bytes():
        log.warning("%s changed since it was cached in %s: using the new split", url, cached.parent)
        storage.atomic_write(cached, fresh)


def read_classes_json(remote: str | None, local: str | None) -> list[str] | None:
    """The class names (wnids) in ``classes.json`` at the MDS root (written by usi-convert-imagenet),
    read from ``remote`` where set; None when there is none (shards written by another tool)."""
    where = storage.join(remote, "classes.json") if remote is not None else os.path.join(local or "", "classes.json")
    document = storage.read_json(where)
    if document is None:
        return None
    wnids = document.get("wnids") if isinstance(document, dict) else None
    if not isinstance(wnids, list):
        raise SetupError(f"{where}: not a classes.json of usi-convert-imagenet (no list 'wnids')")
    return [str(w) for w in wnids]


def default_cache_dir(remote: str) -> str:
    """Where shards of ``remote`` are cached when ``data.local`` is not set: stable across runs, so
    a restarted run reuses what it downloaded (streaming's own default must not exist yet)."""
    digest = hashlib.blake2s(remote.rstrip("/").encode(), digest_size=8).hexdigest()
    return os.path.join(tempfile.gettempdir(), "usi-streaming", digest)


def _split_cache(remote: str | None, local: str | None, split: str, where: str) -> str | None:
    """Where streaming keeps the split: a local root must hold its index; a remote split's cache holds
    the remote's current index (:func:`refresh_cached_index`)."""
    if remote is None:
        if local is None or not (Path(local) / split / "index.json").is_file():
            raise SetupError(
                f"no MDS dataset at {where} (missing {where}/index.json; convert one with usi-convert-imagenet)"
            )
        return local
    # A killed run leaves streaming's shared memory behind; streaming itself skips such
    # registrations (their file locks remain), so a restarted run needs no cleanup here
    # (tests/test_streaming_s3.py kills a run with SIGKILL and starts the next one).
    local = local or default_cache_dir(remote)
    refresh_cached_index(remote, local, split)
    return local


def streaming_dataloader(
    *,
    remote: str | None,
    local: str | None,
    split: str,
    transform: Callable[[bytes, np.random.Generator], Any],
    batch_size: int,
    shuffle: bool,
    drop_last: bool,
    num_workers: int,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    seed: int = 0,
    num_classes: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    **streaming_kwargs: Any,
) -> StreamingDataLoader:
    """A per-process ``StreamingDataLoader`` over ``<remote or local>/<split>``.

    ``transform(data, sample_rng(seed, epoch, index))`` makes each sample; a label outside
    ``range(num_classes)`` raises :class:`LabelError` naming the sample; ``collate_fn`` None: torch's
    default. ``streaming_kwargs`` go to ``StreamingDataset`` (shuffle_algo, shuffle_seed, predownload,
    cache_limit, num_canonical_nodes, download_timeout, download_retry, validate_hash, ...).
    """
    where = f"{remote.rstrip('/')}/{split}" if remote else os.path.join(local or "", split)
    local = _split_cache(remote, local, split, where)
    try:
        dataset = ImageNetMDS(
            transform=transform,
            seed=seed,
            num_classes=num_classes,
            remote=remote,
            local=local,
            split=split,
            batch_size=batch_size,
            shuffle=shuffle,
            **streaming_kwargs,
        )
    except StreamingDataError:
        raise
    except Exception as e:  # streaming raises whatever its storage client raised
        raise _open_error(where, e) from e
    return StreamingDataLoader(
        dataset,
        batch_size=batch_size,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        collate_fn=collate_fn,
    )
