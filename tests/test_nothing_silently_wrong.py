"""Faults a user's slip or a storage fault would plant, each answered by one line and the right exit code,
with nothing lost and nothing labelled wrong: the converter writing through a link into the source, a
folder link that would list other classes' images under the wrong label, a pre-signed URL's secrets in
a message without its scheme, and the exit code of every console script for a missing data folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from helpers import (
    CHECKPOINTED,
    DEMO_YAML,
    REPO,
    convert,
    keys_and_labels,
    make_imagenet,
    one_error_line,
    tiny_run,
    tree_hash,
)
from usi_composer.data.folder import ImageFolderBytes
from usi_composer.data.layout import list_images
from usi_composer.errors import SetupError
from usi_composer.models import load_weights
from usi_composer.redaction import REDACTED, redact_text
from usi_composer.storage import StorageUnreachableError

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def src(tmp_path: Path) -> Path:
    """An ImageNet folder of 4 classes x 4 real JPEGs (n01440764, n01443537, ...)."""
    return make_imagenet(tmp_path / "src", n_classes=4, per_class=4)


def real_images(train: Path) -> set[tuple[str, int]]:
    """``(key, label)`` of every real image file, labelled by the class folder it lies in."""
    classes = sorted(p.name for p in train.iterdir() if not p.is_symlink())
    images = (p for p in train.glob("*/*.JPEG") if not p.is_symlink() and not p.parent.is_symlink())
    return {(str(p.relative_to(train)), classes.index(p.parent.name)) for p in images}


# --- the converter writes only inside OUT ----------------------------------------------------------------------


@pytest.mark.parametrize("written", ["train", "classes.json"])
def test_an_output_path_linked_into_a_source_split_is_refused_and_the_source_is_unchanged(
    src: Path, tmp_path: Path, capsys, written: str
) -> None:
    """``OUT`` a real folder, ``OUT/train`` (or ``OUT/classes.json``) a link into the source's train/: the
    converter wrote gen-*/ and index.json into the source, and the next conversion shifted every label."""
    out = tmp_path / "mds"
    out.mkdir()
    target = src / "train" if written == "train" else src / "train" / "classes.json"
    (out / written).symlink_to(target)
    before = tree_hash(tmp_path)
    code, stdout, err = convert(capsys, src, out)
    line = one_error_line(err)
    assert code == 2 and not stdout, stdout
    assert line == (
        f"error: the output {out / written} (a link to {target}) {'is' if written == 'train' else 'lies inside'} "
        f"the source split {src / 'train'}: choose an output outside the source's splits"
    )
    assert tree_hash(tmp_path) == before  # the source hashed before and after: not a byte written


def test_new_classes_with_overwrite_of_some_splits_name_the_splits_to_add(src: Path, tmp_path: Path, capsys) -> None:
    """``--overwrite --splits train`` with new classes keeps val's old labels: the hint said "pass
    --overwrite", which was passed."""
    val = src / "val" / "n01440764"
    val.mkdir(parents=True)
    shutil.copyfile(next((src / "train" / "n01440764").glob("*.JPEG")), val / "v.JPEG")
    out = tmp_path / "mds"
    assert convert(capsys, src, out)[0] == 0
    (src / "train" / "n00000000").mkdir()  # sorts first: every label moves
    shutil.copyfile(next((src / "train" / "n01440764").glob("*.JPEG")), src / "train" / "n00000000" / "x.JPEG")
    before = tree_hash(out)
    code, _, err = convert(capsys, src, out, "--overwrite", "--splits", "train")
    line = one_error_line(err)
    assert code == 2 and tree_hash(out) == before
    assert line.endswith(
        "the complete split(s) val would keep the old labels: add them to --splits (--overwrite --splits train val)"
    )
    assert convert(capsys, src, out, "--overwrite", "--splits", "train", "val")[0] == 0
    assert keys_and_labels(out, "val") == {("n01440764/v.JPEG", 1)}


# --- a file is labelled by the class folder it lies in ------------------------------------------------------------


