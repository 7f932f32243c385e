"""USI's algorithms inside a real Composer Trainer: ordering, loss composition, freezing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from composer import Trainer
from composer.core import Event
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from usi_composer.algorithms import KnowledgeDistillation, MixUpCutMix, kd_loss

NUM_CLASSES = 5


class Recorder(nn.Module):
    """A tiny conv classifier that keeps every input it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, NUM_CLASSES))
        self.seen: list[torch.Tensor] = []
        self.num_classes = NUM_CLASSES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.net(x)


def _loader(n: int = 16, batch_size: int = 8) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, NUM_CLASSES, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)


def _trainer(student: nn.Module, algorithms: list, **kwargs) -> Trainer:
    return Trainer(
        model=ComposerClassifier(student, num_classes=NUM_CLASSES),
        train_dataloader=_loader(),
        max_duration="2ba",
        algorithms=algorithms,
        device="cpu",
        progress_bar=False,
        seed=0,
        **kwargs,
    )


def test_teacher_sees_the_mixed_batch_the_student_sees() -> None:
    student, teacher = Recorder(), Recorder()
    loader_inputs = torch.cat([x for x, _ in _loader()])
    algorithms = [KnowledgeDistillation(teacher, alpha=5.0), MixUpCutMix(NUM_CLASSES)]  # order given must not matter
    _trainer(student, algorithms).fit()
    assert len(student.seen) == len(teacher.seen) == 2
    for s, t in zip(student.seen, teacher.seen, strict=True):
        torch.testing.assert_close(t, s, rtol=0, atol=0)
    seen = torch.cat(student.seen)
    assert not torch.allclose(seen, loader_inputs), "the batch was mixed before the forward pass"


def test_kd_sets_the_total_loss_and_logs_ce_and_kd_means() -> None:
    captured: list[dict[str, torch.Tensor]] = []
    teacher = Recorder()

    class Capture(KnowledgeDistillation):
        def apply(self, event, state, logger):
            ce = state.loss.detach().clone() if event == Event.AFTER_LOSS else None
            super().apply(event, state, logger)
            if ce is not None:
                batch = state.batch_get_item(0).detach().clone()
                captured.append(
                    {"ce": ce, "total": state.loss.detach().clone(), "outputs": state.outputs.detach(), "x": batch}
                )

    logger = InMemoryLogger()
    kd = Capture(teacher, alpha=2.5, temperature=2.0, ce_weight=0.5, log_interval=4)
    _trainer(Recorder(), [kd], loggers=[logger]).fit()  # 2 batches: read once, at the end of the epoch
    with torch.no_grad():
        kds = [kd_loss(c["outputs"], teacher.net(c["x"]), 2.0) for c in captured]
    for c, expected_kd in zip(captured, kds, strict=True):
        torch.testing.assert_close(c["total"], 0.5 * c["ce"] + 2.5 * expected_kd)
    assert [v for _, v in logger.data["loss/train/ce"]] == pytest.approx(
        [float(torch.stack([c["ce"] for c in captured]).mean())]
    )
    assert [v for _, v in logger.data["loss/train/kd"]] == pytest.approx([float(torch.stack(kds).mean())])
    assert len(logger.data["loss/train/total"]) == 2  # Composer's, every batch


def test_kd_logs_ce_and_kd_every_log_interval_batches() -> None:
    logger = InMemoryLogger()
    _trainer(Recorder(), [KnowledgeDistillation(Recorder(), log_interval=1)], loggers=[logger]).fit()
    assert len(logger.data["loss/train/ce"]) == len(logger.data["loss/train/kd"]) == 2


def test_teacher_is_frozen_and_never_trained() -> None:
    teacher = Recorder().train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = _trainer(Recorder(), [KnowledgeDistillation(teacher)])
    trainer.fit()
    assert not teacher.training
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    optimized = {id(p) for group in trainer.state.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}


