"""ImageNet-layout folders (``<root>/<class>/<image>``) as distributed Composer dataloaders.

The loader reads encoded bytes and runs the same ``transform(data, rng)`` as the MDS path, with
``rng = sample_rng(seed, epoch, index)``. The epoch reaches the loader workers with each index:
the sampler yields ``(epoch, index)`` pairs. It is built in the main process, where Composer calls
``set_epoch`` at every epoch start, and the DataLoader sends each key to a worker, so the key is
right for any number of workers, persistent or not, and after a mid-epoch resume (Composer skips
the trained batches; their draws are never reused).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from usi_composer.data.draws import sample_rng
from usi_composer.data.layout import describe_problems, list_images
from usi_composer.data.transforms import transform_sample
from usi_composer.errors import SetupError

__all__ = ["EpochIndexSampler", "ImageFolderBytes", "folder_dataloader"]


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class ImageFolderBytes(Dataset):
    """An ImageNet-layout folder (listed by :mod:`usi_composer.data.layout`) indexed by ``(epoch, index)``,
    yielding ``(transform(encoded bytes, sample_rng(seed, epoch, index)), label)``.

    ``classes`` None: the folder's own class folders (a training split); else the training split's
    classes, whose indices are the labels (a validation folder lacking a class keeps train's labels).
    A file name that is not UTF-8 or a symlink loop is a one-line :class:`SetupError` here.
    """

    def __init__(
        self,
        root: str,
        transform: Callable[[bytes, np.random.Generator], Any],
        seed: int,
        classes: Sequence[str] | None = None,
    ) -> None:
        listing = list_images(root, classes)
        if listing.problems:
            raise SetupError(
                f"{len(listing.problems)} file(s) in {root} cannot be read: {describe_problems(listing.problems, 10)}"
            )
        if not listing.samples:
            raise SetupError(f"no images in {root} (expected <class>/<image> sub-folders)")
        self.classes, self.samples = listing.classes, listing.samples
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[Any, int]:
        epoch, index = key
        path, label = self.samples[index]
        data = read_bytes(path)
        return transform_sample(self.transform, data, sample_rng(self.seed, epoch, index), lambda: path), label


class EpochIndexSampler(DistributedSampler):
    """Composer's distributed sampler (``dist.get_sampler``) yielding ``(epoch, index)`` keys.

    Still a ``DistributedSampler``, so Composer finds it and calls ``set_epoch`` every epoch."""

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        return ((epoch, index) for index in super().__iter__())


def folder_dataloader(
    root: str,
    transform: Callable[[bytes, np.random.Generator], Any],
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    num_workers: int,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    seed: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    classes: Sequence[str] | None = None,
) -> DataLoader:
    """A per-process ``DataLoader`` over ``root``; each process reads its shard of the samples.

    Classes are the sorted sub-folder names (for ImageNet, sorted wnids give the standard 0..999),
    hidden ones and ``lost+found`` left out; a validation folder passes the training split's
    ``classes`` (``loader.dataset.classes``) to get its labels. ``seed`` keys both the shuffle and
    the samples' draws; ``collate_fn`` None: torch's default.
    """
    if not Path(root).is_dir():
        raise SetupError(f"data folder not found: {root} (expected <class>/<image> sub-folders)")
    dataset = ImageFolderBytes(root, transform, seed, classes)
    sampler = EpochIndexSampler(
        dataset,
        num_replicas=dist.get_world_size(),
        rank=dist.get_global_rank(),
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        collate_fn=collate_fn,
    )
