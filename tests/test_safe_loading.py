"""Checkpoints load as data: a file that would run code when unpickled is refused (model.checkpoint,
teacher.checkpoint, Composer's resume) unless its trust key is set; safetensors, timm and Composer
checkpoints load; http:// is refused; the overrides of Composer's private functions are guarded."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import composer.utils.checkpoint as composer_checkpoint
import pytest
import timm
import torch
from safetensors.torch import save_file

from helpers import CHECKPOINTED, DEMO, SYSTEM, one_error_line, tiny_run, with_code
from usi_composer import patches
from usi_composer.builders import build_model, build_trainer
from usi_composer.cli.train import main
from usi_composer.config import ConfigError, load_config
from usi_composer.errors import CheckpointError, SetupError, UnsafeCheckpointError
from usi_composer.models import load_weights, save_weights
from usi_composer.patches import trainer as composer_patches
from usi_composer.training import train


def weights(num_classes: int = 10, seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=num_classes).state_dict()


def assert_weights(module: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = module.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.fixture(scope="module")
def composer_run(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 2-batch run of the recipe, a Composer checkpoint after each batch."""
    folder = tmp_path_factory.mktemp("composer-run")
    train(load_config(DEMO, tiny_run(digits, f"trainer.save_folder={folder}", **CHECKPOINTED))).close()
    return folder


# --------------------------------------------------------------------------- refused unless trusted


