"""Shared fixtures: real data (the shipped digits, ../shared's ImageNet sample) and saved weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import IMAGENET_SAMPLE, REPO, record_shared_memory, release_shared_memory, unlink_orphaned_shared_memory


def pytest_sessionstart(session: pytest.Session) -> None:
    """Killed runs' shared memory would cost every dataset of the suite descriptors: it goes first."""
    orphans = unlink_orphaned_shared_memory()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if orphans and reporter:
        reporter.write_line(f"removed {len(orphans)} orphaned streaming shared-memory block(s) from /dev/shm")


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def imagenet_sample() -> Path:
    """1000 real ImageNet JPEGs, one per class (``../shared/data/imagenet-sample``, or a part of it
    at ``$USI_IMAGENET_SAMPLE``)."""
    train = IMAGENET_SAMPLE / "train"
    assert train.is_dir(), f"missing {train}: CI clones the repo with shared/ beside it"
    return train


@pytest.fixture(scope="session")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's digits in the ImageNet folder layout (root with train/ and val/)."""
    from usi_composer.data import export_digits

    return export_digits(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="session")
def saved_teacher(tmp_path_factory: pytest.TempPathFactory):
    """Factory: a timm model's freshly initialised weights saved to a file (tests' own weights)."""
    cache: dict[tuple[str, int], Path] = {}

    def make(name: str = "resnet10t", num_classes: int = 1000) -> Path:
        if (name, num_classes) not in cache:
            import timm

            torch.manual_seed(0)
            path = tmp_path_factory.mktemp("teacher") / f"{name}-{num_classes}.pt"
            torch.save(timm.create_model(name, num_classes=num_classes).state_dict(), path)
            cache[(name, num_classes)] = path
        return cache[(name, num_classes)]

    return make


@pytest.fixture(scope="session")
def _streaming_shared_memory():
    """Every streaming ``SharedMemory`` this process makes, recorded as made (``record_shared_memory``)."""
    with record_shared_memory() as made:
        yield made


@pytest.fixture(autouse=True)
def _release_streaming_shared_memory(_streaming_shared_memory):
    """After each test, release the shared memory its datasets made: the suite makes hundreds of
    datasets, and each keeps seven file descriptors until exit (CI ran out of them: EMFILE)."""
    yield
    release_shared_memory(_streaming_shared_memory)
