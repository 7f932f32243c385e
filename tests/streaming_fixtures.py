"""Shared helpers of the streaming tests: real ImageNet samples, a local S3 server, child runs."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from conftest import IMAGENET_SAMPLE as SAMPLE
from conftest import REPO, free_port, run

__all__ = ["REPO", "TINY_TRAIN", "MotoServer", "free_port", "make_imagenet", "run", "sample_files", "sample_root"]

PYTHON = sys.executable


def sample_root() -> Path:
    """The 1000 real ImageNet JPEGs (one per class) that the repo's CI places beside the clone."""
    train = SAMPLE / "train"
    assert train.is_dir(), f"missing test data: {train.resolve()} (clone the repo next to shared/)"
    return SAMPLE.resolve()


def sample_files() -> list[Path]:
    return sorted(sample_root().glob("train/*/*.JPEG"))


def make_imagenet(root: Path, n_classes: int, per_class: int = 1, start: int = 0) -> Path:
    """``root/train/<wnid>/*.JPEG`` from the real samples: ``n_classes`` classes, ``per_class``
    images each (the same real JPEG bytes under several names where per_class > 1)."""
    files = sample_files()[start : start + n_classes]
    for f in files:
        folder = root / "train" / f.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            shutil.copyfile(f, folder / (f.name if k == 0 else f"{f.stem}_{k}.JPEG"))
    return root


class MotoServer:
    """moto's standalone S3 server in a subprocess on 127.0.0.1 (a real HTTP S3 endpoint)."""

    def __init__(self, free_requests: int | None = None) -> None:
        # With free_requests=N, moto checks credentials (IAM) on every request after the first N.
        self.free_requests = free_requests
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> MotoServer:
        moto_server = Path(PYTHON).with_name("moto_server")
        cmd = [str(moto_server)] if moto_server.exists() else [PYTHON, "-m", "moto.server"]
        self.proc = subprocess.Popen(
            [*cmd, "-H", "127.0.0.1", "-p", str(self.port)],
            env={
                **os.environ,
                **({"INITIAL_NO_AUTH_ACTION_COUNT": str(self.free_requests)} if self.free_requests is not None else {}),
            },
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                assert self.proc.poll() is None, "moto_server exited at start"
                time.sleep(0.1)
        raise AssertionError("moto_server did not start within 30 s")

    @contextlib.contextmanager
    def serving(self) -> Iterator[MotoServer]:
        """Started, with its endpoint and credentials in ``os.environ``; both undone on exit."""
        self.start()
        saved = {k: os.environ.get(k) for k in self.env()}
        os.environ.update(self.env())
        try:
            yield self
        finally:
            self.stop()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def env(self) -> dict[str, str]:
        """Environment for talking to this server only: endpoint and fake credentials."""
        return {
            "S3_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "NO_PROXY": "127.0.0.1,localhost",
        }

    def client(self):  # -> boto3 S3 client
        import boto3

        env = self.env()
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )


TINY_TRAIN = [
    "model.name=resnet18",
    "algorithms.distillation.enabled=false",
    "algorithms.mixup_cutmix.enabled=false",
    "algorithms.channels_last=false",
    "data.image_size=16",
    "data.pin_memory=false",
    "trainer.device=cpu",
    "trainer.precision=fp32",
    "trainer.progress_bar=false",
]
