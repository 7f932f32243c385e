"""FusedEMA: Composer's EMA to fp32 rounding through a Trainer; standalone use; checkpoints. Its update
against Composer's and its kernel count, on the CPU and CUDA: tests/test_cpu_and_gpu.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from composer import Trainer
from composer.algorithms import EMA
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from resumption import differences, run_pair
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import NUM_CLASSES_BN, assert_averaged_as_composer_does, launch, tiny_bn_net
from usi_composer.algorithms import FusedEMA


def _data(n: int, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, NUM_CLASSES_BN, (n,), generator=g))


def _trainer(algorithms: list, duration: str = "6ba", **kwargs) -> Trainer:
    net = tiny_bn_net()
    return Trainer(
        model=ComposerClassifier(net, num_classes=NUM_CLASSES_BN),
        train_dataloader=DataLoader(_data(64), batch_size=8),
        optimizers=torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9),
        max_duration=duration,
        algorithms=algorithms,
        device="cpu",
        progress_bar=False,
        seed=3,
        **kwargs,
    )


@pytest.mark.parametrize(
    "args",
    [
        dict(half_life=None, smoothing=0.8, update_interval="1ba"),
        dict(half_life="3ba"),
        dict(half_life="4ba", update_interval="2ba", ema_start="2ba"),
    ],
    ids=["smoothing", "half_life", "interval_and_start"],
)
def test_matches_composers_ema(args: dict) -> None:
    theirs, ours = EMA(**args), FusedEMA(**args)
    assert ours.smoothing == theirs.smoothing and ours.update_interval == theirs.update_interval
    runs = {}
    for ema in (theirs, ours):
        trainer = _trainer([ema])
        trainer.fit()
        runs[type(ema).__name__] = trainer.state.model
    raw_theirs, raw_ours = (dict(m.state_dict()) for m in runs.values())
    for name in raw_theirs:  # the training itself is untouched
        assert torch.equal(raw_theirs[name], raw_ours[name]), name
    assert_averaged_as_composer_does(ours.ema_model, theirs.ema_model, raw_ours, updates=6)


def test_half_life_none_needs_no_update_interval() -> None:
    ema = FusedEMA(half_life=None, smoothing=0.5)
    assert ema.half_life is None and ema.smoothing == 0.5 and str(ema.update_interval) == "1ba"
    again = eval(repr(ema), {"FusedEMA": FusedEMA})
    assert repr(again) == repr(ema) and again.smoothing == 0.5


def _loss(model: ComposerClassifier, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        return float(nn.functional.cross_entropy(model(data.tensors), data.tensors[1]))


def test_standalone_repeated_fit_evaluates_the_averaged_weights() -> None:
    """A plain Composer Trainer: eval sees the EMA weights; training continues from the raw ones."""
    eval_data = _data(32, seed=1)

    def run(algorithms: list) -> tuple[Trainer, InMemoryLogger]:
        logger = InMemoryLogger()
        trainer = _trainer(
            algorithms,
            duration="4ba",
            eval_dataloader=DataLoader(eval_data, batch_size=16),
            eval_interval="2ba",
            loggers=[logger],
        )
        return trainer, logger

    ema = FusedEMA(half_life="2ba")
    trainer, logger = run([ema])
    plain, _ = run([])
    for fit in (trainer, plain):
        fit.fit()
        fit.fit(duration="2ba")
    assert int(trainer.state.timestamp.batch) == 6
    assert not ema.ema_weights_active
    reference = plain.state.model.state_dict()
    for name, mine in trainer.state.model.state_dict().items():
        assert torch.equal(mine, reference[name]), f"{name}: the training weights are back after each eval"
    logged = [v for _, v in logger.data["metrics/eval/CrossEntropy"]]
    assert len(logged) == 3
    averaged = ema.get_ema_model(copy.deepcopy(trainer.state.model))
    assert logged[-1] == pytest.approx(_loss(averaged, eval_data), rel=1e-5)
    assert logged[-1] != pytest.approx(_loss(copy.deepcopy(trainer.state.model), eval_data), rel=1e-3)


def test_rebinds_when_the_models_tensors_are_replaced_between_fits() -> None:
    def run(replace: bool) -> dict[str, torch.Tensor]:
        ema = FusedEMA(half_life="2ba")
        trainer = _trainer([ema], duration="2ba")
        trainer.fit()
        if replace:  # new buffer objects, same values (as a .to() or a user's surgery would)
            for module in trainer.state.model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean = module.running_mean.clone()
        trainer.fit(duration="2ba")
        return dict(ema.ema_model.named_buffers_dict)

    plain, replaced = run(False), run(True)
    assert all(torch.equal(plain[name], replaced[name]) for name in plain)


def test_checkpoint_holds_the_averaged_weights(tmp_path: Path) -> None:
    first, resumed = run_pair("ema", tmp_path)
    checkpoint = torch.load(resumed, weights_only=False)
    (name, saved), *_ = checkpoint["state"]["algorithms"]
    assert name == "FusedEMA"
    stored = saved["ema_model"]
    assert (
        stored["named_parameters_dict"].keys() | stored["named_buffers_dict"].keys()
        == checkpoint["state"]["model"].keys()
    )
    key = next(iter(stored["named_parameters_dict"]))
    stored["named_parameters_dict"][key] += 1
    torch.save(checkpoint, resumed)
    diffs = differences(first, resumed)
    assert len(diffs) == 1 and "ema_model.named_parameters_dict" in diffs[0] and key in diffs[0], diffs


@pytest.mark.slow
def test_fsdp_averages_each_shard_locally_and_checkpoints_whole_tensors(tmp_path: Path) -> None:
    result, logs = launch(2, tmp_path, "tests/fsdp_ema.py", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:] + logs
    assert (tmp_path / "report.txt").read_text() == "ok, 2 ranks, 4 ops per update\n"
