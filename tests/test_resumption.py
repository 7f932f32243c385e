"""Composer's algorithm checks, applied to ours: resumption (world size 1 and 2), a second fit, repr, state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from resumption import ALGORITHM_SETS, NUM_CLASSES, _net, _trainer, differences, run_pair

import usi_composer.algorithms as usi_algorithms
from helpers import launch
from usi_composer.algorithms import KnowledgeDistillation, MixUpCutMix


@pytest.mark.parametrize("name", list(ALGORITHM_SETS))
def test_resumption_is_equivalent(name: str, tmp_path: Path) -> None:
    first, resumed = run_pair(name, tmp_path)
    assert differences(first, resumed) == []


def test_resumption_check_can_fail(tmp_path: Path) -> None:
    first, resumed = run_pair("usi", tmp_path)
    checkpoint = torch.load(resumed, weights_only=False)
    key = next(iter(checkpoint["state"]["model"]))
    checkpoint["state"]["model"][key] += 1
    torch.save(checkpoint, resumed)
    assert differences(first, resumed) == [f"state.model.{key}"]


@pytest.mark.slow
def test_resumption_is_equivalent_on_two_processes(tmp_path: Path) -> None:
    result, logs = launch(2, tmp_path, "tests/resumption.py", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:] + logs
    report = (tmp_path / "report.txt").read_text().splitlines()
    assert report == [f"{name}: equal, 2 ranks" for name in ALGORITHM_SETS], report


@pytest.mark.parametrize("name", list(ALGORITHM_SETS))
def test_a_second_fit_continues_as_one_longer_fit(name: str, tmp_path: Path) -> None:
    """``fit()`` then ``fit(duration="2ba")`` ends where one 4-batch ``fit()`` ends: our algorithms
    carry on across calls (EMA keeps its average, the mixing keys its draws by the batch index).
    Only torch's global RNG differs: the second fit's new dataloader iterator draws its base seed
    from it, which is why no algorithm of ours may draw from it."""
    twice = _trainer(name, tmp_path / "twice")
    twice.fit()
    twice.fit(duration="2ba")
    twice.close()
    _trainer(name, tmp_path / "once", max_duration="4ba").fit()
    assert differences(tmp_path / "twice" / "ba4-rank0.pt", tmp_path / "once" / "ba4-rank0.pt") == ["rng[0].torch"]


def test_repr_round_trips_through_eval() -> None:
    teacher = _net(1)
    namespace = {**vars(usi_algorithms), "teacher": teacher}
    for algorithm in (
        MixUpCutMix(NUM_CLASSES, mixup_alpha=0.3, switch_prob=0.2),
        KnowledgeDistillation(teacher, alpha=2.5, temperature=4.0, ce_weight=0.0),
    ):
        again = eval(repr(algorithm), namespace)
        assert type(again) is type(algorithm) and repr(again) == repr(algorithm)


def test_state_dict_records_hyperparameters_as_values(caplog: pytest.LogCaptureFixture) -> None:
    teacher = _net(1)
    for make, changed, expected in (
        (
            lambda **kw: KnowledgeDistillation(teacher, **{"alpha": 1.5, "temperature": 2.0, **kw}),
            {"alpha": 3.0},
            {"alpha": 1.5, "temperature": 2.0, "ce_weight": 1.0, "log_interval": 100},
        ),
        (
            lambda **kw: MixUpCutMix(NUM_CLASSES, **{"mixup_alpha": 0.3, **kw}),
            {"target_key": "label"},
            {"num_classes": NUM_CLASSES, "mixup_alpha": 0.3, "cutmix_alpha": 1.0, "input_key": 0, "target_key": 1},
        ),
    ):
        original = make()
        state = original.state_dict()
        assert state["repr"] == repr(original)
        assert {k: state[k] for k in expected} == expected
        assert all(v is None or isinstance(v, bool | int | float | str) for v in state.values())

        caplog.clear()
        make().load_state_dict(state)  # same config: silent
        assert caplog.records == []
        resumed = make(**changed)
        resumed.load_state_dict(state)  # the constructor's value stays, and the change is said
        name, value = next(iter(changed.items()))
        assert getattr(resumed, name) == value
        said = f"the checkpoint was trained with {name}={state[name]!r}, this run uses {value!r}"
        assert [r.getMessage() for r in caplog.records] == [f"{type(original).__name__}: {said}"]
