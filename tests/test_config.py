"""Config: every error class gives one line naming the source and key, exit code 2; --dry-run round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from helpers import run_cli
from usi_composer.cli.train import main
from usi_composer.config import ConfigError, dump_config, load_config
from usi_composer.plan import resolve

USI = "yamls/usi.yaml"


@pytest.mark.parametrize(
    ("overrides", "env", "expected"),
    [
        (["model.nme=resnet18"], {}, "'model.nme=resnet18': model.nme: unknown key 'nme' (did you mean 'name'?)"),
        (["trainer.global_batch_size=abc"], {}, "trainer.global_batch_size: Value 'abc'"),
        (["algorithms.distillation.alpha=-1"], {}, "algorithms.distillation.alpha: must be >= 0, got -1.0"),
        (["algorithms.distillation.temperature=0"], {}, "algorithms.distillation.temperature: must be > 0, got 0.0"),
        (["model.name=resnt50"], {}, "model.name: unknown timm model 'resnt50' (did you mean 'resnet50'"),
        (["teacher.name=tresnet_v2_x"], {}, "teacher.name: unknown timm model 'tresnet_v2_x' (did you mean"),
        ([], {"WORLD_SIZE": "3"}, "trainer.global_batch_size: 1024 does not divide by the world size 3"),
        (["data.crop_pct=1.5"], {}, "data.crop_pct: must be in (0, 1], got 1.5"),
        (["trainer.max_duration=300epochs"], {}, "trainer.max_duration: must be a number with a unit (300ep, "),
        (["trainer.max_duration=2"], {}, "trainer.max_duration: must be a number with a unit (300ep, 2000ba, "),
        (["scheduler.warmup=0.05dur"], {}, None),
        (["trainer.eval_interval=1"], {}, "'trainer.eval_interval=1': trainer.eval_interval: must be a number with"),
        (["trainer.global_batch_size=6", "trainer.microbatch_size=3"], {}, "needs an even size per process, got 3"),
        (["nokey"], {}, "override 'nokey': expected key=value"),
        (["trainer.compile=maybe"], {}, "trainer.compile: must be auto, true or false, got 'maybe'"),
    ],
)
def test_bad_values_name_source_and_key(
    overrides: list[str], env: dict, expected: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if expected is None:  # accepted
        resolve(load_config(USI, overrides))
        return
    with pytest.raises(ConfigError) as info:
        resolve(load_config(USI, overrides))  # the world layout is the run plan's to check
    message = str(info.value)
    assert expected in message and "\n" not in message


@pytest.mark.parametrize(
    ("overrides", "env", "expected"),
    [
        (["model.nme=resnet18"], {}, "error: override 'model.nme=resnet18': model.nme: unknown key 'nme'"),
        ([], {"WORLD_SIZE": "3"}, "error: trainer.global_batch_size: 1024 does not divide"),
    ],
)
def test_cli_prints_one_line_and_exits_2(
    overrides: list[str],
    env: dict,
    expected: str | None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main([USI, *overrides]) == 2
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [err.strip()] and err.startswith(expected), err
    assert "Traceback" not in err and out == ""


@pytest.mark.slow
def test_the_train_script_itself_prints_one_line_and_exits_2() -> None:
    """train.py as a user runs it, in a fresh interpreter: the one-line error is all it prints."""
    result = run_cli("train.py", USI, "model.nme=resnet18", timeout=120)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr == "error: override 'model.nme=resnet18': model.nme: unknown key 'nme' (did you mean 'name'?)\n"
    )
    assert result.stdout == ""


def test_unknown_key_in_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: resnet18\ntrainer:\n  max_durration: 2ep\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value) == (
        f"{bad}: trainer.max_durration: unknown key 'max_durration' (did you mean 'max_duration'?)"
    )


def test_missing_required_value(tmp_path: Path) -> None:
    cfg = tmp_path / "no_model.yaml"
    cfg.write_text("data:\n  train_dir: /data\nalgorithms:\n  distillation:\n    enabled: false\n")
    with pytest.raises(ConfigError, match=r"no_model.yaml: model.name: missing required value"):
        load_config(cfg)


def test_wrong_type_in_file(tmp_path: Path) -> None:
    cfg = tmp_path / "types.yaml"
    cfg.write_text("model:\n  name: resnet18\ndata:\n  image_size: [224]\n")
    with pytest.raises(ConfigError, match=r"types.yaml: data.image_size: "):
        load_config(cfg)


def test_distillation_needs_teacher_weights(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"teacher.checkpoint: a teacher needs trained weights"):
        load_config(USI, ["teacher.pretrained=false"])


def test_dry_run_prints_the_paper_values_and_loads_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main([USI, "--print-config", "model.name=deit_tiny_patch16_224"]) == 0
    stdout = capsys.readouterr().out
    printed = yaml.safe_load(stdout)
    a, o = printed["algorithms"], printed["optimizer"]
    assert printed["model"]["name"] == "deit_tiny_patch16_224"
    assert printed["teacher"]["name"] == "tresnet_v2_l.miil_in21k_ft_in1k"
    assert (a["distillation"]["alpha"], a["distillation"]["temperature"]) == (5.0, 1.0)
    assert (a["mixup_cutmix"]["mixup_alpha"], a["mixup_cutmix"]["cutmix_alpha"]) == (0.8, 1.0)
    assert (a["mixup_cutmix"]["switch_prob"], a["mixup_cutmix"]["prob"]) == (0.5, 1.0)
    assert a["ema"]["decay"] == 0.99996 and a["progressive_resizing"] is False
    assert (o["lr"], o["weight_decay"], o["reference_batch_size"]) == (2e-3, 2e-2, 1024)
    assert printed["scheduler"] == {"warmup": "5ep", "warmup_lr": 1e-4, "min_lr": 1e-6}
    assert printed["trainer"]["max_duration"] == "300ep"
    assert printed["data"]["auto_augment"] == "rand-m7-mstd0.5-inc1" and printed["data"]["crop_pct"] == 0.95

    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(stdout)
    assert load_config(dumped) == load_config(USI, ["model.name=deit_tiny_patch16_224"])
    config, plan = stdout.split("# the run plan", 1)
    assert dump_config(load_config(dumped)) == config  # the plan follows as YAML comments
    assert "\n# lr: 0.002\n" in plan and "\n# ema_smoothing: 0.99996\n" in plan


def test_ema_and_lr_scale_with_the_global_batch() -> None:
    from usi_composer.plan import resolve

    def plan(batch: int):
        return resolve(load_config(USI, [f"trainer.global_batch_size={batch}"]))

    # Same half-life in samples: 16 steps at batch 64 decay as much as 1 step at batch 1024.
    assert plan(64).ema_smoothing ** 16 == pytest.approx(0.99996, rel=1e-12)
    assert plan(1024).ema_smoothing == 0.99996
    assert plan(256).lr == pytest.approx(5e-4)
