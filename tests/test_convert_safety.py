"""usi-convert-imagenet and the folder listing never lose data: refused, failed and killed runs leave the
source and the previous output byte-identical; bad inputs are one line naming the file."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from streaming import MDSWriter

from helpers import REPO, MotoServer, convert, keys_and_labels, make_imagenet, sample_files, tree_hash
from usi_composer.data.folder import ImageFolderBytes, folder_dataloader
from usi_composer.data.generations import split_complete
from usi_composer.data.layout import find_classes, list_images
from usi_composer.data.mds import MDS_COLUMNS, refresh_cached_index
from usi_composer.errors import SetupError

pytestmark = pytest.mark.timeout(120)


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def source_samples(split_dir: Path, classes: list[str]) -> set[tuple[str, int]]:
    """``(key, label)`` of the images directly in the class folders (not hidden)."""
    images = (p for p in split_dir.glob("*/*.JPEG") if p.parent.name in classes and not p.name.startswith("."))
    return {(str(p.relative_to(split_dir)), classes.index(p.parent.name)) for p in images}


def wnids(out: Path) -> list[str]:
    return json.loads((out / "classes.json").read_text())["wnids"]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    root = make_imagenet(tmp_path / "src", n_classes=6)
    val = root / "val"
    for f in sample_files()[:6:2]:  # val lacks half of the classes: it keeps train's labels
        (val / f.parent.name).mkdir(parents=True)
        shutil.copyfile(f, val / f.parent.name / f"val_{f.name}")
    return root


@pytest.fixture
def done(src: Path, tmp_path: Path, capsys) -> Path:
    """``src`` converted once: a complete previous output."""
    out = tmp_path / "mds"
    assert convert(capsys, src, out, "--shard-size", "128kb")[0] == 0
    return out


# --- outputs that overlap the source ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where",
    [
        lambda src: src,  # output == source root (it contains train and val)
        lambda src: src / "train",
        lambda src: src / "train" / "mds",  # inside a split
        lambda src: src / "val" / "n01440764" / "mds",
        lambda src: src.parent,  # contains the source
        "link",  # a symlink to a split: real paths are compared
    ],
    ids=["source-root", "split", "inside-split", "inside-val-class", "containing", "symlink"],
)
def test_an_output_overlapping_a_source_split_is_refused_before_anything_is_written(
    src: Path, tmp_path: Path, capsys, where: Callable[[Path], Path] | str
) -> None:
    if where == "link":
        out = tmp_path / "link"
        out.symlink_to(src / "train", target_is_directory=True)
    else:
        out = where(src)
    before = tree_hash(tmp_path)
    code, _, err = convert(capsys, src, out)
    line = one_line_error(err)
    assert code == 2 and "source split" in line and str(out) in line, line
    assert tree_hash(tmp_path) == before


def test_a_sibling_of_the_splits_is_a_valid_output(src: Path, capsys) -> None:
    assert convert(capsys, src, src / "mds")[0] == 0
    assert split_complete(str(src / "mds" / "train")) and split_complete(str(src / "mds" / "val"))


# --- failed, repeated and killed conversions -----------------------------------------------------------------


def test_a_failed_overwrite_leaves_the_previous_split_byte_identical(src: Path, done: Path, capsys) -> None:
    bad = src / "train" / sorted(p.name for p in (src / "train").iterdir())[2] / "truncated.JPEG"
    bad.write_bytes(sample_files()[7].read_bytes()[:2000])
    before_out, before_src = tree_hash(done), tree_hash(src)
    code, _, err = convert(capsys, src, done, "--overwrite", "--shard-size", "128kb")
    line = one_line_error(err)
    assert code == 2 and line.startswith("error: 1 file(s) in train cannot be converted") and str(bad) in line
    assert "nothing was published" in line
    assert tree_hash(done) == before_out and tree_hash(src) == before_src


def test_a_rerun_converts_an_incomplete_split_and_removes_only_its_own_leftovers(src: Path, tmp_path: Path, capsys):
    out = tmp_path / "mds"
    split = out / "train"
    (split / "gen-20200101T000000Z-0123abcd").mkdir(parents=True)  # a killed run's generation: ours
    (split / "gen-20200101T000000Z-0123abcd" / "shard.00000.mds").write_bytes(b"half-written")
    (split / "shard.00000.mds").write_bytes(b"half-written by the earlier converter")  # named by nothing: kept
    (split / "gen-mine").mkdir()  # not a name we give: kept
    (split / "gen-mine" / "notes.txt").write_text("a user's file")
    theirs = {k: v for k, v in tree_hash(out).items() if b"0123abcd" not in k}
    code, stdout, _ = convert(capsys, src, out)
    assert code == 0
    assert "train: removed 1 unfinished generation(s) of an interrupted conversion" in stdout
    assert not (split / "gen-20200101T000000Z-0123abcd").exists()
    assert theirs.items() <= tree_hash(out).items()
    classes = wnids(out)
    assert keys_and_labels(out) == source_samples(src / "train", classes)
    assert keys_and_labels(out, "val") == source_samples(src / "val", classes)


def test_a_split_of_the_earlier_converter_is_complete_and_overwritten_file_by_file(src: Path, tmp_path: Path, capsys):
    out = tmp_path / "mds"
    code, *_ = convert(capsys, src, out, "--splits", "val")
    assert code == 0
    old = out / "train"
    with MDSWriter(out=str(old), columns=MDS_COLUMNS, size_limit="64kb") as writer:  # shards at train/shard.*
        for i, f in enumerate(sample_files()[:6]):
            writer.write({"image": f.read_bytes(), "label": i, "key": f"old/{f.name}"})
    (old / "notes.txt").write_text("not named by the index")
    listed = [s["raw_data"]["basename"] for s in json.loads((old / "index.json").read_text())["shards"]]
    assert len(listed) > 1 and split_complete(str(old))
    before = tree_hash(out)
    code, stdout, _ = convert(capsys, src, out)
    assert code == 0 and "train: already complete" in stdout and tree_hash(out) == before

    assert convert(capsys, src, out, "--overwrite", "--splits", "train")[0] == 0
    assert not any((old / name).exists() for name in listed)
    assert (old / "notes.txt").read_text() == "not named by the index"
    assert keys_and_labels(out) == source_samples(src / "train", wnids(out))


def test_a_second_conversion_into_a_locked_output_is_refused(src: Path, done: Path, capsys) -> None:
    fd = os.open(done, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running conversion holds it
        before = tree_hash(done)
        code, _, err = convert(capsys, src, done, "--overwrite")
        assert code == 2 and "another usi-convert-imagenet is writing to" in one_line_error(err)
        assert tree_hash(done) == before
    finally:
        os.close(fd)


# A conversion held mid-way: the check of image BLOCK_AT + 1 never returns, so the test kills it
# while its generation holds some shards, after polling for the first one.
BLOCKING_CHILD = """
import sys, threading
import usi_composer.data.convert as convert
check, seen = convert._read_and_check, []
def held(path, max_pixels):
    seen.append(path)
    if len(seen) > int(sys.argv[1]):
        threading.Event().wait()
    return check(path, max_pixels)
