"""Loading a config: the yaml (the user's, or the recipe's own shipped with the package), ``key=value``
overrides in order, the structured merge into the schema, then :func:`~.rules.validate`. Every problem
is a :class:`ConfigError` whose one line names the source (the yaml file or the override), the key
path and, where one exists, a suggestion.
"""

from __future__ import annotations

import os
import typing
from dataclasses import fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from usi_composer.config.rules import validate
from usi_composer.config.schema import Config, suggest
from usi_composer.errors import ConfigError, first_line

__all__ = ["config_to_dict", "dump_config", "find_yaml", "load_config", "packaged_yamls"]

PACKAGED_YAMLS = "usi_composer.yamls"  # the repo's yamls/, shipped in the wheel as package data


def packaged_yamls() -> Path:
    """The folder of the recipe's own yamls (``usi.yaml``, ``demo.yaml``, ``sweeps/``, ...), installed
    with the package (the repo's ``yamls/`` in a checkout or an editable install)."""
    return Path(str(resources.files(PACKAGED_YAMLS)))


def find_yaml(path: str | os.PathLike) -> Path:
    """``path`` where it is a file (a user's own yaml always wins); else the recipe's yaml of that
    name shipped with the package, so ``yamls/usi.yaml`` (the name the docs and sweep files use),
    ``usi.yaml`` and ``sweeps/temperature.yaml`` work from any directory, without a checkout."""
    given = Path(path)
    if given.is_file() or given.is_absolute():
        return given
    parts = given.parts[1:] if given.parts[:1] == ("yamls",) else given.parts
    packaged = packaged_yamls().joinpath(*parts)
    return packaged if parts and packaged.is_file() else given


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (:func:`find_yaml`), apply ``key=value`` ``overrides`` in order, validate, return a
    :class:`Config`."""
    source = str(path)
    path = find_yaml(path)
    if not path.is_file():
        raise ConfigError("", "no such config file", source=source)
    try:
        file_cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError("", f"not valid YAML: {first_line(e)}", source=source) from None
    merged = _merge(OmegaConf.structured(Config), file_cfg, source)

    origin: dict[str, str] = {}  # key path -> the override that set it, for error messages
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError("", "expected key=value (e.g. trainer.max_duration=2ep)", source=f"override '{override}'")
        try:
            dot = OmegaConf.from_dotlist([override])
        except OmegaConfBaseException as e:
            raise ConfigError(key, first_line(e), source=f"override '{override}'") from None
        merged = _merge(merged, dot, f"override '{override}'")
        origin[key.strip()] = f"override '{override}'"

    for key in sorted(OmegaConf.missing_keys(merged)):
        message = f"missing required value (set it in the yaml or pass {key}=...)"
        raise ConfigError(key, message, source=origin.get(key, source))
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    problem = validate(cfg)
    if problem is not None:
        key, message = problem
        raise ConfigError(key, message, source=_source_of(key, origin, source))
    return cfg


def dump_config(cfg: Config, redacted: bool = False) -> str:
    """The resolved config as YAML; ``load_config`` on it gives back an equal ``Config`` (``redacted``:
    with secrets replaced, for printing: ``usi_composer.redaction.redact``)."""
    if redacted:
        from usi_composer.redaction import redact

        return OmegaConf.to_yaml(OmegaConf.create(redact(config_to_dict(cfg))))
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of the config (for loggers)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _merge(base: Any, other: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        owner, name = getattr(e, "object_type", None), key.rsplit(".", 1)[-1]
        message = first_line(e)
        choices = _choices(owner, name)
        if type(e).__name__ == "ConfigKeyError":
            message = f"unknown key '{name}'"
            message += suggest(name, _field_names(owner)) or f" (valid keys: {', '.join(_field_names(owner))})"
        elif choices is not None:  # omegaconf's "Invalid value 'x', expected one of [...]", in our words
            message = f"must be {_one_of(choices)}, got '{getattr(e, 'value', '')}'"
        raise ConfigError(key, message, source=source) from None


def _choices(owner: Any, name: str) -> tuple[Any, ...] | None:
    """The values a ``Literal`` field accepts (null aside), else None."""
    if owner is None or not is_dataclass(owner):
        return None
    hint = typing.get_type_hints(owner).get(name)
    literal = next((a for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) is Literal), None)
    return typing.get_args(literal) if literal is not None else None


def _one_of(choices: tuple[Any, ...]) -> str:
    words = [str(c).lower() if isinstance(c, bool) else str(c) for c in choices]  # YAML spells bools lowercase
    return f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else words[0]


def _field_names(obj_type: Any) -> list[str]:
    return [f.name for f in fields(obj_type)] if obj_type is not None and is_dataclass(obj_type) else []


def _source_of(key: str, origin: dict[str, str], default: str) -> str:
    # The override that set this key or one of its parents, else the file.
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in origin:
            return origin[prefix]
    return default
