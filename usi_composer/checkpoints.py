"""Checkpoints as data: reading them without running their code, writing them atomically, setting
aside the ones a failed write left behind, and refusing a resume whose config changes the training math.

A torch checkpoint is a pickle, and unpickling can call any function the file names. Files from
outside (a bucket, a colleague, a URL) are therefore read with ``torch.load(weights_only=True)``,
which builds tensors and plain containers only, plus the few types below that a Composer checkpoint
of this recipe holds; anything else is refused with one line naming the file, the first global it
wanted and the key that loads it in full (``model.trust_checkpoint``, ``teacher.trust_checkpoint``,
``trainer.trust_checkpoints``).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import logging
import os
import pickle
import re
import time
import uuid
import zipfile
from typing import Any

import numpy as np
import torch
from composer.core import Callback
from omegaconf import OmegaConf
from torch.torch_version import TorchVersion

from usi_composer.config import FREE, Config, ConfigError, config_to_dict, leaf_fields
from usi_composer.errors import CheckpointError, UnsafeCheckpointError, first_line
from usi_composer.storage import TEMP_PREFIX

__all__ = [
    "LATEST_CHECKPOINT",
    "SAFE_GLOBALS",
    "ConfigRecord",
    "check_algorithm_reprs",
    "checkpoint_problem",
    "first_math_change",
    "is_complete",
    "read_checkpoint",
    "refuse_plain_http",
    "set_aside_partial_checkpoints",
]

log = logging.getLogger(__name__)

_reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
# The plain numeric dtypes (numpy >= 1.25 pickles each array's dtype as its own class); not the object dtype.
_NUMERIC = "bool int8 int16 int32 int64 uint8 uint16 uint32 uint64 float16 float32 float64 complex64 complex128"
_NUMERIC_DTYPES = [type(np.dtype(name)) for name in _NUMERIC.split()]

# What torch.load(weights_only=True) rejects in the checkpoints this recipe writes (found by training
# the demo student, folders and MDS, with distillation, EMA and evaluation, checkpointing every batch,
# and listing torch.serialization.get_unsafe_globals_in_checkpoint on the result), plus timm's
# train.py `args`. Each builds plain data when unpickled and calls nothing else:
# - numpy's _reconstruct, ndarray and the numeric dtypes: the RNG states (numpy's generator state is
#   an array). _reconstruct makes an empty array of a class that must itself be allowed (ndarray is
#   the only one), ndarray.__setstate__ fills it from bytes; no object dtype, so no pickled elements.
#   Registered under numpy 1's module name too, for checkpoints written with numpy 1.
# - datetime.timedelta: the wall-clock times in Composer's Timestamp.
# - torch.torch_version.TorchVersion: a str subclass (the torch version in Composer's metadata).
# - argparse.Namespace: timm's train.py stores its arguments so; it only sets attributes (timm's own
#   load_state_dict allows it too).
SAFE_GLOBALS: list[Any] = [
    _reconstruct,
    (_reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    *_NUMERIC_DTYPES,
    datetime.timedelta,
    TorchVersion,
    argparse.Namespace,
]


def refuse_plain_http(uri: str) -> None:
    """A checkpoint fetched over plain http:// can be swapped by anyone on the way: refused."""
    if uri.lower().startswith("http://"):
        raise CheckpointError(f"{uri}: refusing plain http:// (anyone on the way can replace the file); use https://")


def _is_safetensors(path: str) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < os.path.getsize(path)


