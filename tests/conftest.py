"""Shared fixtures: real data (the shipped digits, ../shared's ImageNet sample), one factory per kind
of data made from it (image folders, MDS, an S3 bucket, JPEG bytes) and saved weights.

The factories make each variant once per session (per module for the S3 server's): what they return
is read by many tests, so a test that changes data makes its own copy (``tmp_path``)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from helpers import (
    IMAGENET_SAMPLE,
    REPO,
    MotoServer,
    make_imagenet,
    record_shared_memory,
    release_shared_memory,
    run,
    tiny_image_folder,
    unlink_orphaned_shared_memory,
)


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
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_image_folder``: helpers.NUM_CLASSES classes of 16 px noise in train/ and val/ (the data of
    ``tiny_run(tiny_folder, teacher_weights=..., **DEMO_CPU)``)."""
    return tiny_image_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``image_folders(n_classes, per_class=1)`` is a root holding ``train/<wnid>/*.JPEG``, the
    first ``n_classes`` real JPEGs of the ImageNet sample, each under ``per_class`` names (``make_imagenet``)."""
    made: dict[tuple[int, int], Path] = {}

    def make(n_classes: int, per_class: int = 1) -> Path:
        if (n_classes, per_class) not in made:
            root = tmp_path_factory.mktemp(f"imagenet-{n_classes}x{per_class}")
            made[(n_classes, per_class)] = make_imagenet(root, n_classes=n_classes, per_class=per_class)
        return made[(n_classes, per_class)]

    return make


@pytest.fixture(scope="session")
def mds_dataset(image_folders, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``mds_dataset(n_classes, per_class=1, shard_size="64mb")`` is ``image_folders(n_classes,
    per_class)`` converted to MDS shards (one converter process): a local root holding ``train/``."""
    made: dict[tuple[int, int, str], Path] = {}

    def make(n_classes: int, per_class: int = 1, shard_size: str = "64mb") -> Path:
        key = (n_classes, per_class, shard_size)
        if key not in made:
            from usi_composer.data.convert import convert_imagenet

            out = tmp_path_factory.mktemp(f"mds-{n_classes}x{per_class}-{shard_size}")
            src = image_folders(n_classes, per_class)
            convert_imagenet(src, str(out), workers=1, shard_size=shard_size, progress=False)
            made[key] = out
        return made[key]

    return make


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoServer]:
    """moto's S3 server on 127.0.0.1 for a module's tests, its endpoint and fake credentials in
    ``os.environ`` meanwhile."""
    with MotoServer().serving() as server:
        yield server


@pytest.fixture(scope="module")
def s3_bucket(s3: MotoServer) -> Callable[..., str]:
    """Factory: ``s3_bucket(folder, url, shard_size="64mb", cli=False)`` converts the image folder
    ``folder`` (``train/``, ...) to MDS at ``url`` (``s3://<new bucket>/<prefix>``) on the module's
    server, and returns ``url``. ``cli``: with ``python -m usi_composer.cli.convert``, as a user would
    (its own workers), checking its exit code and report; else in this process, one converter."""

    def make(folder: Path, url: str, shard_size: str = "64mb", cli: bool = False) -> str:
        bucket, prefix = url.removeprefix("s3://").split("/", 1)
        s3.client().create_bucket(Bucket=bucket)
        if cli:
            cmd = [
                sys.executable,
                "-m",
                "usi_composer.cli.convert",
                str(folder),
                "--out",
                url,
                "--shard-size",
                shard_size,
            ]
            proc = run([*cmd, "--no-progress"], env=s3.env(), timeout=150)
            assert proc.returncode == 0, proc.stderr[-2000:]
            images = sum(1 for f in (folder / "train").rglob("*") if f.is_file())
            assert f"train: {images} images" in proc.stdout, proc.stdout
        else:
            from usi_composer.data.convert import convert_imagenet

            convert_imagenet(folder, url, workers=1, shard_size=shard_size, progress=False)
        keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")["Contents"]]
        assert f"{prefix}/classes.json" in keys and f"{prefix}/train/index.json" in keys, keys
        return url

    return make


@pytest.fixture(scope="module")
def jpegs(imagenet_sample: Path) -> list[bytes]:
    """The bytes of the ImageNet sample's first 12 JPEGs (12 classes)."""
    return [f.read_bytes() for f in sorted(imagenet_sample.glob("*/*.JPEG"))[:12]]


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
