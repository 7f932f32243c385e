"""trainer.compile: each graph compiles once (train, eval with a partial last batch, EMA/raw swaps,
a second epoch), the compile time is logged once, and a compile failure is one line naming the model."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torch._dynamo  # private module: its graph counter is the test's measuring tool
from composer.loggers import InMemoryLogger
from torch import nn

from helpers import COMPILE_MODEL, GraphCount, compile_overrides, run_cli
from usi_composer.algorithms import BestOfEMAAndRaw
from usi_composer.cli.train import main
from usi_composer.compilation import compile_failure, resolve_compile
from usi_composer.config import load_config
from usi_composer.training import train


def test_auto_compiles_on_gpus_only() -> None:
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
    assert main(["yamls/usi.yaml", "trainer.compile=true", "--dry-run"]) == 0
    assert "compile: true" in capsys.readouterr().out


def test_recipe_compiles_each_graph_once(digits: Path, saved_teacher, monkeypatch: pytest.MonkeyPatch) -> None:
    # aot_eager: dynamo and AOTAutograd exactly as with inductor (same graphs, guards, recompiles),
    # without inductor's C++ build, which takes minutes on 2 CPU cores.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # Below 16: on the CPU, conv's backend choice (mkldnn from batch 16 on) splits a dynamic batch
    # dimension in two ranges, a CPU-only guard; a partial batch in the same range must reuse the graph.
    eval_batch = 8
    cfg = load_config(
        "yamls/usi.yaml",
        compile_overrides(
            digits,
            saved_teacher(COMPILE_MODEL, 10),
            "trainer.global_batch_size=8",
            f"trainer.eval_batch_size={eval_batch}",
            "trainer.max_duration=2ep",
            "trainer.train_subset_num_batches=3",
        ),
    )
    assert cfg.algorithms.ema.enabled and cfg.algorithms.ema.best_of_raw
    val_images = sum(1 for p in (digits / "val").rglob("*") if p.is_file())
    assert val_images % eval_batch != 0, "the last eval batch must be a partial one"
    graphs, logger = GraphCount(), InMemoryLogger()
    trainer = train(cfg, loggers=[logger], callbacks=[graphs])

    # First batch: the student's training graph (forward and backward) and the teacher's.
    # First evaluation: the student's eval graph, for every batch size (the partial last batch too),
    # used for the EMA weights and again for the raw ones. Nothing compiles after that.
    assert graphs.after_batch == [2, 2, 2, 3, 3, 3]
    assert graphs.at_fit_end == 3
    best = next(c for c in trainer.state.callbacks if isinstance(c, BestOfEMAAndRaw))
    assert set(best.scores["eval"]) == {"ema", "raw"}, "both weight sets were evaluated"
    assert len(logger.data["metrics/eval/top1"]) == 2, "two evaluations, one per epoch"
    compile_time = logger.data["time/compile"]
    assert len(compile_time) == 1 and compile_time[0][1] > 0, "logged once"
    trainer.close()


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
    result = run_cli(
        "train.py", "yamls/usi.yaml", *compile_overrides(digits, saved_teacher(COMPILE_MODEL, 10), *extra), env=env
    )
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: compiling the student '{COMPILE_MODEL}' failed (InvalidCxxCompiler: ")
    assert lines[-1].endswith("; set trainer.compile=false to train without compilation")
    assert "Traceback" not in result.stderr + result.stdout and len(lines) <= 3, result.stderr