def read_checkpoint(
    path: str, trust: bool = False, name: str | None = None, map_location: Any = "cpu", mmap: bool = False
) -> Any:
    """The object saved at the local ``path``: a safetensors file, or a torch checkpoint read as data.

    ``trust``: unpickle in full (``weights_only=False``), running whatever the file asks for.
    ``name``: the file as the user gave it, for messages (default ``path``). ``mmap``: map the tensors
    rather than read them (where the file is in torch's zip format), to read a part of a large
    checkpoint cheaply. Raises :class:`UnsafeCheckpointError` (one line) for what the allow-list
    refuses, and :class:`CheckpointError` for a file that is not a complete checkpoint.
    """
    name = name or path
    if _is_safetensors(path):
        from safetensors.torch import load_file

        return load_file(path, device=str(map_location))
    mmap = mmap and zipfile.is_zipfile(path)
    try:
        if trust:
            return torch.load(path, map_location=map_location, weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if trust or not str(e).startswith("Weights only load failed"):
            raise CheckpointError(f"{name}: not a checkpoint torch can read ({first_line(e, 200)})") from None
        raise UnsafeCheckpointError(name, f"unpickle {_refused(e)}") from None
    except (RuntimeError, EOFError, ValueError) as e:  # torch's reader on a truncated or foreign file
        raise CheckpointError(f"{name}: not a complete checkpoint ({first_line(e, 200)})") from None


def _refused(error: Exception) -> str:
    """What torch's weights-only unpickler stopped at, as it says (the first one it met)."""
    text = str(error)
    for pattern in (r"GLOBAL ([\w.]+)", r"but got <class '([\w.]+)'>", r"unrecognized function <?([^>]+)>?"):
        found = re.search(pattern, text)
        if found:
            return f"'{found.group(1)}'"
    reason = next((line for line in text.splitlines() if "WeightsUnpickler error" in line), first_line(error, 200))
    return f"it ({reason.split('error: ', 1)[-1].strip()[:160]})"


def check_algorithm_reprs(checkpoint: Any, name: str) -> None:
    """Refuse a Composer checkpoint whose algorithm reprs would run more than a call with literal arguments.

    Composer 0.32.1 re-creates the checkpoint's ``required_on_load`` algorithms by evaluating
    ``eval(f"algorithms.{repr}")`` with the repr strings stored in it (``core/state.py:
    State._apply_required_algorithms``), so a checkpoint read as data would still run code there.
    Checked for every name Composer's algorithms module has, a superset of those it evaluates.
    """
    import composer.algorithms

    algorithms = checkpoint.get("state", {}).get("algorithms") if isinstance(checkpoint, dict) else None
    for entry in algorithms if isinstance(algorithms, list) else ():
        if not (isinstance(entry, tuple | list) and len(entry) == 2 and isinstance(entry[0], str)):
            continue  # Composer fails on it before evaluating anything
        algorithm, state = entry
        text = state.get("repr") if isinstance(state, dict) else None
        if hasattr(composer.algorithms, algorithm) and not _evaluates_to_a_plain_call(text, algorithm):
            raise UnsafeCheckpointError(name, f"evaluate its {algorithm} repr {str(text)[:80]!r}")


def _evaluates_to_a_plain_call(text: Any, algorithm: str) -> bool:
    """Whether Composer's ``eval(f"algorithms.{text}")`` would only call ``algorithms.<algorithm>`` with
    literal arguments, or fail to compile (then nothing runs: Composer warns and goes on)."""
    try:
        node = ast.parse(f"algorithms.{text}", mode="eval").body  # eval's own compiler
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return True

    def literal(value: ast.expr) -> bool:
        try:
            ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            return False
        return True

    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and (node.func.value.id, node.func.attr) == ("algorithms", algorithm)
        and all(literal(a) for a in node.args)
        and all(k.arg is not None and literal(k.value) for k in node.keywords)
    )


# --------------------------------------------------------------------------- writing and hygiene

_TEMP_PREFIX = TEMP_PREFIX  # storage.atomic_file's temporary names: what a killed write leaves
_TEMP_NAME = re.compile(rf"^{re.escape(_TEMP_PREFIX)}[0-9a-f]{{12}}-(?P<name>.+)$")


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with a torch checkpoint (zip format), or None where it is whole and its bytes are the
    ones written: a cut file has no readable central directory, and every member's CRC-32 (recorded by
    the zip writer) is checked, so a flipped byte inside a tensor shows. Reads the whole file once."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in archive.namelist()):
                return "not a torch checkpoint (no data.pkl)"
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return "not a complete checkpoint (a write cut short)"
    return None if bad is None else f"its bytes changed after it was written ({bad} fails its CRC-32)"


def is_complete(path: str | os.PathLike) -> bool:
    """Whether a torch checkpoint is whole and verified (:func:`checkpoint_problem`)."""
    return checkpoint_problem(path) is None


# Composer's default names (the recipe sets no other): rank 0 writes a run's monolithic checkpoints.
_CHECKPOINT_NAME = re.compile(r"^ep(\d+)-ba(?P<batch>\d+)-rank0\.pt$")
LATEST_CHECKPOINT = "latest-rank0.pt"  # a save folder's newest (Composer: a symlink locally, a .symlink file remotely)


