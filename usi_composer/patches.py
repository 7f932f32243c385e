"""Overrides of private upstream APIs: the recipe's one place for them.

Each override says why it exists and which upstream version it was checked against; a guard
compares the installed function's signature with that version's at start-up and stops with one
line where it differs (or the function is gone), instead of training with a patch that no longer
fits. :func:`apply_patches` installs them all, idempotently; ``builders.build_trainer`` calls it.

Checked against Composer 0.32.1.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any

import composer
import composer.checkpoint.load
import composer.checkpoint.save
import composer.utils.checkpoint as composer_checkpoint
from composer.utils import dist, parse_uri

from usi_composer.checkpoints import ConfigRecord, atomic_file, check_algorithm_reprs, read_checkpoint
from usi_composer.errors import SetupError

__all__ = ["apply_patches", "trusting_checkpoints"]

CHECKED_AGAINST = "0.32.1"

# Whether Composer's checkpoint loads may unpickle in full (trainer.trust_checkpoints), for the
# Trainer being built in this context; outside it, loads are safe.
_TRUST = contextvars.ContextVar("usi_trust_checkpoints", default=False)


@contextlib.contextmanager
def trusting_checkpoints(trust: bool) -> Iterator[None]:
    """Composer's checkpoint loads inside this block unpickle in full if ``trust``, else as data."""
    token = _TRUST.set(trust)
    try:
        yield
    finally:
        _TRUST.reset(token)


# --------------------------------------------------------------------------- the overrides


def _torch_load_with_validation(checkpoint_filepath: Any, map_location: str) -> Any:
    """Why: Composer 0.32.1 reads every monolithic checkpoint (``load_path``, autoresume, FSDP monolith)
    with ``torch.load(weights_only=False)``: whoever can write the checkpoint folder runs code on the
    next resume. Here it is read as data (``checkpoints.read_checkpoint``: weights-only with the
    allow-list of what Composer checkpoints hold), and its algorithm reprs, which Composer evaluates,
    must be plain calls; ``trainer.trust_checkpoints`` restores Composer's full unpickling.
    Composer's CHECKPOINT_VALIDATION_FUNCTION hook (``_ensure_valid_checkpoint``) still runs first.
    """
    path = composer_checkpoint._ensure_valid_checkpoint(checkpoint_filepath)
    # Composer links a local checkpoint into a temporary folder: name the user's file, not the link.
    name = os.path.realpath(path) if os.path.islink(path) else str(path)
    trust = _TRUST.get()
    checkpoint = read_checkpoint(str(path), trust=trust, name=name, map_location=map_location)
    if not trust:
        check_algorithm_reprs(checkpoint, name)
    return checkpoint


def _write_checkpoint_file(state_dict: dict[str, Any], filename: str) -> None:
    """Why: Composer 0.32.1 writes a checkpoint in place, so a write that fails (a full disk) or is
    killed leaves a truncated file under a checkpoint's name, which later blocks autoresume. Here
    Composer's writer (any of its formats) writes a temporary file beside it, moved over the name
    once complete (``checkpoints.atomic_file``)."""
    with atomic_file(filename) as tmp:
        _ORIGINALS["_write_checkpoint_file"](state_dict, tmp)


