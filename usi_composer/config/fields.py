"""How a schema field declares itself: its constraint (a range or a check) and its role.

Every leaf field of the schema says, next to its type and default, which of three roles it plays:

- ``MATH``: it changes what the training computes. Autoresume refuses a change of it (unless the
  key is in ``trainer.autoresume_accept``).
- ``FREE``: logging, evaluation, checkpointing, paths, how the work is spread over processes:
  what the run computes stays the same, so autoresume accepts a change.
- ``TEACHER_INPUT``: it shapes what the teacher sees or outputs (the data's order, the views, the
  mixing, the teacher itself). A teacher cache's fingerprint is these keys (where ``when`` says
  they apply) plus the run plan's fields of the same role. It is training math too.

Which keys autoresume accepts and which a teacher cache compares are queries on these roles
(:func:`leaf_fields`, each leaf's ``role`` and ``applies``), never lists kept by hand; ``tests/test_preflight.py``
walks the schema and fails on a field without a role.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Literal

from usi_composer.algorithms import Range

__all__ = [
    "FREE",
    "MATH",
    "ROLES",
    "TEACHER_INPUT",
    "Check",
    "Leaf",
    "free",
    "leaf_fields",
    "math",
    "teacher_input",
    "undeclared",
    "value_at",
]

Role = Literal["math", "free", "teacher_input"]
MATH: Role = "math"
FREE: Role = "free"
TEACHER_INPUT: Role = "teacher_input"
ROLES: tuple[Role, ...] = (MATH, FREE, TEACHER_INPUT)

Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it, or None


def _declare(
    role: Role,
    default: Any = NO_DEFAULT,
    allowed: Range | None = None,
    unit: str = "",
    *,
    check: Check | None = None,
    factory: Any = NO_DEFAULT,
    when: Callable[[Any], bool] | None = None,
) -> Any:
    metadata: dict[str, Any] = {"role": role}
    if allowed is not None:
        metadata.update(range=allowed, unit=unit)
    if check is not None:
        metadata["check"] = check
    if when is not None:
        metadata["when"] = when
    return field(default=default, default_factory=factory, metadata=metadata)


def math(default: Any = NO_DEFAULT, allowed: Range | None = None, unit: str = "", **kwargs: Any) -> Any:
    """A field of the training math. ``allowed``: the range its numbers (null aside) must lie in,
    ``unit`` following the bound in messages (``must be >= 8 pixels, got 4``); ``check``: a function
    returning what is wrong with a value (null aside) or None; ``factory``: a default factory."""
    return _declare(MATH, default, allowed, unit, **kwargs)


def free(default: Any = NO_DEFAULT, allowed: Range | None = None, unit: str = "", **kwargs: Any) -> Any:
    """A field that leaves the training math as it is (arguments as :func:`math`)."""
    return _declare(FREE, default, allowed, unit, **kwargs)


def teacher_input(default: Any = NO_DEFAULT, allowed: Range | None = None, unit: str = "", **kwargs: Any) -> Any:
    """A field that shapes the teacher's inputs or outputs (arguments as :func:`math`). ``when``: a
    function of the whole config saying whether the field applies to this run (a field that does not
    apply is left out of the cache fingerprint, e.g. streaming's shuffle for image folders)."""
    return _declare(TEACHER_INPUT, default, allowed, unit, **kwargs)


@dataclass(frozen=True)
class Leaf:
    """One leaf field of a schema, by its dotted key path."""

    key: str
    field: dataclasses.Field

    @property
    def role(self) -> Role | None:
        return self.field.metadata.get("role")

    def applies(self, cfg: Any) -> bool:
        when = self.field.metadata.get("when")
        return when is None or bool(when(cfg))


def leaf_fields(schema: Any, prefix: str = "") -> Iterator[Leaf]:
    """Every leaf field of the dataclass ``schema`` (a class or an instance) in declaration order;
    a nested section (a dataclass-typed field) is walked, not yielded."""
    hints = _section_types(schema)
    for f in fields(schema):
        section = hints.get(f.name)
        if section is not None:  # an instance's own section (a subclass, say), else the declared type
            value = None if isinstance(schema, type) else getattr(schema, f.name)
            yield from leaf_fields(value if is_dataclass(value) else section, f"{prefix}{f.name}.")
        else:
            yield Leaf(f"{prefix}{f.name}", f)


def _section_types(schema: Any) -> dict[str, type]:
    """The fields of ``schema`` whose type is a dataclass (possibly ``X | None``), by name."""
    import typing

    cls = schema if isinstance(schema, type) else type(schema)
    sections = {}
    for name, hint in typing.get_type_hints(cls).items():
        for candidate in (hint, *typing.get_args(hint)):
            if isinstance(candidate, type) and is_dataclass(candidate):
                sections[name] = candidate
    return sections


def undeclared(schema: Any) -> list[str]:
    """The key paths of ``schema``'s leaves that declare no role (a test holds this empty)."""
    return [leaf.key for leaf in leaf_fields(schema) if leaf.role not in ROLES]


def value_at(cfg: Any, key: str) -> Any:
    """The value at dotted ``key`` in a config (None where a section on the way is None)."""
    node = cfg
    for part in key.split("."):
        if node is None:
            return None
        node = getattr(node, part)
    return node
