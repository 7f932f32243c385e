"""trainer.compile: auto means GPUs only, --dry-run builds nothing, and a compile failure is one line
naming the model. That each graph compiles once (train, eval with a partial last batch, EMA/raw
swaps, a second epoch) and the compile time is logged once: tests/test_cpu_and_gpu.py, CPU and CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo  # private module: its graph counter is the test's measuring tool
from torch import nn

from helpers import COMPILE_MODEL, COMPILED, run_cli, tiny_run
from usi_composer.cli.train import main
from usi_composer.compilation import compile_failure
from usi_composer.config import load_config
from usi_composer.plan import Env, resolve


def test_auto_compiles_on_gpus_only() -> None:
    def resolve_compile(setting: object, device: str) -> bool:
        cfg = load_config("yamls/usi.yaml", [f"trainer.compile={str(setting).lower()}", f"trainer.device={device}"])
        return resolve(cfg, Env(cuda=device == "gpu")).compile

    assert [resolve_compile(s, d) for s in ("auto", True, False) for d in ("cpu", "gpu")] == [
        False,
        True,
        True,
        True,
        False,
        False,
    ]
    assert load_config("yamls/usi.yaml").trainer.compile == "auto"


def test_dry_run_with_compile_builds_nothing(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    import usi_composer.builders

    def build_trainer(*args: object, **kwargs: object) -> None:
        raise AssertionError("--dry-run built the trainer")

    monkeypatch.setattr(usi_composer.builders, "build_trainer", build_trainer)
    assert main(["yamls/usi.yaml", "trainer.compile=true", "--print-config"]) == 0
    assert "compile: true" in capsys.readouterr().out


def test_failure_names_student_or_teacher() -> None:
    def broken_backend(gm: torch.fx.GraphModule, example_inputs: list) -> None:
        raise RuntimeError("backend exploded\nwith a second line")

    class Net(nn.Module):  # dynamo does not compile torch.nn's own modules alone (nn.Linear)
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) * 2

    student, teacher = Net(), Net()
    for module in (student, teacher):
        module.compile(backend=broken_backend)
    for module, expected in ((student, "the student 'resnet50'"), (teacher, "the teacher 'tresnet_v2_l'")):
        torch._dynamo.reset()  # dynamo skips code that failed to compile; both share Module._call_impl
        with pytest.raises(Exception) as info:
            module(torch.randn(2, 4))
        error = compile_failure(info.value, "resnet50", ("tresnet_v2_l", teacher))
        assert error is not None
        assert str(error) == (
            f"compiling {expected} failed (RuntimeError: backend exploded); "
            "set trainer.compile=false to train without compilation"
        )
    assert compile_failure(ValueError("not a compile failure"), "resnet50", None) is None


@pytest.mark.slow
def test_cli_compile_failure_is_one_line(digits: Path, saved_teacher, tmp_path: Path) -> None:
    # A real inductor failure: no working C++ compiler (inductor reads CXX); a fresh cache, so
    # nothing compiled earlier is reused.
    env = {"CXX": "/bin/false", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    extra = ("trainer.global_batch_size=4", "trainer.max_duration=2ba", "data.val_dir=null")
    run = tiny_run(digits, *extra, teacher_weights=saved_teacher(COMPILE_MODEL, 10), **COMPILED)
    result = run_cli("train.py", "yamls/usi.yaml", *run, env=env)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: compiling the student '{COMPILE_MODEL}' failed (InvalidCxxCompiler: ")
    assert lines[-1].endswith("; set trainer.compile=false to train without compilation")
    assert "Traceback" not in result.stderr + result.stdout and len(lines) <= 3, result.stderr
