"""USI's algorithms in a real Composer Trainer (ordering, loss composition, freezing); the mixing; the ranges."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from composer import Trainer
from composer.core import Event
from composer.loggers import InMemoryLogger
from composer.models import ComposerClassifier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from usi_composer.algorithms import (
    FusedEMA,
    KnowledgeDistillation,
    MixUpCutMix,
    Range,
    batch_rng,
    kd_loss,
    mixup_cutmix_batch,
)

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


def _one_hot(targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    return torch.nn.functional.one_hot(targets, NUM_CLASSES).double() * (1 - smoothing) + smoothing / NUM_CLASSES


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_mixup_cutmix_batch_targets_describe_the_mixed_images(label_smoothing: float) -> None:
    """Read off each output: CutMix pastes one box of the reversed batch and weighs the targets by
    the area left; MixUp blends the whole batch with its reverse at the weight of the targets.
    The draws come from the generator alone: the same generator state gives the same batch."""
    g = torch.Generator().manual_seed(0)
    inputs, targets = torch.rand(8, 3, 12, 16, generator=g), torch.randperm(NUM_CLASSES, generator=g)[[0, 1] * 4]
    reverse = inputs.flip(0)
    kinds = set()
    for batch in range(12):
        mixed, soft = mixup_cutmix_batch(
            inputs.clone(), targets, NUM_CLASSES, batch_rng(0, batch), label_smoothing=label_smoothing
        )
        again, _ = mixup_cutmix_batch(
            inputs.clone(), targets, NUM_CLASSES, batch_rng(0, batch), label_smoothing=label_smoothing
        )
        assert torch.equal(mixed, again)
        changed = (mixed != inputs).any(0).any(0)  # (H, W): where any sample changed
        rows, cols = changed.any(1).nonzero().squeeze(1), changed.any(0).nonzero().squeeze(1)
        box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
        pasted = torch.equal(mixed[..., box[0], box[1]], reverse[..., box[0], box[1]])
        if pasted and changed[box].all() and changed.sum() < changed.numel():  # CutMix: one box, exactly
            kinds.add("cutmix")
            lam = 1 - changed.sum().item() / changed.numel()
            outside = ~changed
            assert torch.equal(mixed[..., outside], inputs[..., outside])
        else:  # MixUp: mixed = lam * inputs + (1 - lam) * reverse, one lam for the batch
            kinds.add("mixup")
            difference = inputs - reverse
            lam = ((mixed - reverse) * difference).sum().item() / difference.square().sum().item()  # least squares
            torch.testing.assert_close(mixed, lam * inputs + (1 - lam) * reverse)
            assert 0 < lam < 1
        expected = lam * _one_hot(targets, label_smoothing) + (1 - lam) * _one_hot(targets.flip(0), label_smoothing)
        torch.testing.assert_close(soft.double(), expected, rtol=0, atol=1e-5)
    assert kinds == {"mixup", "cutmix"}, "both were drawn"


def test_mixup_cutmix_applies_the_function_with_keyed_draws() -> None:
    """In the Trainer, microbatch k of batch b gets ``mixup_cutmix_batch`` with the draws of
    ``batch_rng(seed, b, rank, k)`` and the algorithm's hyper-parameters: images and targets."""
    targets_seen: list[torch.Tensor] = []

    def loss_fn(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        targets_seen.append(targets.detach().clone())
        return torch.nn.functional.cross_entropy(outputs, targets)

    student = Recorder()
    hparams = dict(mixup_alpha=0.3, cutmix_alpha=2.0, switch_prob=0.8, prob=0.7, label_smoothing=0.1)
    Trainer(
        model=ComposerClassifier(student, num_classes=NUM_CLASSES, loss_fn=loss_fn),
        train_dataloader=_loader(n=64),
        max_duration="8ba",
        algorithms=[MixUpCutMix(NUM_CLASSES, **hparams)],
        device="cpu",
        device_train_microbatch_size=4,
        progress_bar=False,
        seed=7,
    ).fit()
    assert len(student.seen) == len(targets_seen) == 16
    for b, (x, y) in enumerate(_loader(n=64)):
        for k in range(2):
            micro = slice(4 * k, 4 * k + 4)
            rng = batch_rng(7, b, 0, k)
            images, targets = mixup_cutmix_batch(x[micro].clone(), y[micro], NUM_CLASSES, rng, **hparams)
            torch.testing.assert_close(student.seen[2 * b + k], images, rtol=0, atol=0)
            torch.testing.assert_close(targets_seen[2 * b + k], targets, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: KnowledgeDistillation(Recorder(), alpha=-1), "alpha must be >= 0, got -1.0"),
        (lambda: KnowledgeDistillation(Recorder(), temperature=0), "temperature must be > 0, got 0.0"),
        (lambda: KnowledgeDistillation(Recorder(), ce_weight=-0.5), "ce_weight must be >= 0, got -0.5"),
        (lambda: KnowledgeDistillation(Recorder(), log_interval=0), "log_interval must be >= 1, got 0"),
        (lambda: MixUpCutMix(NUM_CLASSES, mixup_alpha=-1), "mixup_alpha must be >= 0, got -1.0"),
        (lambda: MixUpCutMix(NUM_CLASSES, cutmix_alpha=-1), "cutmix_alpha must be >= 0, got -1.0"),
        (
            lambda: MixUpCutMix(NUM_CLASSES, mixup_alpha=0, cutmix_alpha=0),
            "one of mixup_alpha and cutmix_alpha must be > 0",
        ),
        (lambda: MixUpCutMix(NUM_CLASSES, switch_prob=1.5), "switch_prob must be in [0, 1], got 1.5"),
        (lambda: MixUpCutMix(NUM_CLASSES, prob=-0.1), "prob must be in [0, 1], got -0.1"),
        (lambda: MixUpCutMix(NUM_CLASSES, label_smoothing=2), "label_smoothing must be in [0, 1], got 2.0"),
        (lambda: FusedEMA(half_life=None, smoothing=1.0), "smoothing must be in (0, 1), got 1.0"),
        (lambda: FusedEMA(half_life=None, smoothing=0.0), "smoothing must be in (0, 1), got 0.0"),
        (
            lambda: mixup_cutmix_batch(torch.zeros(2, 3, 4, 4), torch.zeros(2).long(), 2, batch_rng(0, 0), prob=1.5),
            "prob must be in [0, 1], got 1.5",
        ),
    ],
)
def test_values_outside_the_declared_ranges_are_refused(make, message: str) -> None:
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value) == message