def test_model_checkpoint_that_runs_code_is_refused_unless_trusted(
    digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    path = with_code({"state_dict": weights()}, tmp_path / "student.pt", marker)
    assert main([DEMO, *tiny_run(digits, f"model.checkpoint={path}", **CHECKPOINTED)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: model.checkpoint: {path}: refusing to unpickle '{SYSTEM}' (a checkpoint can run code when it is "
        "loaded); if you trust this file, set model.trust_checkpoint=true"
    )
    assert not marker.exists()

    model = build_model(
        load_config(DEMO, tiny_run(digits, f"model.checkpoint={path}", "model.trust_checkpoint=true", **CHECKPOINTED))
    )
    assert marker.exists(), "trusted: unpickled in full, the file's code ran"
    assert_weights(model.module, weights())


def test_teacher_checkpoint_that_runs_code_is_refused_unless_trusted(
    digits: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    path = with_code({"state_dict": weights()}, tmp_path / "teacher.pt", marker)
    teacher = ["algorithms.distillation.enabled=true", "teacher.name=test_resnet", f"teacher.checkpoint={path}"]
    assert main([DEMO, *tiny_run(digits, *teacher, **CHECKPOINTED)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: teacher.checkpoint: {path}: refusing to unpickle '{SYSTEM}' (a checkpoint can run code when it is "
        "loaded); if you trust this file, set teacher.trust_checkpoint=true"
    )
    assert not marker.exists()

    assert main([DEMO, *tiny_run(digits, *teacher, "teacher.trust_checkpoint=true", **CHECKPOINTED)]) == 0
    assert marker.exists()


def test_composer_resume_that_runs_code_is_refused_unless_trusted(
    digits: Path, composer_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    ours = torch.load(composer_run / "ep0-ba1-rank0.pt", weights_only=False)  # our own file
    path = with_code(ours, tmp_path / "ep0-ba1-rank0.pt", marker)
    run = tiny_run(digits, f"trainer.load_path={path}", f"trainer.save_folder={tmp_path / 'out'}", **CHECKPOINTED)
    assert main([DEMO, *run]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: trainer.load_path: {path}: refusing to unpickle '{SYSTEM}' (a checkpoint can run code when it is "
        "loaded); if you trust this file, set trainer.trust_checkpoints=true"
    )
    assert not marker.exists()

    trainer = build_trainer(load_config(DEMO, [*run, "trainer.trust_checkpoints=true"]))
    assert marker.exists() and int(trainer.state.timestamp.batch) == 1, "resumed after batch 1"
    trainer.close()


def test_composer_evaluates_algorithm_reprs_so_they_are_checked(
    digits: Path, composer_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Composer re-creates required_on_load algorithms with eval() of the repr the checkpoint holds:
    # with torch.load(weights_only=True) alone, this file would still run its code.
    marker = tmp_path / "ran"
    checkpoint = torch.load(composer_run / "ep0-ba1-rank0.pt", weights_only=False)
    code = f"BlurPool(replace_convs=__import__('os').system('touch {marker}') == 0)"
    checkpoint["state"]["algorithms"].append(("BlurPool", {"repr": code}))
    path = tmp_path / "ep0-ba1-rank0.pt"
    torch.save(checkpoint, path)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) != [], "numpy RNG state, allow-listed"

    run = tiny_run(digits, f"trainer.load_path={path}", f"trainer.save_folder={tmp_path / 'out'}", **CHECKPOINTED)
    assert main([DEMO, *run]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"error: trainer.load_path: {path}: refusing to evaluate its BlurPool repr "), line
    assert line.endswith("; if you trust this file, set trainer.trust_checkpoints=true"), line
    assert not marker.exists()

    # Then BlurPool's surgery renames the convs the optimizer state names: torch 2.7 raises KeyError,
    # newer torch (2.14) a RuntimeError for the missing optimizer state. Either way the repr ran.
    with pytest.raises((KeyError, RuntimeError)):
        build_trainer(load_config(DEMO, [*run, "trainer.trust_checkpoints=true"])).close()
    assert marker.exists(), "Composer ran the repr"


def test_refusal_names_the_first_global_torch_stopped_at(tmp_path: Path) -> None:
    path = with_code(weights(), tmp_path / "t.pt", tmp_path / "ran")
    with pytest.raises(UnsafeCheckpointError) as error:
        load_weights(timm.create_model("test_resnet", num_classes=10), str(path))
    assert str(error.value) == f"{path}: refusing to unpickle '{SYSTEM}' (a checkpoint can run code when it is loaded)"
    assert not (tmp_path / "ran").exists()


# --------------------------------------------------------------------------- formats that load as data


def test_safetensors_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "model.safetensors"
    save_file(weights(seed=3), str(path))
    model = timm.create_model("test_resnet", num_classes=10)
    with caplog.at_level(logging.INFO, logger="usi_composer.models"):
        load_weights(model, str(path))
    assert_weights(model, weights(seed=3))
    assert f"ResNet: its state dict, from {path}" in caplog.messages


def test_timm_train_checkpoint_loads_its_ema_weights(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ema = weights(seed=2)
    checkpoint = {
        "epoch": 3,
        "arch": "test_resnet",
        "state_dict": weights(seed=1),
        "state_dict_ema": {f"module.{k}": v for k, v in ema.items()},  # as saved from a DDP-wrapped EMA
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "args": argparse.Namespace(model="test_resnet", lr=0.1, model_ema=True),
        "version": 2,
    }
    path = tmp_path / "model_best.pth.tar"
    torch.save(checkpoint, path)
    model = timm.create_model("test_resnet", num_classes=10)
    with caplog.at_level(logging.INFO, logger="usi_composer.models"):
        load_weights(model, str(path))
    assert_weights(model, ema)
    assert f"ResNet: its 'state_dict_ema', from {path}" in caplog.messages


def test_composer_checkpoint_loads_as_model_checkpoint(digits: Path, composer_run: Path) -> None:
    path = composer_run / "ep0-ba2-rank0.pt"
    state = torch.load(path, weights_only=False)["state"]["model"]
    model = build_model(load_config(DEMO, tiny_run(digits, f"model.checkpoint={path}", **CHECKPOINTED)))
    assert_weights(model.module, {k.removeprefix("module."): v for k, v in state.items()})


def test_composer_checkpoint_resumes_with_load_path_as_data(
    digits: Path, composer_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    weights_only: list[bool] = []
    load = torch.load

    def recording(*args, **kwargs):
        weights_only.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording)
    run = [f"trainer.load_path={composer_run / 'ep0-ba1-rank0.pt'}", f"trainer.save_folder={tmp_path}"]
    trainer = build_trainer(load_config(DEMO, tiny_run(digits, *run, "trainer.max_duration=3ba", **CHECKPOINTED)))
    assert int(trainer.state.timestamp.batch) == 1
    assert weights_only == [True], "Composer's load, as data"
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 3
    trainer.close()


def test_save_weights_writes_files_that_load_as_data(digits: Path, tmp_path: Path) -> None:
    trainer = train(load_config(DEMO, tiny_run(digits, **CHECKPOINTED)))
    for name in ("student.pt", "student.safetensors"):
        save_weights(trainer, tmp_path / name)
    plain = torch.load(tmp_path / "student.pt", weights_only=True)  # no allow-listed global needed
    assert all(isinstance(v, torch.Tensor) for v in plain.values())
    for name in ("student.pt", "student.safetensors"):
        model = timm.create_model("test_resnet", num_classes=10)
        load_weights(model, str(tmp_path / name))
        assert_weights(model, plain)
    assert (tmp_path / "student.safetensors").read_bytes()[8:9] == b"{", "safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.pt", "student.safetensors"], "no temporary left"
    trainer.close()


def test_plain_http_is_refused(digits: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(CheckpointError, match=r"^http://example.com/w.pt: refusing plain http:// .*; use https://$"):
        load_weights(timm.create_model("test_resnet", num_classes=10), "http://example.com/w.pt")
    for key in ("model.checkpoint", "trainer.load_path"):
        assert main([DEMO, *tiny_run(digits, f"{key}=http://example.com/w.pt", **CHECKPOINTED)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert line.startswith(f"error: {key}: http://example.com/w.pt: refusing plain http://"), line


def test_what_composer_cannot_read_as_data_needs_trust(digits: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A tar checkpoint: Composer 0.32.1 extracts it without a filter (its members can write any file)
    assert main([DEMO, *tiny_run(digits, "trainer.load_path=/ckpt/ep1.tar.gz", **CHECKPOINTED)]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        "error: trainer.load_path: /ckpt/ep1.tar.gz: refusing to extract a tar archive (Composer extracts it "
        "unfiltered: a member can write any file) (a checkpoint can run code when it is loaded); if you trust "
        "this file, set trainer.trust_checkpoints=true"
    )
    # FSDP's sharded checkpoints: torch.distributed.checkpoint unpickles them (their .metadata too)
    sharded = ["trainer.fsdp={state_dict_type: sharded}", "trainer.autoresume=true", "trainer.run_name=r"]
    sharded.append("trainer.save_folder=/ckpt")
    with pytest.raises(ConfigError, match=r"trainer.fsdp.state_dict_type: sharded checkpoints can only be loaded"):
        load_config("yamls/usi.yaml", sharded)
    assert load_config("yamls/usi.yaml", [*sharded, "trainer.trust_checkpoints=true"]).trainer.trust_checkpoints


# --------------------------------------------------------------------------- the patches' guard


def test_patches_are_idempotent_and_guarded(monkeypatch: pytest.MonkeyPatch) -> None:
    composer_patches.apply_patches()
    composer_patches.apply_patches()
    assert composer_checkpoint._write_checkpoint_file is composer_patches._write_checkpoint_file
    assert composer_patches._ORIGINALS["_write_checkpoint_file"] is not composer_patches._write_checkpoint_file

    def changed(state_dict, filename, compress=False):  # an upstream change of the signature
        pass

    monkeypatch.setattr(composer_checkpoint, "_write_checkpoint_file", changed)
    with pytest.raises(SetupError) as error:
        composer_patches.apply_patches()
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(
        "usi_composer/patches relies on composer.utils.checkpoint._write_checkpoint_file, checked against "
        "composer 0.32.1; in the installed composer 0.32.1 its parameters are (state_dict, filename, compress), "
        "not (state_dict, filename): install mosaicml==0.32.1, or update the code PRIVATE_APIS names for it "
        "(replaced by _write_checkpoint_file in patches/trainer.py: checkpoints are written atomically)"
    ), message
    monkeypatch.delattr(composer_checkpoint, "_write_checkpoint_file")
    with pytest.raises(SetupError, match=r"_write_checkpoint_file, .* it is missing: install mosaicml==0.32.1"):
        composer_patches.apply_patches()


def test_every_private_api_is_guarded_where_the_recipe_overrides_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A method our Trainer subclass overrides, a streaming hook and a torch function: each one's change
    stops the start-up check (and the check passes on the versions installed here)."""
    import composer
    import torch
    from streaming import StreamingDataset

    patches.check_upstream()
    for owner, name, changed in (
        (composer.Trainer, "_use_closures", lambda self, extra: False),
        (StreamingDataset, "_resume_incr_epoch", lambda self, epoch: (0, 0)),
        (torch._dynamo, "maybe_mark_dynamic", lambda tensor, dims: None),
    ):
        with monkeypatch.context() as m:
            m.setattr(owner, name, changed)
            with pytest.raises(SetupError, match=rf"relies on \S*{name}, checked against .* its parameters are"):
                patches.check_upstream()
