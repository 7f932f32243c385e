"""BestOfEMAAndRaw: both weight sets validated, logged apart, the better one kept at the end."""

from __future__ import annotations

import pytest
import torch
from composer import Trainer
from composer.algorithms import EMA
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from usi_composer.algorithms import BestOfEMAAndRaw, FusedEMA
from usi_composer.models import save_weights


def _data(n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long())  # linearly separable


def _fit(smoothing: float, duration: str = "30ba", ema: type[EMA] = FusedEMA):
    torch.manual_seed(0)
    net = nn.Linear(6, 2)
    logger = InMemoryLogger()
    best = BestOfEMAAndRaw("MulticlassAccuracy")
    trainer = Trainer(
        model=ComposerClassifier(net, num_classes=2),
        train_dataloader=DataLoader(_data(256), batch_size=16),
        eval_dataloader=DataLoader(_data(128), batch_size=32),
        eval_interval="10ba",
        optimizers=torch.optim.SGD(net.parameters(), lr=0.5),
        max_duration=duration,
        algorithms=[ema(half_life=None, smoothing=smoothing, update_interval="1ba")],
        callbacks=[best],
        loggers=[logger],
        device="cpu",
        progress_bar=False,
    )
    trainer.fit()
    return trainer, best, logger, net


def _accuracy(net: nn.Module) -> float:
    x, y = _data(128).tensors
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("ema", [FusedEMA, EMA], ids=["fused", "composer"])
def test_slow_ema_loses_to_raw_and_raw_is_kept(tmp_path, ema: type[EMA]) -> None:
    trainer, best, logger, net = _fit(smoothing=0.9999, ema=ema)  # the average barely moves from the init
    raw = [v for _, v in logger.data["metrics/eval_raw/MulticlassAccuracy"]]
    ema = [v for _, v in logger.data["metrics/eval/MulticlassAccuracy"]]
    assert len(raw) == len(ema) == 3
    assert raw[-1] == pytest.approx(_accuracy(net)), "raw metrics are those of the training weights"
    assert raw[-1] > ema[-1] and best.best == "raw"
    assert [v for _, v in logger.data["metrics/eval_best/is_ema"]][-1] == 0.0
    assert [v for _, v in logger.data["metrics/eval_best/MulticlassAccuracy"]][-1] == raw[-1]
    # at the end the EMA copy holds the raw weights, so exports and checkpoints get the better model
    save_weights(trainer, tmp_path / "w.pt")
    exported = torch.load(tmp_path / "w.pt")
    torch.testing.assert_close(exported["weight"], net.weight.detach())


def test_ties_keep_the_ema() -> None:
    _, best, _, _ = _fit(smoothing=1e-12)  # EMA == raw weights
    assert best.best == "ema"
    assert best.scores["eval"]["ema"] == best.scores["eval"]["raw"]


def test_needs_composers_ema() -> None:
    net = nn.Linear(6, 2)
    trainer = Trainer(
        model=ComposerClassifier(net, num_classes=2),
        train_dataloader=DataLoader(_data(32), batch_size=16),
        max_duration="1ba",
        callbacks=[BestOfEMAAndRaw()],
        device="cpu",
        progress_bar=False,
    )
    with pytest.raises(ValueError, match="needs Composer's EMA"):
        trainer.fit()
