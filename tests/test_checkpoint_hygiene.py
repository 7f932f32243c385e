"""Checkpoint hygiene: writes are atomic, a checkpoint cut short never blocks autoresume (it is set
aside, never deleted), a remote save_folder keeps one local copy, and an autoresume whose config
changes the training math stops with one line unless the change is accepted."""

from __future__ import annotations

import errno
import io
import logging
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import composer.utils.checkpoint as composer_checkpoint
import pytest
import torch
from composer.core import State

from helpers import CHECKPOINTED, DEMO, one_error_line, tiny_run
from usi_composer import checkpoints
from usi_composer.builders import build_trainer
from usi_composer.checkpoints import first_math_change, is_complete
from usi_composer.cli.train import main
from usi_composer.config import config_to_dict, load_config
from usi_composer.patches import trainer as composer_patches
from usi_composer.plan import resolve
from usi_composer.training import train


def resumable(digits: Path, folder: Path, *extra: str) -> list[str]:
    return tiny_run(digits, f"trainer.save_folder={folder}", "trainer.autoresume=true", *extra, **CHECKPOINTED)


@pytest.fixture(scope="module")
def three_batches(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An autoresume run's folder after 3 batches: ep0-ba{1,2,3}-rank0.pt, latest-rank0.pt -> ba3."""
    folder = tmp_path_factory.mktemp("three") / "run"
    train(load_config(DEMO, resumable(digits, folder, "trainer.max_duration=3ba"))).close()
    assert os.readlink(folder / "latest-rank0.pt") == "ep0-ba3-rank0.pt"
    return folder


@pytest.fixture
def run_folder(three_batches: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(three_batches, copy, symlinks=True)
    return copy


def cut_in_half(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # what a full disk or a killed writer leaves
    return data[: len(data) // 2]


# --------------------------------------------------------------------------- atomic writes


@pytest.fixture
def full_disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """torch.save writes half of its bytes, then fails as on a full disk."""
    save = torch.save

    def save_half(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_half)
    yield


def test_a_failed_write_leaves_the_previous_file_and_no_partial_one(tmp_path: Path, full_disk: None) -> None:
    composer_patches.apply_patches()
    previous = tmp_path / "ep0-ba1-rank0.pt"
    previous.write_bytes(b"the previous checkpoint")
    with pytest.raises(OSError, match="No space left"):
        composer_checkpoint._write_checkpoint_file({"w": torch.zeros(1000)}, str(previous))
    with pytest.raises(OSError, match="No space left"):
        composer_checkpoint._write_checkpoint_file({"w": torch.zeros(1000)}, str(tmp_path / "ep0-ba2-rank0.pt"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ep0-ba1-rank0.pt"]
    assert previous.read_bytes() == b"the previous checkpoint"

    # Composer's own writer leaves the half-written file under the checkpoint's name
    with pytest.raises(OSError, match="No space left"):
        composer_patches._ORIGINALS["_write_checkpoint_file"](
            {"w": torch.zeros(1000)}, str(tmp_path / "ep0-ba3-rank0.pt")
        )
    assert (tmp_path / "ep0-ba3-rank0.pt").exists() and not is_complete(tmp_path / "ep0-ba3-rank0.pt")


# --------------------------------------------------------------------------- partial checkpoints set aside


def flip_inside_a_tensor(path: Path) -> str:
    """Flip 16 bytes in the middle of the checkpoint's largest tensor (the file stays a whole zip of the same
    size: only the CRCs tell); return that member's name."""
    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    local = member.header_offset
    start = local + 30 + int.from_bytes(data[local + 26 : local + 28], "little")
    start += int.from_bytes(data[local + 28 : local + 30], "little") + member.file_size // 2
    data[start : start + 16] = bytes(b ^ 0xFF for b in data[start : start + 16])
    path.write_bytes(bytes(data))
    return member.filename


def test_a_checkpoint_whose_bytes_changed_is_set_aside_and_the_run_resumes_from_the_one_before(
    digits: Path, run_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    newest = run_folder / "ep0-ba3-rank0.pt"
    member = flip_inside_a_tensor(newest)
    assert zipfile.ZipFile(newest).namelist(), "still a readable zip: only its CRCs can tell"
    run = resumable(digits, run_folder, "trainer.max_duration=4ba", "trainer.autoresume_accept=[trainer.max_duration]")
    with caplog.at_level(logging.WARNING, logger="usi_composer.checkpoints"):
        trainer = build_trainer(load_config(DEMO, run))
    assert int(trainer.state.timestamp.batch) == 2, "resumed from the checkpoint before the changed one"
    (aside,) = run_folder.glob("ep0-ba3-rank0.pt.partial-*")
    assert caplog.messages[0] == (
        f"autoresume: {newest}: its bytes changed after it was written ({member} fails its CRC-32); "
        f"set aside as {aside}"
    )
    trainer.close()


def test_a_load_path_whose_bytes_changed_is_refused_in_one_line(
    digits: Path, three_batches: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changed = tmp_path / "ep0-ba3-rank0.pt"
    shutil.copy(three_batches / "ep0-ba3-rank0.pt", changed)
    flip_inside_a_tensor(changed)
    assert main([DEMO, *tiny_run(digits, f"trainer.load_path={changed}", **CHECKPOINTED), "--dry-run"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: trainer.load_path: {changed}: its bytes changed after it was written ("), line


def test_a_cut_plain_file_latest_is_set_aside_without_a_contradiction(
    digits: Path, run_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ``latest-rank0.pt`` that is a file (a copy from a bucket), cut short: set aside like the others; the
    run resumes from the newest complete checkpoint, and says nothing about starting from scratch."""
    latest = run_folder / "latest-rank0.pt"
    target = run_folder / os.readlink(latest)
    latest.unlink()
    latest.write_bytes(target.read_bytes()[:1000])
    run = resumable(digits, run_folder, "trainer.max_duration=4ba", "trainer.autoresume_accept=[trainer.max_duration]")
    with caplog.at_level(logging.WARNING, logger="usi_composer.checkpoints"):
        trainer = build_trainer(load_config(DEMO, run))
    assert int(trainer.state.timestamp.batch) == 3
    assert not any("from scratch" in message for message in caplog.messages), caplog.messages
    assert caplog.messages[0].startswith(f"autoresume: {latest}: not a complete checkpoint (a write cut short)")
    trainer.close()


def test_a_truncated_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    digits: Path, run_folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    half = cut_in_half(run_folder / "ep0-ba3-rank0.pt")  # latest-rank0.pt still names it
    run = resumable(digits, run_folder, "trainer.max_duration=4ba", "trainer.autoresume_accept=[trainer.max_duration]")
    with caplog.at_level(logging.WARNING, logger="usi_composer.checkpoints"):
        trainer = build_trainer(load_config(DEMO, run))
    assert int(trainer.state.timestamp.batch) == 2, "resumed from the checkpoint before the cut one"
    (aside,) = run_folder.glob("ep0-ba3-rank0.pt.partial-*")
    assert aside.read_bytes() == half, "set aside, not deleted"
    assert caplog.messages == [
        f"autoresume: {run_folder / 'ep0-ba3-rank0.pt'}: not a complete checkpoint (a write cut short); "
        f"set aside as {aside}",
        f"autoresume: {run_folder / 'latest-rank0.pt'} now points at ep0-ba2-rank0.pt, the newest complete checkpoint",
    ]
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 4
    assert is_complete(run_folder / "ep0-ba3-rank0.pt") and is_complete(run_folder / "ep0-ba4-rank0.pt")
    trainer.close()


def test_without_the_set_aside_composer_refuses_to_resume(
    digits: Path, run_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What the set-aside prevents, as a failed write leaves it: the cut file, latest still at the one
    # before. Composer resumes from latest, then its CheckpointSaver.fit_start refuses to start while
    # a file named like a later checkpoint exists.
    cut_in_half(run_folder / "ep0-ba3-rank0.pt")
    (run_folder / "latest-rank0.pt").unlink()
    (run_folder / "latest-rank0.pt").symlink_to("ep0-ba2-rank0.pt")
    monkeypatch.setattr(checkpoints, "set_aside_partial_checkpoints", lambda folder: None)
    run = resumable(digits, run_folder, "trainer.max_duration=4ba", "trainer.autoresume_accept=[trainer.max_duration]")
    trainer = build_trainer(load_config(DEMO, run))
    with pytest.raises(FileExistsError, match=r"ep0-ba3-rank0\.pt may conflict with a future checkpoint"):
        trainer.fit()
    trainer.close()


def test_a_complete_checkpoint_newer_than_latest_is_resumed(digits: Path, run_folder: Path) -> None:
    # killed between the checkpoint's os.replace and Composer's update of the link
    (run_folder / "latest-rank0.pt").unlink()
    (run_folder / "latest-rank0.pt").symlink_to("ep0-ba1-rank0.pt")
    run = resumable(digits, run_folder, "trainer.max_duration=3ba")
    trainer = build_trainer(load_config(DEMO, run))
    assert int(trainer.state.timestamp.batch) == 3
    assert os.readlink(run_folder / "latest-rank0.pt") == "ep0-ba3-rank0.pt"
    trainer.close()


def test_nothing_complete_starts_from_scratch(digits: Path, run_folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    for batch in (1, 2, 3):
        cut_in_half(run_folder / f"ep0-ba{batch}-rank0.pt")
    with caplog.at_level(logging.WARNING, logger="usi_composer.checkpoints"):
        trainer = build_trainer(load_config(DEMO, resumable(digits, run_folder, "trainer.max_duration=3ba")))
    assert int(trainer.state.timestamp.batch) == 0
    assert len(list(run_folder.glob("ep0-ba*-rank0.pt.partial-*"))) == 3
    assert caplog.messages[-1] == f"autoresume: no complete checkpoint in {run_folder}: starting from scratch"
    trainer.close()


# --------------------------------------------------------------------------- local copies of a remote folder


def test_local_checkpoints_kept_default_to_one_for_a_remote_folder() -> None:
    def kept(*overrides: str) -> int:
        return resolve(load_config(DEMO, list(overrides))).checkpoints_to_keep

    assert kept() == -1 and kept("trainer.save_folder=/ckpt/run") == -1
    assert kept("trainer.save_folder=s3://bucket/run") == 1 and kept("trainer.save_folder=gs://bucket/run") == 1
    assert kept("trainer.save_folder=s3://bucket/run", "trainer.save_num_checkpoints_to_keep=-1") == -1
    assert kept("trainer.save_num_checkpoints_to_keep=3") == 3


@pytest.mark.slow
def test_a_remote_folder_keeps_one_local_copy_and_autoresumes_from_the_bucket(
    digits: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from composer.callbacks import CheckpointSaver

    from helpers import REPO, MotoServer

    init = CheckpointSaver.__init__

    def polling_faster(self, *args, **kwargs):  # Composer's knob for tests: the wait between upload checks
        init(self, *args, **kwargs)
        self._symlink_upload_wait_before_next_try_in_seconds = 0.2

    monkeypatch.setattr(CheckpointSaver, "__init__", polling_faster)
    monkeypatch.chdir(tmp_path)  # where Composer alone would leave its copy of the bucket's latest

    def run(batches: int, accept: str = "[]") -> list[str]:
        more = [f"trainer.max_duration={batches}ba", f"trainer.autoresume_accept={accept}"]
        return resumable(digits, "s3://ckpt/run", *more)  # type: ignore[arg-type]

    with MotoServer().serving() as s3:
        s3.client().create_bucket(Bucket="ckpt")
        trainer = train(load_config(REPO / DEMO, run(3)))
        saver = trainer._checkpoint_saver
        assert saver.num_checkpoints_to_keep == 1
        local = sorted(p.name for p in Path(saver.folder).iterdir() if p.suffix == ".pt")
        assert local == ["ep0-ba3-rank0.pt", "latest-rank0.pt"], local
        trainer.close()
        keys = {o["Key"] for o in s3.client().list_objects_v2(Bucket="ckpt")["Contents"]}
        assert {f"run/ep0-ba{b}-rank0.pt" for b in (1, 2, 3)} <= keys

        for batches in (4, 5):  # twice: each resume starts from the bucket's latest, not an older copy
            resumed = build_trainer(load_config(REPO / DEMO, run(batches, "[trainer.max_duration]")))
            assert int(resumed.state.timestamp.batch) == batches - 1
            resumed.fit()
            resumed.close()
    assert list(tmp_path.iterdir()) == [], "nothing written to the working directory"


# --------------------------------------------------------------------------- autoresume with another config


@pytest.fixture(scope="module")
def finished(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("finished") / "run"
    train(load_config(DEMO, resumable(digits, folder))).close()
    return folder


def test_autoresume_stops_at_a_change_to_the_training_math(
    digits: Path, finished: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded: list[str] = []
    load_model_state = State.load_model_state

    def recording(self, *args, **kwargs):
        loaded.append("model")
        return load_model_state(self, *args, **kwargs)

    monkeypatch.setattr(State, "load_model_state", recording)
    assert main([DEMO, *resumable(digits, finished, "optimizer.lr=0.004", "trainer.seed=1")]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "error: trainer.autoresume: optimizer.lr is 0.004, the checkpoint was trained with 0.002 (a change to the "
        "training math); to continue with it anyway, add trainer.autoresume_accept=[optimizer.lr]"
    )
    assert loaded == [], "stopped before any weight was loaded"

    accepted = "trainer.autoresume_accept=[optimizer.lr]"
    assert main([DEMO, *resumable(digits, finished, "optimizer.lr=0.004", "trainer.seed=1", accepted)]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(
        "error: trainer.autoresume: trainer.seed is 1, the checkpoint was trained with 0 (a change to the training "
        "math); to continue with it anyway, add trainer.autoresume_accept=[optimizer.lr,trainer.seed]"
    )


def test_an_accepted_change_resumes(digits: Path, finished: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(finished, folder, symlinks=True)
    run = resumable(digits, folder, "optimizer.lr=0.004", "trainer.max_duration=3ba")
    trainer = build_trainer(load_config(DEMO, [*run, "trainer.autoresume_accept=[optimizer.lr,trainer.max_duration]"]))
    assert int(trainer.state.timestamp.batch) == 2
    trainer.close()


def test_a_change_that_is_not_training_math_resumes_silently(
    digits: Path, finished: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = resumable(digits, finished, "trainer.eval_interval=5ba", "trainer.progress_bar=true", "data.pin_memory=false")
    with caplog.at_level(logging.WARNING, logger="usi_composer"):
        trainer = build_trainer(load_config(DEMO, run))
    assert int(trainer.state.timestamp.batch) == 2
    assert caplog.messages == []
    trainer.close()


def test_which_keys_are_training_math() -> None:
    base = config_to_dict(load_config(DEMO, ["data.remote=s3://b/digits", "data.local=/cache/a"]))

    def change(*overrides: str, accept: tuple[str, ...] = ()) -> str | None:
        new = config_to_dict(load_config(DEMO, ["data.remote=s3://b/digits", "data.local=/cache/a", *overrides]))
        found = first_math_change(base, new, accept)
        return found and found[0]

    assert change("data.local=/cache/b", "data.num_workers=4", "trainer.compile=false", "loggers.wandb={}") is None
    assert change("algorithms.distillation.log_interval=5", "algorithms.ema.best_of_raw=false") is None
    assert change("model.kwargs.drop_rate=0.1") == "model.kwargs.drop_rate"
    assert change("data.remote=s3://b/other") == "data.remote"
    assert change("algorithms.ema.decay=0.9") == "algorithms.ema.decay"
    assert change("trainer.global_batch_size=16", "trainer.microbatch_size=2", accept=("trainer",)) is None
    assert change("data.scale=[0.5,1.0]", accept=("data.scale",)) is None
    # a checkpoint written before data.streaming.fast_decode existed: it trained as its default (true) does
    streaming = {k: v for k, v in base["data"]["streaming"].items() if k != "fast_decode"}
    older = {**base, "data": {**base["data"], "streaming": streaming}}
    assert first_math_change(older, base) is None
    faster = config_to_dict(load_config(DEMO, ["data.remote=s3://b/digits", "data.streaming.fast_decode=false"]))
    assert first_math_change(older, faster) == ("data.streaming.fast_decode", True, False)
