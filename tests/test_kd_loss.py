"""kd_loss against a hand computation."""

import math

import pytest
import torch

from usi_composer.algorithms import kd_loss


def _hand_kd(student: list[list[float]], teacher: list[list[float]], t: float) -> float:
    """T^2 * mean over rows of sum_i p_i (log p_i - log q_i), p = softmax(teacher/T), q = softmax(student/T)."""
    total = 0.0
    for s_row, t_row in zip(student, teacher, strict=True):
        zs = [math.exp(v / t) for v in s_row]
        zt = [math.exp(v / t) for v in t_row]
        q = [v / sum(zs) for v in zs]
        p = [v / sum(zt) for v in zt]
        total += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True))
    return t * t * total / len(student)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_matches_hand_computation(temperature: float) -> None:
    student = [[2.0, -1.0, 0.5, 3.0], [0.1, 0.2, -2.0, 1.0], [5.0, 1.0, -1.0, 0.0]]
    teacher = [[1.0, 0.0, 0.0, 4.0], [-1.0, 2.0, 0.5, 0.0], [3.0, 3.0, -2.0, 1.0]]
    got = kd_loss(torch.tensor(student), torch.tensor(teacher), temperature)
    assert got.item() == pytest.approx(_hand_kd(student, teacher, temperature), rel=1e-5)
    assert got.item() > 0


def test_kd_loss_zero_when_student_equals_teacher() -> None:
    logits = torch.randn(8, 10) * 5
    for t in (0.5, 1.0, 4.0):
        assert kd_loss(logits, logits.clone(), t).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_is_fp32_for_half_inputs() -> None:
    s, t = torch.randn(4, 1000) * 30, torch.randn(4, 1000) * 30
    loss = kd_loss(s.bfloat16(), t.bfloat16(), 1.0)
    assert loss.dtype == torch.float32
    reference = kd_loss(s.bfloat16().float(), t.bfloat16().float(), 1.0)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)


def test_kd_loss_gradient_flows_to_student_only() -> None:
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5)
    kd_loss(s, t, 2.0).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_kd_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="same classes"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