def _get_autoresume_checkpoint(
    self: Any,
    save_folder: str,
    save_latest_filename: str,
    save_latest_remote_file_name: str,
    loggers: Any,
    load_progress_bar: bool,
) -> str | None:
    """Why, two things Composer 0.32.1's autoresume does not do:

    - Check the config. Composer loads its checkpoint whatever the current config says. Where the
      Trainer has a :class:`ConfigRecord` callback, the config the checkpoint recorded is compared with
      the current one here, as the checkpoint is found and before any of it is loaded
      (``State.load_state_dict`` loads the model before the callbacks). Read as data like the load.
    - Fetch a remote folder's latest checkpoint afresh. For a remote ``save_folder`` (``s3://b/run``),
      Composer downloads the bucket's latest checkpoint to ``./s3:/b/run/latest-rank0.pt``, relative
      to the working directory, and on the next autoresume finds that copy and resumes from it: the
      third run of a job resumes where the second started, then fails uploading a checkpoint the
      bucket has (``FileExistsError``). The download goes to this run's local checkpoint folder
      instead (the CheckpointSaver's fresh temporary one; rank 0's, so every node uses one path).
    """
    if parse_uri(save_folder)[0] and self._checkpoint_saver is not None:
        folder = [self._checkpoint_saver.folder]
        dist.broadcast_object_list(folder, src=0)
        save_folder = folder[0]
    path = _ORIGINALS["_get_autoresume_checkpoint"](
        self, save_folder, save_latest_filename, save_latest_remote_file_name, loggers, load_progress_bar
    )
    records = [c for c in self.state.callbacks if isinstance(c, ConfigRecord)]
    if path and records:
        name = os.path.realpath(path)
        checkpoint = read_checkpoint(path, trust=_TRUST.get(), name=name, mmap=True)  # its config alone
        for record in records:
            record.check_resume(checkpoint, name)
    return path


# --------------------------------------------------------------------------- guards and installation

# (owner, attribute, the signature in Composer 0.32.1, the override, other modules holding the same function)
_PATCHES: list[tuple[Any, str, str, Callable[..., Any] | None, tuple[Any, ...]]] = [
    (
        composer_checkpoint,
        "_torch_load_with_validation",
        "(checkpoint_filepath: 'Union[Path, str]', map_location: 'str') -> 'Any'",
        _torch_load_with_validation,
        (composer.checkpoint.load,),  # imported by name there (Composer's newer checkpoint API)
    ),
    (
        composer_checkpoint,
        "_ensure_valid_checkpoint",  # called, not replaced
        "(checkpoint_filepath: 'Union[Path, str]', specs: 'Optional[list[tuple[int, int]]]' = None) "
        "-> 'Union[Path, str]'",
        None,
        (),
    ),
    (
        composer_checkpoint,
        "_write_checkpoint_file",
        "(state_dict: 'dict[str, Any]', filename: 'str') -> 'None'",
        _write_checkpoint_file,
        (composer.checkpoint.save,),
    ),
    (
        composer.Trainer,
        "_get_autoresume_checkpoint",
        "(self, save_folder: 'str', save_latest_filename: 'str', save_latest_remote_file_name: 'str', "
        "loggers: 'Sequence[LoggerDestination]', load_progress_bar: 'bool') -> 'Optional[str]'",
        _get_autoresume_checkpoint,
        (),
    ),
]
_ORIGINALS: dict[str, Callable[..., Any]] = {}


def _owner_name(owner: Any) -> str:
    return owner.__name__ if inspect.ismodule(owner) else f"{owner.__module__}.{owner.__qualname__}"


def apply_patches() -> None:
    """Install every override (idempotent). Raises :class:`SetupError`, one line, where the installed
    Composer's function is missing or its signature is not the one the override was checked against."""
    for owner, attribute, expected, override, _ in _PATCHES:  # all checked before any is installed
        current = getattr(owner, attribute, None)
        if override is not None and current is override:
            continue  # installed already
        signature = str(inspect.signature(current)) if callable(current) else None
        if signature != expected:
            found = f"its signature is {signature}" if signature else "it is missing"
            raise SetupError(
                f"usi_composer/patches.py overrides {_owner_name(owner)}.{attribute}, checked against Composer "
                f"{CHECKED_AGAINST}; in the installed Composer {composer.__version__} {found}: install "
                f"mosaicml=={CHECKED_AGAINST} or update the override"
            )
    for owner, attribute, _, override, also in _PATCHES:
        current = getattr(owner, attribute)
        if override is None or current is override:
            continue
        _ORIGINALS[attribute] = current
        for holder in (owner, *also):
            if getattr(holder, attribute, None) is current:
                setattr(holder, attribute, override)
