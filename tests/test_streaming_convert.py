"""Converter (usi-convert-imagenet), reading MDS back, fast decode, and the streaming config keys."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from streaming import StreamingDataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import resized_crop

from helpers import (
    REPO,
    USI_CPU,
    make_imagenet,
    record_shared_memory,
    release_shared_memory,
    run,
    sample_files,
    sample_root,
    shared_memory_descriptors,
    tiny_run,
    unlink_orphaned_shared_memory,
)
from usi_composer.cli import train as train_cli
from usi_composer.cli.convert import main
from usi_composer.config import ConfigError, DataConfig, load_config
from usi_composer.data.draws import draw_sample, sample_rng
from usi_composer.data.spec import TransformSpec
from usi_composer.data.transforms import BytesTransform, decode_rgb

pytestmark = pytest.mark.timeout(120)


def _read_split(root: Path, split: str = "train") -> list[dict]:
    ds = StreamingDataset(local=str(root), split=split, shuffle=False)
    return [ds[i] for i in range(ds.num_samples)]


@pytest.fixture
def odd_imagenet(tmp_path: Path) -> Path:
    """Six real classes plus what real ImageNet contains: grayscale, CMYK and a PNG named .JPEG."""
    src = make_imagenet(tmp_path / "src", n_classes=6)
    gray = next(f for f in sample_files() if Image.open(f).mode == "L")
    rgb = Image.open(sample_files()[0]).convert("RGB")
    odd = src / "train" / "n99999999"
    odd.mkdir()
    (odd / "gray.JPEG").write_bytes(gray.read_bytes())
    rgb.convert("CMYK").save(odd / "cmyk.JPEG", format="JPEG")
    rgb.save(odd / "png_inside.JPEG", format="PNG")
    return src


def test_the_suites_release_of_streaming_shared_memory_closes_a_datasets_descriptors(tmp_path: Path) -> None:
    """The autouse fixture in conftest.py keeps the suite under CI's descriptor limit: this fails
    where a streaming release makes its blocks some other way (then the fixture records nothing)."""
    out = tmp_path / "mds"
    assert main([str(make_imagenet(tmp_path / "src", n_classes=2)), "--out", str(out), "--no-progress"]) == 0
    before = shared_memory_descriptors()
    with record_shared_memory() as made:
        assert len(_read_split(out)) == 2
        assert len(made) >= 6 and shared_memory_descriptors() >= before + len(made)  # still open: the leak
        release_shared_memory(made)
    assert made == [] and shared_memory_descriptors() == before


def test_orphaned_streaming_blocks_go_and_held_ones_stay() -> None:
    orphan, held = Path("/dev/shm/999998_locals"), Path("/dev/shm/999999_locals")
    orphan.write_bytes(b"left by a killed run")
    try:
        with held.open("wb"):  # a live process's block
            assert "999998_locals" in unlink_orphaned_shared_memory()
            assert not orphan.exists() and held.exists()
    finally:
        orphan.unlink(missing_ok=True)
        held.unlink()


def test_convert_keeps_bytes_labels_classes_and_decodes_odd_files_to_rgb(odd_imagenet: Path, tmp_path: Path) -> None:
    out = tmp_path / "mds"
    assert main([str(odd_imagenet), "--out", str(out), "--shard-size", "256kb", "--no-progress"]) == 0
    classes = json.loads((out / "classes.json").read_text())
    wnids = sorted(p.name for p in (odd_imagenet / "train").iterdir())
    assert classes["wnids"] == wnids
    assert classes["names"][0] == "tench, Tinca tinca"  # n01440764, from timm's ImageNet info
    samples = _read_split(out)
    spec = TransformSpec.from_data(DataConfig(image_size=24))
    assert len(samples) == 9 and len({s["key"] for s in samples}) == 9
    assert len(list((out / "train").glob("gen-*/shard.*.mds"))) > 1  # in the split's generation folder
    for s in samples:
        source = odd_imagenet / "train" / s["key"]
        assert s["image"] == source.read_bytes()  # original bytes, no re-encode
        assert s["label"] == wnids.index(source.parent.name)
        for fast in (True, False):
            for training in (True, False):
                x = BytesTransform(spec, training, fast=fast)(s["image"], sample_rng(0, 0, 0))
                assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 24, 24)
    index = json.loads((out / "train" / "index.json").read_text())
    assert all("sha1" in shard["raw_data"]["hashes"] for shard in index["shards"])


def test_corrupt_files_fail_listing_every_one_or_are_skipped(odd_imagenet: Path, tmp_path: Path, capsys) -> None:
    bad_dir = odd_imagenet / "train" / "n99999999"
    truncated = bad_dir / "truncated.JPEG"
    truncated.write_bytes(sample_files()[1].read_bytes()[:3000])
    garbage = bad_dir / "garbage.JPEG"
    garbage.write_bytes(b"not an image at all" * 10)
    out = tmp_path / "mds"
    assert main([str(odd_imagenet), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: 2 file(s) in train cannot be converted") and len(err.strip().splitlines()) == 1
    assert str(truncated) in err and str(garbage) in err
    assert not (out / "train" / "index.json").exists()  # nothing that looks complete

    assert main([str(odd_imagenet), "--out", str(out), "--no-progress", "--skip-corrupt"]) == 0
    captured = capsys.readouterr()
    assert "skipped 2 file(s) that cannot be converted" in captured.err
    assert str(truncated) in captured.err and str(garbage) in captured.err
    keys = {s["key"] for s in _read_split(out)}
    assert len(keys) == 9 and not any("truncated" in k or "garbage" in k for k in keys)


def test_restart_rewrites_incomplete_split_and_skips_complete(tmp_path: Path, capsys) -> None:
    src = make_imagenet(tmp_path / "src", n_classes=5)
    out = tmp_path / "mds"
    (out / "train").mkdir(parents=True)
    (out / "train" / "shard.00000.mds").write_bytes(b"half-written by a killed run")  # no index.json
    assert main([str(src), "--out", str(out), "--no-progress"]) == 0
    assert len(_read_split(out)) == 5
    assert main([str(src), "--out", str(out), "--no-progress"]) == 0
    assert "already complete" in capsys.readouterr().out


@pytest.mark.slow
def test_flat_validation_with_labels_csv_and_python_m(tmp_path: Path) -> None:
    src = make_imagenet(tmp_path / "src", n_classes=4)
    wnids = sorted(p.name for p in (src / "train").iterdir())
    val = src / "val"
    val.mkdir()
    rows = ["ImageId,PredictionString"]  # Kaggle's header and format: first word of the second column
    for i, f in enumerate(sample_files()[:4]):
        name = f"ILSVRC2012_val_{i:08d}"
        (val / f"{name}.JPEG").write_bytes(f.read_bytes())
        rows.append(f"{name},{f.parent.name} 1 2 3 4")
    (tmp_path / "val.csv").write_text("\n".join(rows) + "\n")
    proc = run(
        [
            sys.executable,
            "-m",
            "usi_composer.cli.convert",
            str(src),
            "--out",
            str(tmp_path / "mds"),
            "--val-labels",
            str(tmp_path / "val.csv"),
            "--workers",
            "2",
            "--no-progress",
        ]
    )
    assert proc.returncode == 0, proc.stderr
    assert "val: 4 images" in proc.stdout
    val_samples = _read_split(tmp_path / "mds", "val")
    assert sorted((s["key"], s["label"]) for s in val_samples) == [
        (f"ILSVRC2012_val_{i:08d}.JPEG", wnids.index(f.parent.name)) for i, f in enumerate(sample_files()[:4])
    ]


def test_fast_decode_same_crop_boxes_and_close_images() -> None:
    """The reduced-size path shows the same view (same keyed draws) as timm's full-size resized_crop."""
    files = [f for f in sample_files() if min(Image.open(f).size) >= 450][:12]  # large enough to decode at 1/2
    assert len(files) >= 8
    spec = TransformSpec.from_data(DataConfig(image_size=64, hflip=0.0, auto_augment=None))
    fast = BytesTransform(spec, training=True)
    reduced, differences = 0, []
    for i, f in enumerate(files):
        data = f.read_bytes()
        top, left, h, w = draw_sample(sample_rng(0, 0, i), Image.open(f).size, spec).crop
        img_plain = resized_crop(decode_rgb(data), top, left, h, w, [64, 64], InterpolationMode.BICUBIC)
        a = fast(data, sample_rng(0, 0, i)).permute(1, 2, 0).numpy().astype(np.float32)
        b = np.asarray(img_plain, dtype=np.float32)
        assert a.shape == b.shape == (64, 64, 3)
        # small boxes of detailed images differ most (DCT-domain downscaling, up to ~7.3 / 255 seen)
        assert np.abs(a - b).mean() < 8.0, f"{f.name}: mean abs difference {np.abs(a - b).mean():.2f} / 255"
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.97
        differences.append(np.abs(a - b).mean())
        img = Image.open(io.BytesIO(data))
        img.draft(None, (-(-img.size[0] * 64 // w), -(-img.size[1] * 64 // h)))
        reduced += img.size != Image.open(f).size
    assert np.mean(differences) < 4.0
    assert reduced >= len(files) // 2  # the reduced-size decode was really exercised


@pytest.mark.parametrize(
    ("override", "key", "message"),
    [
        ("data.streaming.shuffle_algo=py1x", "data.streaming.shuffle_algo", "unknown shuffle algorithm 'py1x'"),
        ("data.streaming.cache_limit=lots", "data.streaming.cache_limit", "not a size: 'lots'"),
        ("data.streaming.validate_hash=md6", "data.streaming.validate_hash", "unknown hash 'md6'"),
        ("data.streaming.predownload=-1", "data.streaming.predownload", "must be >= 0"),
        ("data.streaming.num_canonical_nodes=0", "data.streaming.num_canonical_nodes", "must be >= 1"),
        ("data.streaming.download_timeout=0", "data.streaming.download_timeout", "must be > 0"),
        ("data.remote=ftp://host/x", "data.remote", "not a remote streaming can read"),
        ("data.streaming.shufle_algo=py1e", "data.streaming.shufle_algo", "did you mean 'shuffle_algo'"),
    ],
)
def test_streaming_config_errors_are_one_line(override: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "yamls" / "usi.yaml", ["data.remote=s3://bucket/imagenet", override])
    assert e.value.key == key and message in str(e.value) and "\n" not in str(e.value)


def test_streaming_config_valid_and_missing_data() -> None:
    cfg = load_config(
        REPO / "yamls" / "usi.yaml",
        ["data.remote=s3://bucket/imagenet", "data.streaming.cache_limit=10gb", "data.streaming.validate_hash=sha1"],
    )
    assert cfg.data.remote == "s3://bucket/imagenet" and cfg.data.streaming.cache_limit == "10gb"
    with pytest.raises(ConfigError, match=r"data\.train_dir: set data\.train_dir"):
        load_config(REPO / "yamls" / "usi.yaml", ["data.train_dir=null"])


def test_train_cli_missing_local_mds_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [f"data.local={tmp_path / 'nothing'}", "trainer.max_duration=1ba", "trainer.global_batch_size=2"]
    assert train_cli.main(["yamls/usi.yaml", *args, *tiny_run(**USI_CPU)]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()], err
    where = tmp_path / "nothing" / "train" / "index.json"
    assert err.startswith(f"error: data.streaming.train_split: no MDS split at {where} (write one with usi-"), err


def test_sample_data_present() -> None:
    assert len(sample_files()) == 1000 and (sample_root() / "train").is_dir()


@pytest.mark.timeout(120)
def test_a_shard_that_fails_to_load_ends_the_epoch_with_one_error(tmp_path: Path, monkeypatch) -> None:
    """The download thread's failure reaches the caller as one line naming the shard; the timeout
    guards the epoch's end, which once waited forever for that thread (see ImageNetMDS)."""
    from usi_composer.data.convert import convert_imagenet
    from usi_composer.data.mds import StreamingDataError, streaming_dataloader

    convert_imagenet(
        make_imagenet(tmp_path / "src", n_classes=24),
        str(tmp_path / "mds"),
        workers=1,
        shard_size="128kb",
        progress=False,
    )

    def broken(self: StreamingDataset, shard_id: int, blocking: bool = True) -> None:
        raise OSError("connection reset")  # as a dead server would

    monkeypatch.setattr(StreamingDataset, "prepare_shard", broken)
    loader = streaming_dataloader(
        remote=None,
        local=str(tmp_path / "mds"),
        split="train",
        transform=BytesTransform(TransformSpec.from_data(DataConfig(image_size=16)), training=True),
        batch_size=4,
        shuffle=False,
        drop_last=False,
        num_workers=0,
        pin_memory=False,
        persistent_workers=False,
    )
    with pytest.raises(
        StreamingDataError, match=r"cannot read shard 'gen-[^/']+/shard\.\d+\.mds' of .*mds: OSError: connection reset"
    ):
        for _ in loader:
            pass
