"""The checks that run on the CPU and on CUDA: FusedEMA against Composer's EMA and its kernel count,
and the recipe's compilation (each graph once). Each test is parametrized over the device; its CUDA
case is marked gpu and skips without CUDA.

The file name matches ``tests/test_*gpu*.py``: ``make test-gpu`` (``pytest -m gpu`` on those files
only) runs the CUDA cases on a GPU machine, the whole suite runs the CPU ones. It imports only what
the GPU machine has (no moto, no kubeflow-training).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
import torch._dynamo  # private module: its graph counter is the test's measuring tool
from composer.algorithms.ema.ema import EMAParameters, compute_ema
from composer.loggers import InMemoryLogger
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from helpers import (
    COMPILE_MODEL,
    COMPILED,
    GraphCount,
    RecordOps,
    assert_averaged_as_composer_does,
    tiny_bn_net,
    tiny_run,
)
from usi_composer.algorithms import BestOfEMAAndRaw
from usi_composer.algorithms.ema import FusedEMAParameters
from usi_composer.config import load_config
from usi_composer.training import train

NEEDS_CUDA = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: run `make test-gpu` on a GPU machine"
)
DEVICES = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NEEDS_CUDA])])


# ---------------------------------------------------------------- FusedEMA


def _launches(fn: Callable[[], None], device: str) -> list[str]:
    """What ``fn()`` runs on ``device``: on the CPU the aten ops it dispatches; on CUDA the kernels it
    launches (memory copies and sets left out), after one warm-up call."""
    if device == "cpu":
        with RecordOps() as record:
            fn()
        return record.ops
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = (e for e in prof.events() if e.device_type == DeviceType.CUDA)
    return [e.name for e in kernels if not e.name.startswith(("Memcpy", "Memset"))]


@DEVICES
def test_fused_ema_matches_composers_ema_without_host_syncs(device: str) -> None:
    """Five SGD steps, each followed by both updates: the averages agree to fp32 rounding; on CUDA
    the fused update never syncs with the host."""
    model = tiny_bn_net(layers=2).to(device)  # convolutions and BatchNorm: float and integer buffers
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    ours, theirs = FusedEMAParameters(model), EMAParameters(model)
    ours.bind(model)
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(5):
        model(torch.randn(8, 3, 6, 6, device=device, generator=g)).logsumexp(1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")  # any host sync in the update raises
        try:
            ours.update(model, 0.8)
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        compute_ema(model, theirs, 0.8)
    live = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    fused = {**ours.named_parameters_dict, **ours.named_buffers_dict}
    assert all(value.device.type == device for value in fused.values())
    assert_averaged_as_composer_does(ours, theirs, live, updates=5)


@DEVICES
def test_fused_ema_update_launches_a_few_kernels_whatever_the_tensor_count(device: str) -> None:
    """Each ``_foreach_*`` op is one aten op on the CPU, and on CUDA one kernel launch per up to 64
    tensors (torch's multi_tensor_apply): models of 18 and 102 tensors take the same launches; a
    ResNet-50 takes a handful for its 320 tensors, where Composer's per-tensor loop launches several
    per tensor."""
    small, large = tiny_bn_net(layers=2).to(device), tiny_bn_net(layers=14).to(device)
    resnet = timm.create_model("resnet50", num_classes=10).to(device)
    fused, composers, tensors = {}, {}, {}
    for name, model in (("small", small), ("large", large), ("resnet50", resnet)):
        shadow = FusedEMAParameters(model)
        shadow.bind(model)
        fused[name] = _launches(lambda m=model, s=shadow: s.update(m, 0.9), device)
        reference = EMAParameters(model)
        composers[name] = _launches(lambda m=model, r=reference: compute_ema(m, r, 0.9), device)
        tensors[name] = len(list(model.parameters())) + len(list(model.buffers()))
    assert tensors["large"] > 5 * tensors["small"]
    # params lerp; float buffers mul + add; integer buffers copy: one launch each below 64 tensors
    assert len(fused["small"]) == len(fused["large"]) <= 4, (fused["small"], fused["large"])
    assert 10 * len(fused["resnet50"]) <= tensors["resnet50"], fused["resnet50"]
    assert len(composers["resnet50"]) >= tensors["resnet50"], "the counter sees Composer's per-tensor launches"
    if device == "cpu":  # aten ops have names to check: the same fused ops, whatever the model
        assert fused["small"] == fused["large"] == fused["resnet50"], fused
        assert all("_foreach_" in op for op in fused["small"]), fused["small"]
        assert len(composers["large"]) > 2 * len(composers["small"])  # the counter sees a per-tensor loop


# ---------------------------------------------------------------- compilation


@DEVICES
def test_recipe_compiles_student_and_teacher_once(
    device: str, digits: Path, saved_teacher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two epochs, each with an evaluation of the EMA and the raw weights whose last batch is a
    partial one: every graph compiles once. On CUDA with inductor in bf16, as ``trainer.compile=auto``
    does on a GPU; on the CPU with aot_eager: dynamo and AOTAutograd exactly as with inductor (same
    graphs, guards, recompiles), without inductor's C++ build, which takes minutes on 2 CPU cores."""
    if device == "cpu":
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    # The CPU's batches stay below 16: there conv's backend choice (mkldnn from batch 16 on) splits a
    # dynamic batch dimension in two ranges, a CPU-only guard; a partial batch in the same range must
    # reuse the graph.
    batch = 8 if device == "cpu" else 32
    val_images = sum(1 for p in (digits / "val").rglob("*") if p.is_file())
    assert val_images % batch > 1, "the last eval batch must be a partial one, of more than one sample"
    cfg = load_config(
        "yamls/usi.yaml",
        tiny_run(
            digits,
            *(["trainer.compile=auto"] if device == "cuda" else []),
            f"trainer.global_batch_size={batch}",
            f"trainer.eval_batch_size={batch}",
            "trainer.max_duration=2ep",
            "trainer.train_subset_num_batches=3",
            teacher_weights=saved_teacher(COMPILE_MODEL, 10),
            **COMPILED,
        ),
    )
    assert cfg.algorithms.ema.enabled and cfg.algorithms.ema.best_of_raw
    graphs, logger = GraphCount(), InMemoryLogger()
    trainer = train(cfg, loggers=[logger], callbacks=[graphs])
    if device == "cuda":
        assert trainer.state.device.name == "gpu" and trainer.state.precision.value == "amp_bf16"
    else:
        assert trainer.state.device.name == "cpu"
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
    totals = [float(v) for _, v in logger.data["loss/train/total"]]
    assert len(totals) == 6 and all(math.isfinite(t) for t in totals), totals
    trainer.close()
