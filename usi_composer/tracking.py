"""Experiment tracking: Composer's ``WandBLogger`` from ``loggers.wandb``, with the resolved config
as the run's config (so two runs diff in the W&B UI) and secrets kept out of it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from usi_composer.config import Config, WandBConfig, config_to_dict
from usi_composer.plan import RunPlan
from usi_composer.redaction import redact

__all__ = ["build_wandb_logger", "iter_wandb_records", "loggable_config", "read_wandb_run"]


def loggable_config(cfg: Config, environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The fully resolved config as a nested dict, secrets redacted (``usi_composer.redaction.redact``)."""
    return redact(config_to_dict(cfg), environ)


def build_wandb_logger(cfg: Config, plan: RunPlan | None = None) -> Any:
    """Composer's ``WandBLogger`` as ``loggers.wandb`` says, or None when it is null. Its config: the
    resolved config and, under ``plan``, the run plan's derived values (the scaled LR, the EMA smoothing
    per step, the batch layout, the normalizations).

    A run started by ``wandb agent`` (``WANDB_SWEEP_ID`` set) always logs, with W&B's defaults
    where ``loggers.wandb`` is null: the sweep reads its metric from the run, so the sweep files
    in yamls/sweeps/ work with the plain yamls/usi.yaml.
    """
    w = cfg.loggers.wandb
    if w is None and os.environ.get("WANDB_SWEEP_ID"):
        w = WandBConfig()
    if w is None:
        return None
    from usi_composer.patches.wandb_logger import wandb_logger_class

    config = loggable_config(cfg)
    if plan is not None:
        config["plan"] = redact(plan.as_dict())
    init_kwargs: dict[str, Any] = {"config": config}
    if w.notes is not None:
        init_kwargs["notes"] = redact(w.notes)
    if w.mode is not None:
        init_kwargs["mode"] = w.mode
    if w.dir is not None:
        Path(w.dir).mkdir(parents=True, exist_ok=True)
        init_kwargs["dir"] = w.dir
    return wandb_logger_class()(
        project=w.project,
        group=w.group,
        name=w.name,
        entity=w.entity,
        tags=list(w.tags) or None,
        log_artifacts=w.log_artifacts,
        init_kwargs=init_kwargs,
    )


# --------------------------------------------------------------------------- reading runs back
# wandb >= 0.2x writes offline runs only as a transaction log (run-<id>.wandb: wandb's protobuf
# `Record`s in LevelDB's log framing) and no longer ships a Python reader for it, so the framing
# is decoded here (the format is stable: `wandb sync` uploads exactly these files); the records
# themselves are parsed by wandb's own protobuf classes.
_WANDB_HEADER = b":W&B"
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def iter_wandb_records(path: str | os.PathLike) -> Iterator[Any]:
    """The ``wandb.proto.wandb_internal_pb2.Record``s in a ``.wandb`` file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    if not data.startswith(_WANDB_HEADER):
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, pending = 7, b""  # header: ':W&B', uint16 magic, uint8 version
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:  # block trailer: zero padding
            pos += left_in_block
            continue
        length = int.from_bytes(data[pos + 4 : pos + 6], "little")
        kind = data[pos + 6]
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:  # zeroed tail (preallocated, unwritten)
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0
            continue
        pending = chunk if kind in (_FULL, _FIRST) else pending + chunk
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def read_wandb_run(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A W&B run directory (offline or online) read back: ``{"id", "project", "name", "group",
    "tags", "config", "summary", "history_keys"}``; config and summary as nested dicts with the
    values the run logged last."""
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise FileNotFoundError(f"{run_dir}: no run-*.wandb file (not a W&B run directory)")
    run: dict[str, Any] = {"config": {}, "summary": {}, "history_keys": set(), "tags": []}

    def apply(target: dict[str, Any], items: Any) -> None:
        for item in items:
            keys = list(item.nested_key) or [item.key]
            node = target
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = json.loads(item.value_json)

    for record in iter_wandb_records(files[-1]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(id=r.run_id, project=r.project, name=r.display_name, group=r.run_group, tags=list(r.tags))
            apply(run["config"], r.config.update)
        elif kind == "config":
            apply(run["config"], record.config.update)
        elif kind == "summary":
            apply(run["summary"], record.summary.update)
        elif kind == "history":
            for item in record.history.item:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                run["history_keys"].add(key)
                if not key.startswith("_"):  # the summary defaults to each key's last logged value
                    run["summary"][key] = json.loads(item.value_json)
    return run
