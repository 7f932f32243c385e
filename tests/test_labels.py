"""Labels and classes are checked before step 1 and as samples are read; images over the pixel
limit are refused from their header; remote shards are hash-checked by default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from streaming import MDSWriter

from helpers import IMAGENET_SAMPLE, REPO
from usi_composer.cli import train as train_cli
from usi_composer.config import DataConfig, load_config
from usi_composer.data.gpu_pipeline import EncodedSample
from usi_composer.data.mds import MDS_COLUMNS
from usi_composer.data.spec import TransformSpec
from usi_composer.data.transforms import BytesTransform, transform_sample
from usi_composer.errors import CorruptSampleError
from usi_composer.plan import resolve

FILES = sorted((IMAGENET_SAMPLE / "train").glob("*/*.JPEG"))[:4]


def _mds(root: Path, labels: list[int], wnids: list[str] | None) -> Path:
    """A tiny MDS root of real JPEGs with the given labels (and a classes.json listing ``wnids``)."""
    with MDSWriter(out=str(root / "train"), columns=MDS_COLUMNS, hashes=["sha1"]) as writer:
        for i, label in enumerate(labels):
            writer.write({"image": FILES[i % len(FILES)].read_bytes(), "label": label, "key": f"img{i}.JPEG"})
    if wnids is not None:
        (root / "classes.json").write_text(json.dumps({"wnids": wnids, "names": wnids}))
    return root


def _train(root: Path, *extra: str) -> list[str]:
    return [
        str(REPO / "yamls" / "usi.yaml"),
        f"data.local={root}",
        "data.streaming.val_split=null",
        "data.num_classes=4",
        "data.image_size=16",
        "data.num_workers=0",
        "model.name=resnet10t",
        "algorithms.distillation.enabled=false",
        "trainer.global_batch_size=4",
        "trainer.max_duration=1ba",
        "trainer.progress_bar=false",
        *extra,
    ]


def test_a_label_out_of_range_is_one_line_naming_the_sample(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _mds(tmp_path / "mds", [0, 1, 2, 7], wnids=None)  # written by another tool: no classes.json
    assert train_cli.main(_train(root)) == 2  # a label out of range: no retry fixes it
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert "('img3.JPEG') in shard 'shard.00000.mds'" in err
    assert "has label 7, not a class of data.num_classes=4 (0..3)" in err


def test_classes_json_that_disagrees_with_num_classes_stops_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root = _mds(tmp_path / "mds", [0, 1, 2, 0], wnids=["n1", "n2", "n3"])
    assert train_cli.main(_train(root)) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: data.num_classes: is 4, but {root}/classes.json lists 3 classes: set data.num_classes=3"


def test_matching_classes_train(tmp_path: Path) -> None:
    root = _mds(tmp_path / "mds", [0, 1, 2, 3], wnids=["n1", "n2", "n3", "n4"])
    assert train_cli.main(_train(root)) == 0


@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
def test_an_image_over_the_pixel_limit_is_refused_from_its_header(pipeline: str) -> None:
    data = FILES[0].read_bytes()
    width, height = Image.open(FILES[0]).size
    below = TransformSpec.from_data(DataConfig(image_size=16, max_image_pixels=width * height - 1))
    transform = BytesTransform(below, training=True) if pipeline == "cpu" else EncodedSample(below, training=False)
    with pytest.raises(CorruptSampleError) as e:
        transform_sample(transform, data, None, lambda: str(FILES[0]))  # type: ignore[arg-type]
    assert str(e.value) == (
        f"{FILES[0]} is {width} x {height} = {width * height:,} pixels, over data.max_image_pixels="
        f"{width * height - 1:,} (refused before decoding; raise the limit to use it)"
    )
    at_limit = BytesTransform(
        TransformSpec.from_data(DataConfig(image_size=16, max_image_pixels=width * height)), training=False
    )
    assert transform_sample(at_limit, data, None, lambda: "x").shape == (3, 16, 16)  # type: ignore[arg-type]


def test_the_pixel_limit_reaches_training(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _mds(tmp_path / "mds", [0, 1, 2, 3], wnids=["n1", "n2", "n3", "n4"])
    assert train_cli.main(_train(root, "data.max_image_pixels=1000")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pixels, over data.max_image_pixels=1,000" in err, err


def test_remote_shards_are_hash_checked_by_default() -> None:
    usi = REPO / "yamls" / "usi.yaml"

    def validate_hash(*overrides: str) -> str | None:
        return resolve(load_config(usi, list(overrides))).validate_hash

    assert load_config(usi, ["data.remote=s3://bucket/imagenet"]).data.streaming.validate_hash == "auto"
    assert validate_hash("data.remote=s3://bucket/imagenet") == "sha1"
    assert validate_hash("data.local=/data/imagenet-mds") is None
    assert validate_hash("data.remote=s3://b/i", "data.streaming.validate_hash=null") is None
    assert validate_hash("data.local=/d", "data.streaming.validate_hash=xxh64") == "xxh64"
