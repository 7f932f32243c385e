"""W&B through Composer's WandBLogger: config from the yaml, the resolved config in the run,
no secrets in it, offline runs that `wandb sync` recognizes and that read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import DEMO_CPU, DEMO_YAML, NUM_CLASSES, TEACHER, run_cli, tiny_run
from usi_composer.cli import train as train_cli
from usi_composer.config import ConfigError, load_config
from usi_composer.redaction import REDACTED, redact, redact_argv
from usi_composer.tracking import build_wandb_logger, read_wandb_run

API_KEY = "local-0123456789abcdef0123456789abcdef01234567"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory, tiny_folder: Path, saved_teacher) -> dict:
    """One real two-batch training run logged to W&B offline, as a user starts it."""
    tmp = tmp_path_factory.mktemp("wandb-run")
    data = tiny_folder
    teacher = saved_teacher(TEACHER, NUM_CLASSES)
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_API_KEY": API_KEY,
        "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
        "WANDB_SILENT": "true",
    }
    args = [
        str(DEMO_YAML),
        *tiny_run(data, teacher_weights=teacher, **DEMO_CPU),
        "algorithms.distillation.temperature=2.5",  # an override: must reach the run's config
        "loggers.wandb.project=usi-test",
        "loggers.wandb.group=g1",
        "loggers.wandb.tags=[ablation,tiny]",
        "loggers.wandb.log_images=1ba",  # Composer's ImageVisualizer: the batch the student sees
        "teacher.evaluate_first=true",  # the teacher's top-1 before step 1
        f"loggers.wandb.notes=bucket creds {AWS_SECRET}",  # a secret pasted into the config by mistake
        f"loggers.wandb.dir={tmp / 'wb'}",
        "--metrics-out",
        str(tmp / "metrics.json"),
    ]
    done = run_cli("train.py", *args, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dirs = sorted((tmp / "wb" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    return {"dir": run_dirs[0], "metrics": json.loads((tmp / "metrics.json").read_text()), "env": env}


@pytest.mark.slow
def test_offline_run_holds_the_resolved_config_and_the_metrics(offline_run: dict) -> None:
    run = read_wandb_run(offline_run["dir"])
    config = run["config"]
    assert config["algorithms"]["distillation"]["temperature"] == 2.5  # the override, not the yaml's 1.0
    assert config["model"]["name"] == "mobilenetv3_small_050"
    assert config["trainer"]["max_duration"] == "2ba"
    assert config["loggers"]["wandb"]["project"] == "usi-test"
    assert config["loggers"]["wandb"]["notes"] == f"bucket creds {REDACTED}"
    assert config["composer_version"]  # Composer's own hyperparameters go in too
    plan = config["plan"]  # what the recipe derived: the scaled LR, the EMA smoothing per step, the batch layout
    assert plan["lr"] == pytest.approx(2e-3 * 8 / 64) and plan["per_process_batch"] == 8
    assert plan["ema_smoothing"] == pytest.approx(0.95 ** (8 / 64))
    assert (run["project"], run["group"], run["tags"]) == ("usi-test", "g1", ["ablation", "tiny"])
    logged = ("loss/train/total", "loss/train/ce", "loss/train/kd", "metrics/eval/top1", "metrics/eval/top5")
    for key in (*logged, "metrics/teacher/top1", "Images/Train Table/_type"):  # the table of mixed images
        assert key in run["history_keys"], key
    assert run["summary"]["metrics/eval/top1"] == pytest.approx(offline_run["metrics"]["metrics/eval/top1"])
    assert offline_run["metrics"]["wandb_run_dir"] == str(offline_run["dir"])


@pytest.mark.slow
def test_offline_run_is_what_wandb_sync_uploads(offline_run: dict) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "wandb", "sync", "--dry-run", str(offline_run["dir"])],
        capture_output=True,
        text=True,
        timeout=120,
        env=offline_run["env"],
    )
    assert done.returncode == 0, done.stderr
    assert "Would sync 1 run" in done.stdout + done.stderr
    assert offline_run["dir"].name in done.stdout + done.stderr


@pytest.mark.slow
def test_secrets_are_nowhere_in_the_run(offline_run: dict) -> None:
    for path in offline_run["dir"].rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert API_KEY.encode() not in data, path
            assert AWS_SECRET.encode() not in data, path


def test_redact_hides_secret_keys_urls_and_environment_values() -> None:
    env = {"WANDB_API_KEY": API_KEY, "HF_TOKEN": "hf_abcdefghijkl", "HOME": "/root", "AWS_REGION": "us-east-1"}
    config = {
        "model": {"name": "resnet50", "checkpoint": "s3://AKIAEXAMPLE:topsecret@bucket/w.pt", "kwargs": {}},
        "teacher": {"checkpoint": "https://host/w.pt?X-Amz-Signature=abc&X-Amz-Credential=def"},
        "store": {"api_key": "k1", "password": "p", "aws_secret_access_key": "s", "session_token": "t", "key": "x"},
        "notes": f"run with {API_KEY} and hf_abcdefghijkl",
        "paths": ["/root/data", "/data/us-east-1"],
        "optimizer": {"lr": 0.002, "reference_batch_size": 1024},
        "empty": {"api_key": None},
    }
    out = redact(config, env)
    text = json.dumps(out)
    for secret in ("topsecret", "AKIAEXAMPLE", "X-Amz-Signature=abc", API_KEY, "hf_abcdefghijkl", '"k1"', '"p"'):
        assert secret not in text
    assert out["model"]["checkpoint"] == f"s3://{REDACTED}@bucket/w.pt"
    assert out["teacher"]["checkpoint"] == f"https://host/w.pt?{REDACTED}"
    assert set(out["store"].values()) == {REDACTED}
    assert out["notes"] == f"run with {REDACTED} and {REDACTED}"
    # Ordinary values stay: non-secret environment values, numbers, names, empty secrets.
    assert out["paths"] == ["/root/data", "/data/us-east-1"]
    assert out["optimizer"] == config["optimizer"] and out["model"]["name"] == "resnet50"
    assert out["empty"] == {"api_key": None}
    assert config["store"]["api_key"] == "k1"  # a copy: the config itself is untouched


def test_redact_argv_hides_secret_overrides() -> None:
    env = {"AWS_SECRET_ACCESS_KEY": AWS_SECRET}
    argv = [
        "yamls/usi.yaml",
        "store.api_key=abc",
        f"loggers.wandb.notes=x {AWS_SECRET}",
        "model.checkpoint=s3://a:b@c/d",
    ]
    assert redact_argv([*argv, "--metrics-out", "/m.json"], env) == [
        "yamls/usi.yaml",
        f"store.api_key={REDACTED}",
        f"loggers.wandb.notes=x {REDACTED}",
        f"model.checkpoint=s3://{REDACTED}@c/d",
        "--metrics-out",
        "/m.json",
    ]


def _cfg(*overrides: str):
    return load_config(DEMO_YAML, ["teacher.checkpoint=/nowhere/teacher.pt", *overrides])


def test_loggers_wandb_is_optional_and_validated(tmp_path: Path) -> None:
    assert _cfg().loggers.wandb is None
    w = _cfg("loggers.wandb.project=p", "loggers.wandb.tags=[a,b]", "loggers.wandb.mode=offline").loggers.wandb
    assert (w.project, list(w.tags), w.mode, w.entity) == ("p", ["a", "b"], "offline", None)
    assert _cfg("loggers.wandb.project=p", "loggers.wandb=null").loggers.wandb is None
    yaml_file = tmp_path / "on.yaml"
    yaml_file.write_text(DEMO_YAML.read_text() + "\nloggers:\n  wandb: {}\n")  # on, with W&B's defaults
    assert load_config(yaml_file, ["teacher.checkpoint=x"]).loggers.wandb is not None
    with pytest.raises(ConfigError, match=r"loggers\.wandb\.projct: unknown key 'projct' \(did you mean 'project'"):
        _cfg("loggers.wandb.projct=p")
    with pytest.raises(ConfigError, match=r"loggers\.wandb\.mode: must be online, offline or disabled"):
        _cfg("loggers.wandb.mode=cloud")


def test_bad_wandb_key_on_the_command_line_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert train_cli.main([str(DEMO_YAML), "loggers.wandb.entitty=me", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "did you mean 'entity'" in err


def test_builder_makes_composers_wandb_logger_only_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    from composer.loggers import WandBLogger

    monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
    assert build_wandb_logger(_cfg()) is None
    logger = build_wandb_logger(_cfg("loggers.wandb.project=p", "loggers.wandb.entity=e", "loggers.wandb.group=g"))
    assert isinstance(logger, WandBLogger)
    assert logger._init_kwargs["project"] == "p" and logger._init_kwargs["group"] == "g"
    assert logger._init_kwargs["config"]["model"]["name"] == _cfg().model.name
    # Under `wandb agent` a run always reports to its sweep, even from the plain yaml.
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    assert isinstance(build_wandb_logger(_cfg()), WandBLogger)
