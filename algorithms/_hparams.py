"""What our algorithms share about their hyper-parameters: declared ranges, repr and checkpoint state.

A class lists its hyper-parameters once (``hparams``) and the range of each that has one
(``ranges``); ``HparamsMixin`` derives from them the checks, the ``repr``, the ``state_dict`` and
the ``load_state_dict``. The recipe's config schema reads the same ``ranges``, so a range and its
message are written in one place.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar

__all__ = ["HparamsMixin", "Range", "declare_ranges"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, repr=False)
class Range:
    """The values a number may take: an interval, each end included or not, either end unbounded.

    ``violation(value)`` is the message for a value outside (``"must be >= 0, got -1.0"``), else
    None; ``check(name, value)`` raises ``ValueError("<name> <message>")``. Build one with
    ``at_least``, ``above``, ``closed`` or ``open``.
    """

    low: float = -math.inf
    high: float = math.inf
    low_included: bool = True
    high_included: bool = True

    @classmethod
    def at_least(cls, low: float) -> Range:
        """``low <= value``."""
        return cls(low=low)

    @classmethod
    def above(cls, low: float) -> Range:
        """``low < value``."""
        return cls(low=low, low_included=False)

    @classmethod
    def closed(cls, low: float, high: float) -> Range:
        """``low <= value <= high``."""
        return cls(low, high)

    @classmethod
    def open(cls, low: float, high: float) -> Range:
        """``low < value < high``."""
        return cls(low, high, low_included=False, high_included=False)

    def __contains__(self, value: float) -> bool:
        above_low = value >= self.low if self.low_included else value > self.low
        below_high = value <= self.high if self.high_included else value < self.high
        return above_low and below_high

    def __str__(self) -> str:
        """The condition as the messages say it: ``>= 0``, ``> 0``, ``in [0, 1]``, ``in (0, 1)``."""
        if math.isinf(self.high):
            return f"{'>=' if self.low_included else '>'} {self.low:g}"
        if math.isinf(self.low):
            return f"{'<=' if self.high_included else '<'} {self.high:g}"
        left, right = "[" if self.low_included else "(", "]" if self.high_included else ")"
        return f"in {left}{self.low:g}, {self.high:g}{right}"

    def __repr__(self) -> str:
        return f"Range({self})"

    def violation(self, value: float) -> str | None:
        """``"must be <condition>, got <value>"`` for a value outside the range, else None."""
        return None if value in self else f"must be {self}, got {value}"

    def check(self, name: str, value: float) -> None:
        """Raise ``ValueError("<name> must be <condition>, got <value>")`` for a value outside the range."""
        message = self.violation(value)
        if message is not None:
            raise ValueError(f"{name} {message}")


def declare_ranges(**ranges: Range) -> Mapping[str, Range]:
    """A class's ``ranges``: read-only, since its checks and the config schema share them."""
    return MappingProxyType(ranges)


class HparamsMixin:
    """``__repr__``, ``state_dict`` and ``load_state_dict`` of an algorithm, from its ``hparams``.

    The class declares:

    - ``hparams``: the constructor's hyper-parameters, kept as attributes of the same names. The
      ``repr`` shows them (``Name(alpha=5.0, ...)``, evaluable); ``state_dict()`` is Composer's
      ``{"repr": ...}`` plus each of them as a value, so a checkpoint says what the run used in a
      form code can read; ``load_state_dict`` keeps the constructor's values (a resumed run uses
      the config it is given) and logs each that differs from the checkpoint's, once.
    - ``repr_by_name``: constructor arguments the ``repr`` shows by name only (``teacher=teacher``):
      a module's text is neither readable nor stable, and it is no hyper-parameter.
    - ``ranges``: the ``Range`` of each hyper-parameter that has one (``declare_ranges(alpha=...)``);
      ``check_ranges()`` tests the attributes against them. The recipe's config schema uses the
      same objects, so the constructor and the config say the same thing in the same words.
    """

    hparams: ClassVar[tuple[str, ...]] = ()
    repr_by_name: ClassVar[tuple[str, ...]] = ()
    ranges: ClassVar[Mapping[str, Range]] = declare_ranges()

    def check_ranges(self) -> None:
        """``ValueError`` naming the first hyper-parameter outside its declared range."""
        for name, allowed in self.ranges.items():
            allowed.check(name, getattr(self, name))

    def __repr__(self) -> str:
        args = [f"{name}={name}" for name in self.repr_by_name]
        args += [f"{name}={getattr(self, name)!r}" for name in self.hparams]
        return f"{type(self).__name__}({', '.join(args)})"

    def state_dict(self) -> dict[str, Any]:
        return {"repr": repr(self), **{name: _plain(getattr(self, name)) for name in self.hparams}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.hparams:
            ours = _plain(getattr(self, name))
            if name in state and state[name] != ours:
                log.warning(
                    "%s: the checkpoint was trained with %s=%r, this run uses %r",
                    type(self).__name__,
                    name,
                    state[name],
                    ours,
                )


def _plain(value: Any) -> Any:
    """bool/int/float/str/None as they are; anything else (e.g. a getter/setter key) as its repr."""
    return value if value is None or isinstance(value, bool | int | float | str) else repr(value)