def set_aside_partial_checkpoints(folder: str | os.PathLike) -> str | None:
    """Before autoresume looks into a local save folder: rename each checkpoint there that is not
    complete or whose bytes changed (:func:`checkpoint_problem`), and each temporary file a killed write
    left, to ``<name>.partial-<time>``, never deleting one, with a warning each; point Composer's
    ``latest-rank0.pt`` at the newest good checkpoint. Returns that checkpoint's path, or None
    (autoresume then starts from scratch, and says so).

    Why: Composer follows ``latest`` to resume and would load a corrupt checkpoint, then refuses to
    start (``FileExistsError`` from ``CheckpointSaver.fit_start``) while a file named like a later
    checkpoint exists, such as the one a full disk cut short.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    good: dict[str, int] = {}
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        temp = _TEMP_NAME.match(entry)
        name = temp.group("name") if temp else entry
        checkpoint = _CHECKPOINT_NAME.match(name)
        if (checkpoint is None and name != LATEST_CHECKPOINT) or os.path.islink(path) or not os.path.isfile(path):
            continue  # a link is Composer's latest: re-pointed below
        problem = "a temporary file of a write cut short" if temp else checkpoint_problem(path)
        if problem is None:
            if checkpoint is not None:
                good[path] = int(checkpoint.group("batch"))
            continue
        aside = _free_name(os.path.join(folder, f"{name}.partial-{stamp}"))
        os.rename(path, aside)
        log.warning("autoresume: %s: %s; set aside as %s", path, problem, aside)
    return _point_latest(folder, max(good, key=good.__getitem__, default=None))


def _point_latest(folder: str, newest: str | None) -> str | None:
    """Point ``latest-rank0.pt`` at ``newest`` (a plain-file copy of a good checkpoint is left as it is)."""
    latest = os.path.join(folder, LATEST_CHECKPOINT)
    if os.path.isfile(latest) and not os.path.islink(latest):
        return latest  # verified above: a copy Composer resumes from
    if newest is None:
        if os.path.islink(latest):
            os.remove(latest)  # a link to nothing good (the files it named are kept above)
        if os.listdir(folder):
            log.warning("autoresume: no complete checkpoint in %s: starting from scratch", folder)
        return None
    target = os.path.basename(newest)
    if not (os.path.islink(latest) and os.readlink(latest) == target):
        link = os.path.join(folder, f"{_TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{LATEST_CHECKPOINT}")
        os.symlink(target, link)  # relative, as Composer writes it
        os.replace(link, latest)
        log.warning("autoresume: %s now points at %s, the newest complete checkpoint", latest, target)
    return newest


def _free_name(path: str) -> str:
    candidate, n = path, 1
    while os.path.lexists(candidate):
        candidate, n = f"{path}-{n}", n + 1
    return candidate


# --------------------------------------------------------------------------- resuming with another config

_ABSENT, _UNKNOWN = object(), object()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "unset"
    if isinstance(value, list):
        return f"[{', '.join(_show(v) for v in value)}]"
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return str(value)


def first_math_change(
    recorded: dict[str, Any], current: dict[str, Any], accept: list[str] | tuple[str, ...] = ()
) -> tuple[str, Any, Any] | None:
    """The first key (in the config's order) whose value changes the training math from the config a
    checkpoint recorded to the current one, with both values (``unset`` where absent); None if none does.

    Which keys are training math is the schema's to say: every leaf whose role is not ``free``
    (``usi_composer/config/fields.py``) and that applies to the current run (its ``when``; e.g.
    ``data.local`` is only the shards' cache where ``data.remote`` is set). ``accept``: key paths whose
    change (or their children's) is accepted. A key the recorded config lacks because it was written
    before the key existed counts as its default; a key of a free-form field (``model.kwargs``, ...) that
    one side lacks counts as unset.
    """
    old, new = _flatten(recorded), _flatten(current)
    defaults = _flatten(config_to_dict(Config()))
    leaves = {leaf.key: leaf for leaf in leaf_fields(Config)}
    config = OmegaConf.create(current)  # what the leaves' `when` reads (cfg.data.remote, ...)

    def value(side: dict[str, Any], key: str) -> Any:
        if key in side:
            return side[key]
        if any(key.startswith(f"{d}.") for d in defaults):  # inside a free-form field: really absent
            return _ABSENT
        return defaults.get(key, _UNKNOWN)  # written before the key existed: its default

    def is_math(key: str) -> bool:
        leaf = leaves.get(key) or next((v for k, v in leaves.items() if key.startswith(f"{k}.")), None)
        return leaf is not None and leaf.role != FREE and leaf.applies(config)

    for key in [*new, *(k for k in old if k not in new)]:
        before, after = value(old, key), value(new, key)
        if before is _UNKNOWN or after is _UNKNOWN or before == after or not is_math(key):
            continue  # _UNKNOWN: a key this version's schema no longer has
        if not any(key == a or key.startswith(f"{a}.") for a in accept):
            return key, before, after
    return None


class ConfigRecord(Callback):
    """Stores the run's resolved config (secrets redacted) in every checkpoint, and refuses an autoresume
    from a checkpoint trained with other training math (:func:`first_math_change`).

    ``patches`` calls :meth:`check_resume` as Composer's autoresume finds its checkpoint, before any of
    it is loaded (Composer loads the model before the callbacks, so ``load_state_dict`` would be late).
    """

    def __init__(self, config: dict[str, Any], accept: list[str] | tuple[str, ...] = ()) -> None:
        self.config, self.accept = config, list(accept)

    def state_dict(self) -> dict[str, Any]:
        return {"config": self.config}

    def check_resume(self, checkpoint: Any, path: str) -> None:
        callbacks = checkpoint.get("state", {}).get("callbacks", {}) if isinstance(checkpoint, dict) else {}
        recorded = (callbacks.get(type(self).__qualname__) or {}).get("config")
        if recorded is None:
            log.warning("trainer.autoresume: %s records no config: resuming without checking it", path)
            return
        change = first_math_change(recorded, self.config, self.accept)
        if change is None:
            return
        key, before, after = change
        accept = ",".join([*self.accept, key])
        raise ConfigError(
            "trainer.autoresume",
            f"{key} is {_show(after)}, the checkpoint was trained with {_show(before)} (a change to the "
            f"training math); to continue with it anyway, add trainer.autoresume_accept=[{accept}]",
        )
