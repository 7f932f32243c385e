"""kd_loss against a hand computation, a float64 reference and its analytic gradient."""

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


def _reference(student: torch.Tensor, teacher: torch.Tensor, t: float) -> float:
    """The KD term in float64, from the same (already rounded) logits."""
    log_p, log_q = (x.double().div(t).log_softmax(-1) for x in (teacher, student))
    return float(t * t * (log_p.exp() * (log_p - log_q)).sum(-1).mean())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_of_half_logits_is_the_float64_value(dtype: torch.dtype, temperature: float) -> None:
    """bf16/fp16 logits (as autocast gives them) over 1000 classes: kd_loss equals the float64 KD of
    the same logits to fp32 precision; the same formula in the logits' own dtype, which rounds every
    log-probability to 8 (bf16) or 11 (fp16) bits, is off by orders of magnitude more."""
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(8, 1000, generator=g) * 10).to(dtype)
    teacher = (student.float() + torch.randn(8, 1000, generator=g) * 3).to(dtype)
    reference = _reference(student, teacher, temperature)
    loss = kd_loss(student, teacher, temperature)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference, rel=1e-5)
    in_dtype = torch.nn.functional.kl_div(
        (student / temperature).log_softmax(-1),
        (teacher / temperature).log_softmax(-1),
        reduction="batchmean",
        log_target=True,
    )
    assert abs(in_dtype.item() * temperature**2 - reference) > 1e-4 * reference, "the test can tell the dtypes apart"


def test_kd_loss_gradient_flows_to_student_only() -> None:
    """The student's gradient is the KD gradient ``T * (softmax(s/T) - softmax(t/T)) / N``; the
    teacher's logits are a constant target: neither they nor the parameters that made them get
    a gradient, even when they come with a graph (a teacher not run under no_grad)."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 5, generator=g, requires_grad=True)
    teacher = torch.nn.Linear(3, 5)
    t = teacher(torch.randn(4, 3, generator=g))
    t.retain_grad()
    kd_loss(s, t, 2.0).backward()
    expected = 2.0 * (torch.softmax(s / 2.0, -1) - torch.softmax(t / 2.0, -1)) / 4
    assert s.grad is not None
    torch.testing.assert_close(s.grad, expected.detach())
    assert t.grad is None
    assert all(p.grad is None for p in teacher.parameters())


def test_kd_loss_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="same classes"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4), 1.0)
