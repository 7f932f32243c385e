"""Secrets never reach what the recipe prints or writes: --dry-run, one-line errors, log lines,
tracebacks, usi-ablate's logs and results.jsonl."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO
from usi_composer import redaction
from usi_composer.ablate import load_sweep, run_sweep
from usi_composer.cli import train as train_cli
from usi_composer.errors import error_line
from usi_composer.redaction import REDACTED, redact_text

SIGNATURE = "Zm9vYmFyc2lnbmF0dXJl0123"  # what a pre-signed URL carries in its query
PRESIGNED = f"https://bucket.s3.amazonaws.com/teacher.pt?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature={SIGNATURE}"
ENDPOINT = "s3://admin:hunter2-password@minio.local:9000/bucket/imagenet"
DEMO = str(REPO / "yamls" / "demo.yaml")


def test_redact_text_hides_every_uri_inside_prose_and_secret_environment_values() -> None:
    env = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMIK7MDENG", "HOME": "/root"}
    text = f"cannot read {PRESIGNED} (from {ENDPOINT}), key wJalrXUtnFEMIK7MDENG, home /root; see https://docs.x/y"
    out = redact_text(text, env)
    for secret in (SIGNATURE, "AKIAEXAMPLE", "hunter2-password", "admin:", "wJalrXUtnFEMIK7MDENG"):
        assert secret not in out
    assert f"https://bucket.s3.amazonaws.com/teacher.pt?{REDACTED}" in out
    assert f"s3://{REDACTED}@minio.local:9000/bucket/imagenet" in out
    assert "home /root" in out and "https://docs.x/y" in out  # what is not secret stays readable


def test_dry_run_prints_the_config_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    code = train_cli.main([DEMO, f"teacher.checkpoint={PRESIGNED}", f"data.remote={ENDPOINT}", "--print-config"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert SIGNATURE not in out.out + out.err and "hunter2-password" not in out.out + out.err
    assert f"checkpoint: https://bucket.s3.amazonaws.com/teacher.pt?{REDACTED}" in out.out


def test_a_one_line_error_naming_a_uri_is_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    bad = "ftp://user:topsecret-pass@host/imagenet?token=abcdef123456"  # a scheme streaming cannot read
    assert train_cli.main([DEMO, f"data.remote={bad}", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "data.remote" in err and "topsecret-pass" not in err and "abcdef123456" not in err
    assert f"ftp://{REDACTED}@host/imagenet?{REDACTED}" in err


def test_error_line_is_one_line_whatever_the_message() -> None:
    assert error_line(RuntimeError(f"two\nlines {PRESIGNED}")) == f"error: two lines {redact_text(PRESIGNED)}"


def test_installed_logging_and_tracebacks_are_redacted() -> None:
    """In a fresh interpreter, as a command starts: a warning, a log line with a formatting argument,
    and an uncaught exception's traceback all mention the pre-signed URL."""
    code = f"""
import logging, warnings
from usi_composer import redaction
redaction.install()
logging.getLogger("composer.trainer").warning("Loading checkpoint from %s", {PRESIGNED!r})
warnings.warn("could not reach {ENDPOINT}")
raise RuntimeError("download failed: {PRESIGNED}")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Loading checkpoint from https://bucket.s3.amazonaws.com/teacher.pt?" in done.stderr
    assert "could not reach s3://" in done.stderr and "RuntimeError: download failed" in done.stderr
    assert SIGNATURE not in done.stderr and "hunter2-password" not in done.stderr


def test_install_redacts_what_the_root_loggers_handlers_print() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        redaction.install()
        logging.getLogger("usi.test").warning("reading %s", PRESIGNED)
    finally:
        root.removeHandler(handler)
    assert stream.getvalue() == f"reading {redact_text(PRESIGNED)}\n"


def test_usi_ablate_writes_no_secret_to_its_logs_or_results(tmp_path: Path) -> None:
    """The runner's own writes: the command line at the top of each point's log, and the points,
    parameters, overrides and errors in results.jsonl (the point's training prints are its own,
    redacted by the training command)."""
    fake_python = tmp_path / "python"
    fake_python.write_text(  # a stand-in training run: writes its metrics where --metrics-out says
        '#!/bin/sh\nwhile [ "$#" -gt 1 ]; do [ "$1" = --metrics-out ] && echo \'{"metrics/eval/top1": 0.5}\' > "$2";'
        " shift; done\n"
    )
    fake_python.chmod(0o755)
    sweep_file = tmp_path / "t.yaml"
    sweep_file.write_text(
        "method: grid\nparameters:\n  algorithms.distillation.temperature: {values: [1.0, 2.0]}\n"
        f"  teacher.checkpoint: {{values: ['{PRESIGNED}']}}\n"
    )
    out = tmp_path / "out"
    overrides = [f"data.remote={ENDPOINT}", "data.local=/tmp/cache"]
    rows = run_sweep(load_sweep(sweep_file), Path(DEMO), overrides, out, python=str(fake_python), echo=lambda _: None)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    written = (out / "results.jsonl").read_text() + "".join(p.read_text() for p in (out / "logs").glob("*.log"))
    written += " ".join(p.name for p in (out / "logs").iterdir())
    assert SIGNATURE not in written and "hunter2-password" not in written
    assert REDACTED in json.loads((out / "results.jsonl").read_text().splitlines()[0])["point"]
    # Rerun: the points are found again by their redacted form and skipped.
    again = run_sweep(load_sweep(sweep_file), Path(DEMO), overrides, out, python="/nonexistent", echo=lambda _: None)
    assert [r["status"] for r in again] == ["ok", "ok"]
