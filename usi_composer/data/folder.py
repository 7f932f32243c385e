"""ImageNet-layout folders (``<root>/<class>/<image>``) as distributed Composer dataloaders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from composer.utils import dist
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from usi_composer.errors import SetupError

__all__ = ["folder_dataloader"]


def folder_dataloader(
    root: str,
    transform: Callable[[Any], Any],
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    num_workers: int,
    pin_memory: bool = True,
    persistent_workers: bool = True,
    seed: int = 0,
) -> DataLoader:
    """A per-process ``DataLoader`` over ``root``; each process reads its shard of the samples.

    Classes are the sorted sub-folder names (for ImageNet, sorted wnids give the standard 0..999).
    """
    if not Path(root).is_dir():
        raise SetupError(f"data folder not found: {root} (expected <class>/<image> sub-folders)")
    dataset = ImageFolder(root, transform=transform)
    sampler = dist.get_sampler(dataset, shuffle=shuffle, drop_last=drop_last, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )
