"""Composer's overrides: the recipe's ``Trainer`` (two per-step host syncs removed, a safer autoresume),
Composer's checkpoint reader and writer replaced (read as data, written atomically: :func:`apply_patches`)
and its node signal files made per node. Each private API used here is listed in
:data:`usi_composer.patches.PRIVATE_APIS`."""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import composer
import composer.checkpoint.load
import composer.checkpoint.save
import composer.utils.checkpoint as composer_checkpoint
import torch
from composer.utils import dist, ensure_tuple, parse_uri

from usi_composer.checkpoints import ConfigRecord, check_algorithm_reprs, checkpoint_problem, read_checkpoint
from usi_composer.errors import CheckpointError
from usi_composer.patches import check_upstream
from usi_composer.storage import atomic_file

__all__ = [
    "CLOSURE_FREE_OPTIMIZERS",
    "Trainer",
    "apply_patches",
    "separate_node_signal_files",
    "trusting_checkpoints",
]

# Whether Composer's checkpoint loads may unpickle in full (trainer.trust_checkpoints), for the
# Trainer being built in this context; outside it, loads are safe.
_TRUST = contextvars.ContextVar("usi_trust_checkpoints", default=False)

# torch's optimizers that call a closure only to return its loss: stepping them without one changes
# nothing (LBFGS, which evaluates the closure again and again, is not among them).
CLOSURE_FREE_OPTIMIZERS = (
    torch.optim.Adadelta,
    torch.optim.Adagrad,
    torch.optim.Adam,
    torch.optim.Adamax,
    torch.optim.AdamW,
    torch.optim.ASGD,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Rprop,
    torch.optim.SGD,
)


@contextlib.contextmanager
def trusting_checkpoints(trust: bool) -> Iterator[None]:
    """Composer's checkpoint loads inside this block unpickle in full if ``trust``, else as data."""
    token = _TRUST.set(trust)
    try:
        yield
    finally:
        _TRUST.reset(token)


class Trainer(composer.Trainer):
    """``composer.Trainer`` with two per-step host syncs removed and a safer autoresume.

    Every ``.item()`` on a GPU tensor waits for the queue of kernels to drain, and the CPU cannot
    queue the next kernels meanwhile. Composer 0.32's step reads values back nine times; two of
    those reads are not needed by this recipe, and nothing Composer offers turns them off:

    - the optimizer closure ends in ``loss.item()``, a wait between the backward pass and the
      optimizer step. The optimizers in :data:`CLOSURE_FREE_OPTIMIZERS` only call a closure to
      return its loss, so they run without one, as Composer itself does under fp16 AMP;
    - the sample/token/time accounting moves three numbers to the device, reduces them over the
      ranks and reads each back (three waits). With one process there is nothing to reduce; with
      several, one reduction of the three numbers and one read do.

    What stays: the end-of-data flag, the batch size and the logged loss (three reads, the same
    count as timm's loop); ``tests/test_benchmarks.py`` pins the count.
    """

    def _use_closures(self) -> bool:
        optimizers = ensure_tuple(self.state.optimizers)
        if optimizers and all(type(o) in CLOSURE_FREE_OPTIMIZERS for o in optimizers):
            return False
        return super()._use_closures()

    def _accumulate_time_across_ranks(
        self, num_samples: int | float, num_tokens: int, batch_time: datetime.timedelta
    ) -> tuple[int, int, datetime.timedelta]:
        if isinstance(num_samples, float):  # sequence parallelism: Composer's own checks
            return super()._accumulate_time_across_ranks(num_samples, num_tokens, batch_time)
        if dist.get_world_size() == 1:
            return int(num_samples), int(num_tokens), batch_time
        # Samples and tokens are summed over the ranks, the batch time is rank 0's: one reduction.
        seconds = batch_time.total_seconds() if dist.get_global_rank() == 0 else 0.0
        values = self.state.device.tensor_to_device(
            torch.tensor([num_samples, num_tokens, seconds], dtype=torch.float64)
        )
        dist.all_reduce(values, reduce_operation="SUM")
        samples, tokens, seconds = values.tolist()
        return round(samples), round(tokens), datetime.timedelta(seconds=seconds)

    def _get_autoresume_checkpoint(
        self,
        save_folder: str,
        save_latest_filename: str,
        save_latest_remote_file_name: str,
        loggers: Any,
        load_progress_bar: bool,
    ) -> str | None:
        """Two things Composer 0.32.1's autoresume does not do:

        - Check the config. Composer loads its checkpoint whatever the current config says. Where
          the Trainer has a :class:`ConfigRecord` callback, the config the checkpoint recorded is
          compared with the current one here, as the checkpoint is found and before any of it is
          loaded (``State.load_state_dict`` loads the model before the callbacks). Read as data.
        - Fetch a remote folder's latest checkpoint afresh. For a remote ``save_folder``
          (``s3://b/run``), Composer downloads the bucket's latest checkpoint to
          ``./s3:/b/run/latest-rank0.pt``, relative to the working directory, and on the next
          autoresume finds that copy and resumes from it: the third run of a job resumes where
          the second started, then fails uploading a checkpoint the bucket has
          (``FileExistsError``). The download goes to this run's local checkpoint folder instead
          (the CheckpointSaver's fresh temporary one; rank 0's, so every node uses one path).
        """
        if parse_uri(save_folder)[0] and self._checkpoint_saver is not None:
            folder = [self._checkpoint_saver.folder]
            dist.broadcast_object_list(folder, src=0)
            save_folder = folder[0]
        path = super()._get_autoresume_checkpoint(
            save_folder, save_latest_filename, save_latest_remote_file_name, loggers, load_progress_bar
        )
        records = [c for c in self.state.callbacks if isinstance(c, ConfigRecord)]
        if path and records:
            name = os.path.realpath(path)
            checkpoint = read_checkpoint(path, trust=_TRUST.get(), name=name, mmap=True)  # its config alone
            for record in records:
                record.check_resume(checkpoint, name)
        return path


def _torch_load_with_validation(checkpoint_filepath: Any, map_location: str) -> Any:
    """Composer 0.32.1 reads every monolithic checkpoint (``load_path``, autoresume, FSDP monolith)
    with ``torch.load(weights_only=False)``: whoever can write the checkpoint folder runs code on the
    next resume. Here it is read as data (``checkpoints.read_checkpoint``: weights-only with the
    allow-list of what Composer checkpoints hold), and its algorithm reprs, which Composer evaluates,
    must be plain calls; ``trainer.trust_checkpoints`` restores Composer's full unpickling.
    Composer's CHECKPOINT_VALIDATION_FUNCTION hook (``_ensure_valid_checkpoint``) still runs first, then
    the zip's CRCs are verified (``checkpoints.checkpoint_problem``).
    """
    path = composer_checkpoint._ensure_valid_checkpoint(checkpoint_filepath)
    # Composer links a local checkpoint into a temporary folder: name the user's file, not the link.
    name = os.path.realpath(path) if os.path.islink(path) else str(path)
    if zipfile.is_zipfile(path) and (problem := checkpoint_problem(path)) is not None:
        raise CheckpointError(f"{name}: {problem}")  # its CRCs: never resume from other bytes than written
    trust = _TRUST.get()
    checkpoint = read_checkpoint(str(path), trust=trust, name=name, map_location=map_location)
    if not trust:
        check_algorithm_reprs(checkpoint, name)
    return checkpoint


def _write_checkpoint_file(state_dict: dict[str, Any], filename: str) -> None:
    """Composer 0.32.1 writes a checkpoint in place, so a write that fails (a full disk) or is killed
    leaves a truncated file under a checkpoint's name, which later blocks autoresume. Here Composer's
    writer (any of its formats) writes a temporary file beside it, moved over the name once complete
    (``storage.atomic_file``)."""
    with atomic_file(filename) as tmp:
        _ORIGINALS["_write_checkpoint_file"](state_dict, tmp)


# (module, name, replacement, other modules that imported the same function by name)
_REPLACEMENTS: tuple[tuple[Any, str, Callable[..., Any], tuple[Any, ...]], ...] = (
    (composer_checkpoint, "_torch_load_with_validation", _torch_load_with_validation, (composer.checkpoint.load,)),
    (composer_checkpoint, "_write_checkpoint_file", _write_checkpoint_file, (composer.checkpoint.save,)),
)
_ORIGINALS: dict[str, Callable[..., Any]] = {}


def apply_patches() -> None:
    """Check every private API (:func:`check_upstream`), then install the module-level replacements
    (idempotent). Raises :class:`SetupError`, one line, where the installed libraries moved."""
    check_upstream()
    for module, name, replacement, also in _REPLACEMENTS:
        current = getattr(module, name)
        if current is replacement:
            continue
        _ORIGINALS[name] = current
        for holder in (module, *also):
            if getattr(holder, name, None) is current:
                setattr(holder, name, replacement)


def separate_node_signal_files() -> None:
    """Give each node its own name for Composer's node signal files (idempotent).

    Composer 0.32 syncs the ranks of a node through a file that local rank 0 creates and later
    removes, named by global rank 0 (``._signal_file_node0_<random>``) for every node. Where nodes
    share the folder (autoresume's local checkpoint folder on NFS/Lustre, or under a shared working
    directory when save_folder is an object store), each node removes the same file and all but
    the first crash with FileNotFoundError (mosaicml/llm-foundry#1736). The node rank appended
    here keeps the file shared by the ranks of one node and separate between nodes.
    """
    shared_name = dist.get_node_signal_file_name
    if getattr(shared_name, "per_node", False):
        return

    def get_node_signal_file_name(rng: Any = None) -> str:
        return f"{shared_name(rng)}_{dist.get_node_rank()}"

    get_node_signal_file_name.per_node = True  # type: ignore[attr-defined]
    dist.get_node_signal_file_name = get_node_signal_file_name
