"""The hyper-parameters of an algorithm as checkpointable values (shared by our algorithms)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)


def hparams_state(algorithm: object, names: Sequence[str]) -> dict[str, Any]:
    """Composer's ``{"repr": ...}`` plus each hyper-parameter as a value, so a checkpoint says
    what the run used in a form code can read (not only the repr text)."""
    values = {name: _plain(getattr(algorithm, name)) for name in names}
    return {"repr": repr(algorithm), **values}


def warn_if_changed(algorithm: object, state: dict[str, Any], names: Sequence[str]) -> None:
    """Hyper-parameters come from the constructor (a resumed run uses the config it is given);
    a value that differs from the checkpoint's is allowed, but said once, in the log."""
    for name in names:
        if name in state and state[name] != _plain(getattr(algorithm, name)):
            log.warning(
                "%s: the checkpoint was trained with %s=%r, this run uses %r",
                type(algorithm).__name__,
                name,
                state[name],
                _plain(getattr(algorithm, name)),
            )


def _plain(value: Any) -> Any:
    """bool/int/float/str/None as they are; anything else (e.g. a getter/setter key) as its repr."""
    return value if value is None or isinstance(value, bool | int | float | str) else repr(value)