def test_non_finite_loss_stops_with_the_batch_number() -> None:
    class NaNTeacher(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.full((x.shape[0], NUM_CLASSES), float("nan"))

    with pytest.raises(FloatingPointError, match=r"non-finite loss at batch 0"):
        _trainer(Recorder(), [KnowledgeDistillation(NaNTeacher())]).fit()


def test_mixup_cutmix_needs_even_microbatches() -> None:
    trainer = Trainer(
        model=ComposerClassifier(Recorder(), num_classes=NUM_CLASSES),
        train_dataloader=_loader(n=6, batch_size=3),
        max_duration="1ba",
        algorithms=[MixUpCutMix(NUM_CLASSES)],
        device="cpu",
        progress_bar=False,
    )
    with pytest.raises(ValueError, match="even microbatch size"):
        trainer.fit()


def test_mixup_cutmix_targets_are_distributions() -> None:
    seen: list[torch.Tensor] = []

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen.append(targets.detach().clone())
        return torch.nn.functional.cross_entropy(outputs, targets)

    model = ComposerClassifier(Recorder(), num_classes=NUM_CLASSES, loss_fn=loss_fn)
    Trainer(
        model=model,
        train_dataloader=_loader(),
        max_duration="2ba",
        algorithms=[MixUpCutMix(NUM_CLASSES)],
        device="cpu",
        progress_bar=False,
    ).fit()
    for targets in seen:
        assert targets.shape == (8, NUM_CLASSES)
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        assert (targets.max(1).values < 1).any(), "mixed targets are soft"


def test_non_finite_loss_is_found_within_log_interval_batches() -> None:
    class NaNFromSecondCall(nn.Module):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            value = float("nan") if self.calls >= 2 else 0.0
            return torch.full((x.shape[0], NUM_CLASSES), value)

    trainer = Trainer(
        model=ComposerClassifier(Recorder(), num_classes=NUM_CLASSES),
        train_dataloader=_loader(n=48),
        max_duration="6ba",
        algorithms=[KnowledgeDistillation(NaNFromSecondCall(), log_interval=3)],
        device="cpu",
        progress_bar=False,
    )
    with pytest.raises(FloatingPointError, match=r"non-finite loss at batch 1 \(found at batch 3,"):
        trainer.fit()


def test_kd_step_reads_nothing_back_to_the_host() -> None:
    """The per-step non-finite check stays on the device: no ``.item()``/``bool()`` in the step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    reads: list[str] = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in ("aten::_local_scalar_dense", "aten::equal", "aten::nonzero"):
                reads.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    class Counted(KnowledgeDistillation):
        def apply(self, event, state, logger):
            if event.name != "after_loss":
                return super().apply(event, state, logger)
            with Reads():
                return super().apply(event, state, logger)

    _trainer(Recorder(), [Counted(Recorder())]).fit()
    assert reads == []


class DictBatches(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 8, 8, generator=g)
        self.labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i]}


def test_mixup_cutmix_uses_input_and_target_keys() -> None:
    from composer.models import ComposerModel

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class DictModel(ComposerModel):
        def __init__(self) -> None:
            super().__init__()
            self.net = Recorder()

        def forward(self, batch):
            return self.net(batch["image"])

        def loss(self, outputs, batch):
            seen.append((batch["image"].detach().clone(), batch["label"].detach().clone()))
            return torch.sum(-batch["label"] * outputs.log_softmax(-1), -1).mean()

    data = DictBatches()
    Trainer(
        model=DictModel(),
        train_dataloader=DataLoader(data, batch_size=8),
        max_duration="2ba",
        algorithms=[MixUpCutMix(NUM_CLASSES, input_key="image", target_key="label")],
        device="cpu",
        progress_bar=False,
    ).fit()
    assert len(seen) == 2
    for _, labels in seen:
        assert labels.shape == (8, NUM_CLASSES)
        torch.testing.assert_close(labels.sum(1), torch.ones(8))
    assert not torch.allclose(torch.cat([i for i, _ in seen]), data.images), "the images were mixed"


def test_mixup_cutmix_batch_is_the_algorithms_mixing() -> None:
    from usi_composer.algorithms import mixup_cutmix_batch
    from usi_composer.algorithms.mixup_cutmix import batch_rng

    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, NUM_CLASSES, (8,), generator=g)
    for batch in range(4):  # both MixUp and CutMix get drawn
        mixed, soft = mixup_cutmix_batch(inputs.clone(), targets, NUM_CLASSES, switch_prob=0.5, batch_index=batch)
        again, _ = mixup_cutmix_batch(inputs.clone(), targets, NUM_CLASSES, switch_prob=0.5, batch_index=batch)
        rng = batch_rng(0, batch)
        expected, expected_soft = MixUpCutMix(NUM_CLASSES, switch_prob=0.5).mix(inputs.clone(), targets, rng)
        torch.testing.assert_close(mixed, expected, rtol=0, atol=0)
        torch.testing.assert_close(soft, expected_soft, rtol=0, atol=0)
        assert torch.equal(mixed, again), "a function of (seed, batch index)"
        assert soft.shape == (8, NUM_CLASSES) and not torch.equal(mixed, inputs)


def _mixing_outcomes(mix, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(is CutMix, lam) of ``n`` batches of [black, white] 32x32 images, read off the outputs."""
    cutmix, lams = [], []
    for i in range(n):
        x = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
        mixed, soft = mix(x, torch.tensor([0, 1]), i)
        first = mixed[0]
        cutmix.append(bool(((first == 0) | (first == 1)).all() and first.max() > first.min()))
        lams.append(float(soft[0, 0]))
    return np.array(cutmix), np.array(lams)


def test_mixup_cutmix_draws_follow_timms_distribution() -> None:
    """Our keyed draws against timm's Mixup (numpy's global RNG): the MixUp/CutMix share, and the
    distributions of lam (MixUp: Beta(0.8, 0.8); CutMix: from the clipped box's area)."""
    from scipy.stats import ks_2samp
    from timm.data import Mixup

    from usi_composer.algorithms.mixup_cutmix import batch_rng

    ours = MixUpCutMix(NUM_CLASSES, switch_prob=0.5)
    timm_mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.0, num_classes=NUM_CLASSES)
    np.random.seed(0)
    n = 3000
    c_ours, l_ours = _mixing_outcomes(lambda x, t, i: ours.mix(x, t, batch_rng(3, i)), n)
    c_timm, l_timm = _mixing_outcomes(lambda x, t, i: timm_mixup(x, t), n)
    assert abs(c_ours.mean() - c_timm.mean()) < 0.04 and 0.4 < c_ours.mean() < 0.6
    for kind in (True, False):
        p = ks_2samp(l_ours[c_ours == kind], l_timm[c_timm == kind]).pvalue
        assert p > 1e-3, f"cutmix={kind}: KS p={p:.2g}"
    # and the comparison can tell another alpha apart
    other = MixUpCutMix(NUM_CLASSES, mixup_alpha=0.3, switch_prob=0.5)
    c_other, l_other = _mixing_outcomes(lambda x, t, i: other.mix(x, t, batch_rng(3, i)), n)
    assert ks_2samp(l_other[~c_other], l_timm[~c_timm]).pvalue < 1e-3