def test_range_ends_are_allowed_where_declared() -> None:
    """Each end is accepted, not refused, and kept as given (not moved inside the range)."""
    kd = KnowledgeDistillation(Recorder(), alpha=0, ce_weight=0, log_interval=1)
    assert (kd.alpha, kd.ce_weight, kd.log_interval) == (0.0, 0.0, 1)
    for p in (0, 1):
        mix = MixUpCutMix(NUM_CLASSES, switch_prob=p, prob=p, label_smoothing=p)
        assert (mix.switch_prob, mix.prob, mix.label_smoothing) == (p, p, p)
    assert MixUpCutMix(NUM_CLASSES, mixup_alpha=0).mixup_alpha == 0
    assert MixUpCutMix(NUM_CLASSES, cutmix_alpha=0).cutmix_alpha == 0
    assert FusedEMA(half_life=None, smoothing=0.999).smoothing == 0.999


def test_ranges_are_declared_per_hyperparameter() -> None:
    """What a config schema reads: one ``Range`` per hyper-parameter, its message without the name."""
    for cls in (KnowledgeDistillation, MixUpCutMix):
        assert set(cls.ranges) <= set(cls.hparams), cls
    assert set(KnowledgeDistillation.ranges) == {"alpha", "temperature", "ce_weight", "log_interval"}
    assert set(MixUpCutMix.ranges) == {"mixup_alpha", "cutmix_alpha", "switch_prob", "prob", "label_smoothing"}
    assert KnowledgeDistillation.ranges["alpha"].violation(-1.0) == "must be >= 0, got -1.0"
    assert KnowledgeDistillation.ranges["alpha"].violation(0.0) is None
    assert MixUpCutMix.alphas_violation(0.0, 0.0) == "one of mixup_alpha and cutmix_alpha must be > 0"
    assert MixUpCutMix.alphas_violation(0.0, 1.0) is None
    with pytest.raises(TypeError):
        KnowledgeDistillation.ranges["alpha"] = Range.above(0)  # read-only: shared by the checks and the schema


@pytest.mark.parametrize(
    ("allowed", "inside", "outside", "text"),
    [
        (Range.at_least(0), [0, 1e9], [-1e-9, float("nan")], ">= 0"),
        (Range.above(0), [1e-9], [0, -1], "> 0"),
        (Range.closed(0, 1), [0, 0.5, 1], [-0.1, 1.1], "in [0, 1]"),
        (Range.open(0, 1), [1e-9, 0.5], [0, 1], "in (0, 1)"),
        (Range(0, 1, high_included=False), [0, 0.999], [1], "in [0, 1)"),
        (Range(high=8), [-5, 8], [9], "<= 8"),
    ],
)
def test_range(allowed: Range, inside: list[float], outside: list[float], text: str) -> None:
    for value in inside:
        assert allowed.violation(value) is None, value
        allowed.check("x", value)
    for value in outside:
        assert allowed.violation(value) == f"must be {text}, got {value}"
        with pytest.raises(ValueError, match=rf"^x must be {re.escape(text)}, got {value}$"):
            allowed.check("x", value)


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

    timm_mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.0, num_classes=NUM_CLASSES)
    np.random.seed(0)
    n = 3000
    c_ours, l_ours = _mixing_outcomes(lambda x, t, i: mixup_cutmix_batch(x, t, NUM_CLASSES, batch_rng(3, i)), n)
    c_timm, l_timm = _mixing_outcomes(lambda x, t, i: timm_mixup(x, t), n)
    assert abs(c_ours.mean() - c_timm.mean()) < 0.04 and 0.4 < c_ours.mean() < 0.6
    for kind in (True, False):
        p = ks_2samp(l_ours[c_ours == kind], l_timm[c_timm == kind]).pvalue
        assert p > 1e-3, f"cutmix={kind}: KS p={p:.2g}"
    # and the comparison can tell another alpha apart
    c_other, l_other = _mixing_outcomes(
        lambda x, t, i: mixup_cutmix_batch(x, t, NUM_CLASSES, batch_rng(3, i), mixup_alpha=0.3), n
    )
    assert ks_2samp(l_other[~c_other], l_timm[~c_timm]).pvalue < 1e-3
