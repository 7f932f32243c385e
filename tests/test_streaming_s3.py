"""Object storage for real: moto's S3 server on 127.0.0.1, conversion into a bucket, training from it, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, USI_CPU, MotoServer, make_imagenet, run, sample_root, tiny_run
from usi_composer.config import DataConfig
from usi_composer.data.mds import StreamingDataError, streaming_dataloader
from usi_composer.data.spec import TransformSpec
from usi_composer.data.transforms import BytesTransform
from usi_composer.errors import SetupError

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]  # a local S3 server and training subprocesses
BOUND_S = 60  # every fault must end in an error within this many seconds


@pytest.fixture(scope="module")
def bucket(s3: MotoServer, s3_bucket) -> str:
    """imagenet-sample converted into s3://imagenet-sample/mds with the CLI, as a newcomer would."""
    url = s3_bucket(sample_root(), "s3://imagenet-sample/mds", shard_size="8mb", cli=True)
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="imagenet-sample", Prefix="mds/")["Contents"]]
    assert len(keys) > 10, keys
    return url


def _loader(remote: str, local: Path, **kwargs):
    args = dict(download_timeout=5, download_retry=1, num_workers=0, persistent_workers=False, pin_memory=False)
    args.update(kwargs)
    return streaming_dataloader(
        remote=remote,
        local=str(local),
        split="train",
        transform=BytesTransform(TransformSpec.from_data(DataConfig(image_size=16)), training=True),
        batch_size=4,
        shuffle=True,
        drop_last=True,
        **args,
    )


def _iterate(loader, batches: int = 1000) -> int:
    n = 0
    for n, _ in enumerate(loader, 1):
        if n >= batches:
            break
    return n