def test_a_folder_link_out_of_its_class_is_listed_and_not_walked(src: Path, tmp_path: Path, capsys) -> None:
    """``train/n01443537/loop -> ..``: the other classes' images were written a second time under
    n01443537's label, and only the branch back to the class itself was reported as a loop."""
    train = src / "train"
    link = train / "n01443537" / "loop"
    link.symlink_to("..", target_is_directory=True)
    real = real_images(train)
    assert len(real) == 16
    out = tmp_path / "mds"

    code, _, err = convert(capsys, src, out)
    line = one_error_line(err)
    assert code == 2 and f"{link} (a folder link leading out of its class folder, to {train}: not followed)" in line
    assert not (out / "train" / "index.json").exists()

    code, _, err = convert(capsys, src, out, "--skip-corrupt")
    assert code == 0 and f"train: skipped 1 file(s) that cannot be converted: {link} (a folder link" in err
    converted = keys_and_labels(out)
    assert len(converted) == len(real) == 16 and converted == real  # each label the one of its folder

    listing = list_images(train)
    assert {(os.path.relpath(p, train), y) for p, y in listing.samples} == real and len(listing.samples) == 16
    with pytest.raises(SetupError, match="a folder link leading out of its class folder") as e:
        ImageFolderBytes(str(train), lambda data, rng: data, seed=0)
    assert str(link) in str(e.value) and "\n" not in str(e.value)


def test_links_that_stay_in_their_class_are_followed_and_links_into_another_class_are_not(src: Path) -> None:
    train = src / "train"
    classes = sorted(p.name for p in train.iterdir())
    inside = train / classes[0] / "more"
    inside.mkdir()
    shutil.copyfile(next((train / classes[0]).glob("*.JPEG")), inside / "deep.JPEG")
    (train / classes[0] / "alias").symlink_to("more", target_is_directory=True)  # inside its class: walked
    other_image = next((train / classes[2]).glob("*.JPEG"))
    (train / classes[1] / "borrowed.JPEG").symlink_to(other_image)  # an image of another class
    (train / "n99999999").symlink_to(classes[3], target_is_directory=True)  # a class folder aliasing another

    listing = list_images(train)
    labels = {os.path.relpath(p, train): y for p, y in listing.samples}
    assert labels[f"{classes[0]}/alias/deep.JPEG"] == labels[f"{classes[0]}/more/deep.JPEG"] == 0
    assert f"{classes[1]}/borrowed.JPEG" not in labels and not any(k.startswith("n99999999/") for k in labels)
    assert all(y == classes.index(k.split("/")[0]) for k, y in labels.items())
    problems = dict(listing.problems)
    assert problems[str(train / classes[1] / "borrowed.JPEG")].endswith(f"an image of class {classes[2]}: not listed")
    assert problems[str(train / "n99999999")] == f"a link into class folder {classes[3]}: not listed"


# --- secrets in a URL printed without its scheme -----------------------------------------------------------------

SIGNATURE, CREDENTIAL = "c2lnbmF0dXJlIHZhbHVl0123", "AKIAEXAMPLE%2F20240101"
QUERY = f"X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={CREDENTIAL}&X-Amz-Signature={SIGNATURE}"


def test_a_query_string_without_its_scheme_is_redacted() -> None:
    urllib3 = (
        "HTTPSConnectionPool(host='bucket.s3.amazonaws.com', port=443): Max retries exceeded with url: "
        f"/teacher.pt?{QUERY}&X-Amz-Security-Token=FwoGZXIvYXdzEJr (Caused by NewConnectionError(...))"
    )
    out = redact_text(urllib3)
    assert SIGNATURE not in out and CREDENTIAL not in out and "FwoGZXIvYXdzEJr" not in out
    assert f"/teacher.pt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={REDACTED}&" in out
    assert (
        redact_text(f"bucket/teacher.pt?sv=2024&sig={SIGNATURE}&se=x")
        == f"bucket/teacher.pt?sv=2024&sig={REDACTED}&se=x"
    )
    assert redact_text("see ?page=2&sort=name") == "see ?page=2&sort=name"  # nothing secret: as it was


def test_a_failed_checkpoint_download_is_one_line_without_the_secrets(digits: Path, capsys) -> None:
    """``teacher.checkpoint=https://...?X-Amz-Signature=...`` that cannot be reached: a traceback printed the
    signature and the credential twice. Now one line, exit 1 (the network: a retry may succeed)."""
    from usi_composer.cli import train as train_cli

    url = f"https://127.0.0.1:1/teacher.pt?{QUERY}"  # nothing listens on port 1: refused at once
    with pytest.raises(StorageUnreachableError) as e:
        load_weights(torch.nn.Linear(1, 1), url)
    assert "ConnectionError" in str(e.value) and e.value.__cause__ is None and e.value.__suppress_context__
    teacher = ["algorithms.distillation.enabled=true", "teacher.name=test_resnet", f"teacher.checkpoint={url}"]
    assert train_cli.main([str(DEMO_YAML), *tiny_run(digits, *teacher, **CHECKPOINTED)]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot download https://127.0.0.1:1/teacher.pt?{REDACTED}: ConnectionError")
    assert SIGNATURE not in line and CREDENTIAL not in line and "X-Amz-Signature=<redacted>" in line


# --- exit codes: 2 where a retry cannot help -------------------------------------------------------------------


USI_YAML = str(REPO / "yamls" / "usi.yaml")


def _sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "name": "missing-data",
                "method": "grid",
                "metric": {"name": "metrics/eval/top1", "goal": "maximize"},
                "parameters": {"algorithms.distillation.temperature": {"values": [1.0]}},
                "command": ["composer", "train.py", "yamls/usi.yaml", "${args_no_hyphens}"],
            }
        )
    )
    return sweep