convert._read_and_check = held
from usi_composer.cli.convert import main
sys.exit(main(sys.argv[2:]))
"""
BLOCK_AT = 20


def _kill_source(root: Path, copies: int) -> Path:
    """Real JPEGs of 30-60 kB, ``copies`` of each: a 128 kB shard holds 2-4, so a conversion held
    after BLOCK_AT images has flushed several shards."""
    files = [f for f in sample_files() if 30_000 < f.stat().st_size < 60_000][:6]
    for f in files:
        (root / "train" / f.parent.name).mkdir(parents=True, exist_ok=True)
        for k in range(copies):
            shutil.copyfile(f, root / "train" / f.parent.name / f"{k}_{f.name}")
    return root


def _kill_when(
    args: list[str], first_shard_written: Callable[[], bool], log: Path, env: dict[str, str] | None = None
) -> None:
    """Run the held conversion, SIGKILL it once ``first_shard_written()``; its stderr goes to ``log``."""
    with log.open("w") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", BLOCKING_CHILD, str(BLOCK_AT), *args, "--no-progress", "--workers", "1"],
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 60
        while not first_shard_written():
            assert child.poll() is None, f"the conversion ended ({child.returncode}): {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"no shard of the new generation appeared: {log.read_text()[-2000:]}"
            time.sleep(0.05)  # polling the output: the shard file is the signal
        assert child.poll() is None
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    assert child.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_a_killed_local_overwrite_leaves_the_previoussplit_complete(tmp_path: Path, capsys) -> None:
    src = _kill_source(tmp_path / "src", copies=4)
    out = tmp_path / "mds"
    assert convert(capsys, src, out, "--shard-size", "128kb")[0] == 0
    old_samples, before = keys_and_labels(out), tree_hash(out)
    _kill_source(src, copies=6)  # 12 more images, same classes: the new split is told apart by its size
    _kill_when(
        [str(src), "--out", str(out), "--overwrite", "--shard-size", "128kb"],
        lambda: any(os.fsencode(p.relative_to(out)) not in before for p in out.glob("train/gen-*/shard.00000.mds")),
        tmp_path / "child.err",
    )
    after = tree_hash(out)
    assert {k: v for k, v in after.items() if k in before} == before  # the previous output, byte for byte
    killed = {k.split(b"/")[1] for k in after.keys() - before.keys()}
    assert len(killed) == 1 and all(k.startswith(b"train/" + next(iter(killed))) for k in after.keys() - before.keys())
    assert keys_and_labels(out) == old_samples and len(old_samples) == 24

    code, stdout, _ = convert(capsys, src, out, "--overwrite", "--shard-size", "128kb")
    assert code == 0 and "train: removed 1 unfinished generation(s)" in stdout
    assert not (out / "train" / os.fsdecode(next(iter(killed)))).exists()
    assert keys_and_labels(out) == source_samples(src / "train", wnids(out)) and len(keys_and_labels(out)) == 36
    assert len(list((out / "train").iterdir())) == 2  # index.json and the new generation: the old one is gone


def _objects(s3: MotoServer, bucket: str) -> dict[str, bytes]:
    c = s3.client()
    keys = [o["Key"] for o in c.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {k: hashlib.sha256(c.get_object(Bucket=bucket, Key=k)["Body"].read()).digest() for k in keys}


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_killed_s3_overwrite_leaves_the_previoussplit_complete(tmp_path: Path, capsys) -> None:
    src = _kill_source(tmp_path / "src", copies=4)
    with MotoServer().serving() as s3:
        s3.client().create_bucket(Bucket="kill-test")
        out = "s3://kill-test/mds"
        assert convert(capsys, src, out, "--shard-size", "128kb")[0] == 0
        old_samples, before = keys_and_labels(out, cache=tmp_path / "c0"), _objects(s3, "kill-test")
        old_shards = [k for k in before if k.endswith(".mds")]
        _kill_source(src, copies=6)

        def first_new_shard() -> bool:
            keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="kill-test").get("Contents", [])]
            return any(k.endswith("/shard.00000.mds") and k not in before for k in keys)

        _kill_when(
            [str(src), "--out", out, "--overwrite", "--shard-size", "128kb"],
            first_new_shard,
            tmp_path / "child.err",
            s3.env(),
        )
        after = _objects(s3, "kill-test")
        assert {k: v for k, v in after.items() if k in before} == before
        killed = {k.split("/")[2] for k in after.keys() - before.keys()}
        assert len(killed) == 1 and all(
            k.startswith(f"mds/train/{next(iter(killed))}/") for k in after.keys() - before.keys()
        )
        assert keys_and_labels(out, cache=tmp_path / "c1") == old_samples and len(old_samples) == 24

        code, stdout, _ = convert(capsys, src, out, "--overwrite", "--shard-size", "128kb")
        assert code == 0
        assert f"train: {out}/train/{next(iter(killed))}/ hold(s) shards of an unfinished conversion" in stdout
        assert "train: the previous split's" in stdout and "delete them once no run reads them" in stdout
        assert set(old_shards) <= set(_objects(s3, "kill-test"))  # left for runs that still read them
        new = keys_and_labels(out, cache=tmp_path / "c2")
        assert new == source_samples(src / "train", find_classes(src / "train")) and len(new) == 36
        # A training cache made before the overwrite: streaming would keep reading its index (the old
        # split); the recipe's loader brings the cached index up to date first.
        assert keys_and_labels(out, cache=tmp_path / "c1") == old_samples
        refresh_cached_index(out, str(tmp_path / "c1"), "train")
        assert keys_and_labels(out, cache=tmp_path / "c1") == new


# --- classes.json ---------------------------------------------------------------------------------------------


def test_classes_json_is_left_alone_when_every_split_is_kept(src: Path, done: Path, capsys) -> None:
    inode, before = (done / "classes.json").stat().st_ino, tree_hash(done)
    code, stdout, _ = convert(capsys, src, done)
    assert code == 0 and stdout.count("already complete") == 2
    assert (done / "classes.json").stat().st_ino == inode and tree_hash(done) == before


def test_kept_splits_with_other_classes_are_refused_and_overwrite_rewrites_them(src: Path, done: Path, capsys):
    extra = sample_files()[500]
    (src / "train" / "n00000000").mkdir()  # sorts first: every label moves
    shutil.copyfile(extra, src / "train" / "n00000000" / extra.name)
    before = tree_hash(done)
    code, _, err = convert(capsys, src, done)
    line = one_line_error(err)
    assert code == 2 and tree_hash(done) == before
    assert "lists 6 classes, the source has 7" in line and "label 0: 'n01440764' vs 'n00000000'" in line
    assert "--overwrite" in line

    assert convert(capsys, src, done, "--overwrite")[0] == 0
    classes = wnids(done)
    assert classes[0] == "n00000000" and len(classes) == 7
    assert keys_and_labels(done) == source_samples(src / "train", classes)
    assert keys_and_labels(done, "val") == source_samples(src / "val", classes)


def test_new_classes_publish_no_split_unless_all_are_converted(src: Path, done: Path, capsys) -> None:
    (src / "train" / "n00000000").mkdir()
    shutil.copyfile(sample_files()[500], src / "train" / "n00000000" / "x.JPEG")
    (src / "val" / "n01440764" / "broken.JPEG").write_bytes(b"not an image")
    before = tree_hash(done)
    code, _, err = convert(capsys, src, done, "--overwrite")
    assert code == 2 and "broken.JPEG" in one_line_error(err)
    assert tree_hash(done) == before  # train was converted, but not published: it would disagree with val


# --- the listing: what is no class, what cannot be converted ----------------------------------------------------


def _plant_not_classes(train: Path) -> None:
    for name in (".cache", ".ipynb_checkpoints", "lost+found"):
        (train / name).mkdir()
        shutil.copyfile(sample_files()[900], train / name / "x.JPEG")
    first = sorted(train.iterdir())[-1]
    (first / "._x.JPEG").write_bytes(b"macOS metadata, not an image")  # a hidden file: never read
    (first / ".ipynb_checkpoints").mkdir()
    shutil.copyfile(sample_files()[901], first / ".ipynb_checkpoints" / "y.JPEG")


def test_hidden_folders_and_lost_found_are_no_classes_in_the_converter(src: Path, tmp_path: Path, capsys, caplog):
    _plant_not_classes(src / "train")
    classes = sorted(p.name for p in (src / "train").iterdir() if not p.name.startswith(".") and p.name != "lost+found")
    out = tmp_path / "mds"
    with caplog.at_level(logging.WARNING, logger="usi_composer.data.layout"):
        assert convert(capsys, src, out)[0] == 0
    assert wnids(out) == classes and len(classes) == 6
    assert keys_and_labels(out) == source_samples(src / "train", classes)
    assert not any(".ipynb" in key or "._" in key for key, _ in keys_and_labels(out))
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage() and "train" in r.getMessage()]
    assert len(skipped) == 1 and "lost+found" in skipped[0] and ".cache" in skipped[0], skipped


def test_hidden_folders_and_lost_found_are_no_classes_in_the_folder_dataset(src: Path) -> None:
    _plant_not_classes(src / "train")
    dataset = ImageFolderBytes(str(src / "train"), lambda data, rng: data, seed=0)
    classes = sorted(p.name for p in (src / "train").iterdir() if not p.name.startswith(".") and p.name != "lost+found")
    assert dataset.classes == classes == find_classes(src / "train")
    assert {(os.path.relpath(p, src / "train"), y) for p, y in dataset.samples} == source_samples(
        src / "train", classes
    )


def test_val_takes_the_training_classes_in_the_folder_dataset(src: Path) -> None:
    train = folder_dataloader(str(src / "train"), lambda d, r: 0, 1, shuffle=False, drop_last=False, num_workers=0)
    classes = train.dataset.classes
    val = folder_dataloader(
        str(src / "val"), lambda d, r: 0, 1, shuffle=False, drop_last=False, num_workers=0, classes=classes
    )
    labels = {Path(p).parent.name: y for p, y in val.dataset.samples}
    assert labels == {c: classes.index(c) for c in sorted(p.name for p in (src / "val").iterdir())}
    assert sorted(labels.values()) == [0, 2, 4]  # not 0, 1, 2: val lacks half of the classes
    (src / "val" / "n99999999").mkdir()
    with pytest.raises(SetupError) as e:
        ImageFolderBytes(str(src / "val"), lambda d, r: 0, 0, classes=classes)
    assert "n99999999" in str(e.value) and "training split's 6 classes" in str(e.value) and "\n" not in str(e.value)


def test_the_builder_gives_val_the_training_classes(src: Path) -> None:
    from usi_composer.config import load_config
    from usi_composer.data.loaders import build_dataloaders
    from usi_composer.plan import resolve

    overrides = [f"data.train_dir={src / 'train'}", f"data.val_dir={src / 'val'}", "data.num_workers=0"]
    cfg = load_config(REPO / "yamls" / "usi.yaml", [*overrides, "trainer.global_batch_size=2", "trainer.device=cpu"])
    train, val = build_dataloaders(cfg, resolve(cfg))
    assert val is not None
    classes = train.dataloader.dataset.classes
    assert sorted(y for _, y in val.dataloader.dataset.samples) == [0, 2, 4] and len(classes) == 6


def _plant_non_utf8(train: Path) -> str:
    folder = os.fsencode(sorted(train.iterdir())[1])
    with open(os.path.join(folder, b"caf\xe9.JPEG"), "wb") as f:
        f.write(sample_files()[3].read_bytes())
    return os.fsdecode(folder) + "/caf\\xe9.JPEG"  # as printed: the byte that is not UTF-8 escaped


def _plant_loop(train: Path) -> str:
    link = sorted(train.iterdir())[3] / "loop"
    link.symlink_to(".", target_is_directory=True)  # the class folder inside itself
    return str(link)


def _pixels(path: Path) -> int:
    w, h = Image.open(path).size
    return w * h


def _plant_too_large(train: Path) -> str:
    """The image with the most pixels (run with --max-pixels just below its count)."""
    largest, second = sorted(train.glob("*/*.JPEG"), key=_pixels)[::-1][:2]
    assert _pixels(largest) > _pixels(second)
    return str(largest)


def _plant_undecodable(train: Path) -> str:
    path = sorted(train.iterdir())[4] / "broken.JPEG"
    path.write_bytes(b"\xff\xd8 not really a JPEG" * 4)
    return str(path)


@pytest.mark.parametrize(
    ("plant", "reason"),
    [
        (_plant_non_utf8, "file name is not UTF-8"),
        (_plant_loop, "symlink loop"),
        (_plant_too_large, "pixels, over --max-pixels"),
        (_plant_undecodable, "cannot identify image file"),
    ],
    ids=["non-utf8", "symlink-loop", "too-large", "undecodable"],
)
def test_a_bad_file_fails_naming_it_and_skip_corrupt_leaves_it_out(
    src: Path, done: Path, capsys, plant: Callable[[Path], str], reason: str
) -> None:
    bad = plant(src / "train")
    limit = ["--max-pixels", str(_pixels(Path(bad)) - 1)] if plant is _plant_too_large else []
    before_out, before_src = tree_hash(done), tree_hash(src)
    code, _, err = convert(capsys, src, done, "--overwrite", *limit)
    line = one_line_error(err)
    assert code == 2 and f"{bad} (" in line and reason in line and "1 file(s) in train cannot be converted" in line
    assert tree_hash(done) == before_out and tree_hash(src) == before_src

    code, _, err = convert(capsys, src, done, "--overwrite", "--skip-corrupt", *limit)
    assert code == 0 and f"train: skipped 1 file(s) that cannot be converted: {bad} (" in err
    expected = {
        (k, y)
        for k, y in source_samples(src / "train", wnids(done))
        if str(src / "train" / k) != bad and "\udce9" not in k  # glob keeps the byte that is not UTF-8 so
    }
    assert keys_and_labels(done) == expected and len(expected) == 6 - (plant is _plant_too_large)


def test_the_default_pixel_limit_is_pils(src: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    largest = Path(_plant_too_large(src / "train"))
    w, h = Image.open(largest).size
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", w * h - 1)  # PIL only warns below twice its threshold
    code, _, err = convert(capsys, src, tmp_path / "mds", "--splits", "train")
    assert code == 2 and f"{largest} ({w}x{h} = {w * h} pixels, over --max-pixels {w * h - 1})" in one_line_error(err)


@pytest.mark.parametrize(
    ("plant", "reason"),
    [(_plant_non_utf8, "not UTF-8"), (_plant_loop, "symlink loop")],
    ids=["non-utf8", "symlink-loop"],
)
def test_a_bad_name_or_a_loop_fails_the_folder_dataset_at_construction(src: Path, plant, reason: str) -> None:
    bad = plant(src / "train")
    with pytest.raises(SetupError) as e:
        ImageFolderBytes(str(src / "train"), lambda d, r: d, seed=0)
    message = str(e.value)
    assert "\n" not in message and f"{bad} (" in message and reason in message


def test_the_listing_keeps_torchvisions_order_and_labels(src: Path) -> None:
    from torchvision.datasets import ImageFolder

    nested = sorted((src / "train").iterdir())[0] / "deeper" / "more"
    nested.mkdir(parents=True)
    shutil.copyfile(sample_files()[42], nested / "z.JPEG")
    shutil.copyfile(sample_files()[43], nested.parent / "a.png")
    reference = ImageFolder(str(src / "train"))
    listing = list_images(src / "train")
    assert listing.classes == reference.classes and listing.samples == reference.samples and not listing.problems