def test_train_two_batches_streaming_from_the_bucket(bucket: str, s3: MotoServer, tmp_path: Path) -> None:
    proc = run(
        [
            sys.executable,
            "train.py",
            "yamls/usi.yaml",
            f"data.remote={bucket}",
            f"data.local={tmp_path / 'cache'}",
            "data.streaming.val_split=null",
            "data.streaming.validate_hash=sha1",
            "data.num_workers=1",
            "trainer.global_batch_size=4",
            "trainer.max_duration=2ba",
            *tiny_run(**USI_CPU),
        ],
        env=s3.env(),
        timeout=150,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list((tmp_path / "cache" / "train").glob("gen-*/shard.*.mds")), "no shard was downloaded"


def test_wrong_bucket_is_a_clear_error(s3: MotoServer, tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(SetupError, match=r"cannot open the MDS dataset at s3://no-such-bucket/mds/train: "):
        _loader("s3://no-such-bucket/mds", tmp_path / "cache")
    assert time.monotonic() - start < BOUND_S


def test_wrong_credentials_are_a_clear_error(tmp_path: Path) -> None:
    strict = MotoServer(free_requests=2).start()  # then rejects keys that its IAM does not know
    strict.client().create_bucket(Bucket="private")
    strict.client().put_object(Bucket="private", Key="mds/train/index.json", Body=b'{"version": 2, "shards": []}')
    saved = {k: os.environ.get(k) for k in strict.env()}
    os.environ.update(strict.env())
    try:
        with pytest.raises(SetupError) as e:
            _loader("s3://private/mds", tmp_path / "cache")
        message = str(e.value)
        assert message.startswith("cannot open the MDS dataset at s3://private/mds/train: "), message
        assert "permission" in message and "\n" not in message, message
    finally:
        strict.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _shard_name(s3: MotoServer, prefix: str, shard: int) -> str:
    """The file name of a shard in its split's index: ``gen-.../shard.NNNNN.mds``."""
    index = s3.client().get_object(Bucket="imagenet-sample", Key=f"{prefix}/train/index.json")["Body"].read()
    return json.loads(index)["shards"][shard]["raw_data"]["basename"]


def _copy_dataset(s3: MotoServer, src: str, dst: str) -> None:
    c = s3.client()
    for o in c.list_objects_v2(Bucket="imagenet-sample", Prefix=f"{src}/")["Contents"]:
        c.copy_object(
            Bucket="imagenet-sample",
            Key=o["Key"].replace(src, dst, 1),
            CopySource={"Bucket": "imagenet-sample", "Key": o["Key"]},
        )


@pytest.mark.parametrize("num_workers", [0, 1])
def test_missing_shard_names_remote_and_shard(bucket: str, s3: MotoServer, tmp_path: Path, num_workers: int) -> None:
    _copy_dataset(s3, "mds", f"missing{num_workers}")
    shard = _shard_name(s3, f"missing{num_workers}", 3)
    s3.client().delete_object(Bucket="imagenet-sample", Key=f"missing{num_workers}/train/{shard}")
    start = time.monotonic()
    with pytest.raises(StreamingDataError) as e:
        _iterate(_loader(f"s3://imagenet-sample/missing{num_workers}", tmp_path / "c", num_workers=num_workers))
    assert str(e.value).startswith(
        f"cannot read shard '{shard}' of s3://imagenet-sample/missing{num_workers}/train: "
    ), str(e.value)
    assert "\n" not in str(e.value) and time.monotonic() - start < BOUND_S


def test_corrupted_shard_fails_hash_validation(bucket: str, s3: MotoServer, tmp_path: Path) -> None:
    _copy_dataset(s3, "mds", "corrupt")
    c = s3.client()
    shard = _shard_name(s3, "corrupt", 1)
    key = f"corrupt/train/{shard}"
    data = bytearray(c.get_object(Bucket="imagenet-sample", Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    c.put_object(Bucket="imagenet-sample", Key=key, Body=bytes(data))
    with pytest.raises(
        StreamingDataError,
        match=rf"shard '{shard}' of s3://imagenet-sample/corrupt/train: hash validation failed",
    ):
        _iterate(_loader("s3://imagenet-sample/corrupt", tmp_path / "c", validate_hash="sha1"))


def test_server_stopped_mid_epoch_is_a_clear_error_not_a_hang(bucket: str, tmp_path: Path) -> None:
    other = MotoServer().start()  # its own server, so stopping it leaves the module's one alive
    try:
        env = other.env()
        other.client().create_bucket(Bucket="stopping")
        src = make_imagenet(tmp_path / "src", n_classes=40)  # 40 real JPEGs, ~10 shards
        proc = run(
            [
                sys.executable,
                "-m",
                "usi_composer.cli.convert",
                str(src),
                "--out",
                "s3://stopping/mds",
                "--shard-size",
                "256kb",
                "--no-progress",
            ],
            env=env,
            timeout=150,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        saved = os.environ["S3_ENDPOINT_URL"]
        os.environ["S3_ENDPOINT_URL"] = other.url
        try:
            loader = _loader("s3://stopping/mds", tmp_path / "c", predownload=4)
            it = iter(loader)
            next(it)
            other.stop()
            start = time.monotonic()
            expected = r"cannot read shard 'gen-[^/']+/shard\.\d+\.mds' of s3://stopping/mds/train: "
            with pytest.raises(StreamingDataError, match=expected):
                for _ in it:
                    pass
            assert time.monotonic() - start < BOUND_S
        finally:
            os.environ["S3_ENDPOINT_URL"] = saved
    finally:
        other.stop()


def test_stale_shared_memory_of_a_killed_run_does_not_break_the_next(
    bucket: str, s3: MotoServer, tmp_path: Path
) -> None:
    code = (
        "import sys, os; sys.path.insert(0, 'tests');"
        "from test_streaming_s3 import _loader; from pathlib import Path;"
        f"it = iter(_loader('{bucket}', Path('{tmp_path / 'cache'}'))); next(it);"
        "print('iterating', flush=True); import time; time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env={**os.environ, **s3.env()}, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "iterating"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert _iterate(_loader(bucket, tmp_path / "cache"), batches=3) == 3