def _fake_teacher(monkeypatch: pytest.MonkeyPatch, digits: Path, weights: Path) -> None:
    """usi-demo's teacher, as if trained: its student runs are the ones that meet the missing folder."""
    import usi_composer.demo

    monkeypatch.setattr(usi_composer.demo, "prepare_teacher", lambda *args, **kwargs: (digits, weights, 0.5))


SCRIPTS = ["usi-train", "usi-demo", "usi-convert-imagenet", "usi-ablate", "usi-benchmark-backbones", "usi-export"]
SCRIPTS += ["usi-eval", "usi-cache-teacher"]


def test_the_scripts_are_every_console_script() -> None:
    import tomllib

    assert sorted(SCRIPTS) == sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_console_script_exits_2_for_a_missing_data_folder(
    script: str, digits: Path, saved_teacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """A run that can never succeed must not be requeued (launch/slurm.sbatch requeues exit 1)."""
    from importlib.metadata import entry_points

    missing = tmp_path / "missing"
    data = ["data.local=null", f"data.train_dir={missing / 'train'}", f"data.val_dir={missing / 'val'}"]
    args = {
        "usi-train": [str(DEMO_YAML), *data],
        "usi-demo": ["--workdir", str(tmp_path / "demo"), *data],
        "usi-convert-imagenet": [str(missing), "--out", str(tmp_path / "mds"), "--no-progress"],
        "usi-ablate": [str(_sweep(tmp_path)), "--base", USI_YAML, "--out", str(tmp_path), *data, "--no-teacher-cache"],
        "usi-benchmark-backbones": ["--wandb-dir", str(missing), "--out", str(tmp_path / "pareto")],
        "usi-export": [str(DEMO_YAML), "--checkpoint", str(missing / "run"), "--out", str(tmp_path / "export")],
        "usi-eval": [str(DEMO_YAML), *data, "--checkpoint", str(saved_teacher("resnet10t", 10))],
        "usi-cache-teacher": [str(DEMO_YAML), *data, "--out", str(tmp_path / "cache")],
    }[script]
    if script == "usi-demo":
        _fake_teacher(monkeypatch, digits, saved_teacher("resnet10t", 10))
    (main,) = [e.load() for e in entry_points(group="console_scripts") if e.name == script]
    assert main(args) == 2
    out, err = capsys.readouterr()
    if script == "usi-ablate":  # its point's own error line is in the point's row: "exit code 2: error: ..."
        assert "1 of 1 points failed (fix what the logs name, then rerun)" in err
        assert f"FAILED (exit code 2: error: data.train_dir: no such folder: {missing / 'train'}" in out, out[-2000:]
    else:
        assert one_error_line(err).startswith("error: ") and str(missing) in err


def test_the_exit_code_says_whether_a_retry_can_help(capsys) -> None:
    import requests

    from usi_composer import storage
    from usi_composer.cli._common import fail
    from usi_composer.config import ConfigError
    from usi_composer.data.mds import CorruptShardError, LabelError, StreamingDataError
    from usi_composer.errors import CheckpointError, LostPeerError

    no_answer = storage.failure("read", "s3://b/k", requests.ConnectionError("Max retries exceeded"))
    refused = storage.failure("read", "s3://b/k", PermissionError("An error occurred (403): Forbidden"))
    retry = [LostPeerError("rank 1 is gone"), no_answer, StreamingDataError("cannot read shard 3")]
    final = [ConfigError("model.name", "unknown"), SetupError("no folder at x"), CheckpointError("x does not fit")]
    final += [refused, CorruptShardError("hash validation failed"), LabelError("label 7")]
    assert [fail(e) for e in retry] == [1] * len(retry) and [fail(e) for e in final] == [2] * len(final)
    # a loader worker's error comes back as type(e)(text): the class alone carries the answer
    assert fail(type(LabelError("x"))("Traceback ...\nLabelError: label 7")) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == len(retry) + len(final) + 1
