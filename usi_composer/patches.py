"""Every use of a private upstream API the recipe makes, in one place.

Each is here for a reason Composer, streaming, torch or wandb does not cover, says which upstream
version it was checked against (:data:`CHECKED`), and is listed in :data:`PRIVATE_APIS` with the
parameters it has there. :func:`check_upstream` compares them with the installed libraries at
start-up (``apply_patches``, first in ``builders.build_trainer``) and stops with one line naming
the API and both versions where one moved, instead of training with an override that no longer
fits. What is here:

- ``Trainer``: Composer's Trainer without two per-step host syncs, and an autoresume that checks
  the config and fetches a remote folder's latest checkpoint afresh;
- Composer's checkpoint reader and writer, replaced (:func:`apply_patches`): checkpoints read as
  data, written atomically; and its node signal files, made per node;
- ``StreamingDatasetFixes``: streaming's dataset with each worker's epoch exposed and failed
  download threads counted out (a hang otherwise);
- :func:`wandb_logger_class`: Composer's ``WandBLogger``, with the command line redacted and
  wandb's removed ``Run.get_url`` restored;
- torch's ``maybe_mark_dynamic`` and the compiler's exception types (:func:`mark_dynamic`,
  :func:`compiler_exception`).

``usi_composer.algorithms`` (which must not depend on the recipe) keeps its own two: ``FusedEMA``
subclasses Composer's ``EMAParameters`` and calls ``EMA._should_start``, and uses torch's
``_foreach_*`` kernels. They are listed and checked here too.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import composer
import composer.checkpoint.load
import composer.checkpoint.save
import composer.utils.checkpoint as composer_checkpoint
import numpy as np
import torch
from composer.utils import dist, ensure_tuple, parse_uri
from streaming import StreamingDataset

from usi_composer.checkpoints import ConfigRecord, check_algorithm_reprs, read_checkpoint
from usi_composer.errors import SetupError
from usi_composer.storage import atomic_file

__all__ = [
    "CHECKED",
    "PRIVATE_APIS",
    "StreamingDatasetFixes",
    "Trainer",
    "apply_patches",
    "check_upstream",
    "compiler_exception",
    "mark_dynamic",
    "separate_node_signal_files",
    "trusting_checkpoints",
    "wandb_logger_class",
]

# The versions every entry below was read and tested against (the pinned lane).
CHECKED = {"composer": "0.32.1", "streaming": "0.13.0", "torch": "2.7.0", "wandb": "0.31.0", "numpy": "2.1.3"}
_DISTRIBUTIONS = {"composer": "mosaicml", "streaming": "mosaicml-streaming"}


@dataclass(frozen=True)
class PrivateAPI:
    """One private upstream function, method, class or module the recipe relies on."""

    library: str  # a key of CHECKED
    owner: str  # the module, or "module:Class", that holds it
    name: str
    parameters: str | None  # its parameter names in the checked version; None: only that it exists
    why: str  # where it is used, and why

    def problem(self) -> str | None:
        """What changed in the installed library, or None."""
        module, _, cls = self.owner.partition(":")
        try:
            holder = importlib.import_module(module)
            holder = getattr(holder, cls) if cls else holder
        except (ImportError, AttributeError):
            return f"{self.owner} is missing"
        target = getattr(holder, self.name, None)
        if target is None:
            return "it is missing"
        if self.parameters is None:
            return None
        found = _parameters(target)
        return None if found == self.parameters else f"its parameters are {found}, not {self.parameters}"


def _parameters(target: Any) -> str:
    function = target.__init__ if inspect.isclass(target) else target
    try:
        names = [p.name for p in inspect.signature(function).parameters.values()]
    except (TypeError, ValueError):  # a builtin without a signature
        return "(?)"
    return f"({', '.join(names)})"


PRIVATE_APIS: tuple[PrivateAPI, ...] = (
    PrivateAPI(
        "composer",
        "composer:Trainer",
        "_use_closures",
        "(self)",
        "Trainer below: torch's optimizers get no closure, whose loss.item() is a host sync between backward and step",
    ),
    PrivateAPI(
        "composer",
        "composer:Trainer",
        "_accumulate_time_across_ranks",
        "(self, num_samples, num_tokens, batch_time)",
        "Trainer below: one reduction of the batch's samples, tokens and time instead of three syncs",
    ),
    PrivateAPI(
        "composer",
        "composer:Trainer",
        "_get_autoresume_checkpoint",
        "(self, save_folder, save_latest_filename, save_latest_remote_file_name, loggers, load_progress_bar)",
        "Trainer below: autoresume checks the config, and fetches a remote folder's latest checkpoint afresh",
    ),
    PrivateAPI(
        "composer",
        "composer.utils.checkpoint",
        "_torch_load_with_validation",
        "(checkpoint_filepath, map_location)",
        "replaced by _torch_load_with_validation below: checkpoints are read as data",
    ),
    PrivateAPI(
        "composer",
        "composer.utils.checkpoint",
        "_ensure_valid_checkpoint",
        "(checkpoint_filepath, specs)",
        "called by the replacement above: Composer's own checkpoint validation hook still runs",
    ),
    PrivateAPI(
        "composer",
        "composer.utils.checkpoint",
        "_write_checkpoint_file",
        "(state_dict, filename)",
        "replaced by _write_checkpoint_file below: checkpoints are written atomically",
    ),
    PrivateAPI(
        "composer",
        "composer.utils.dist",
        "get_node_signal_file_name",
        "(rng)",
        "separate_node_signal_files below: nodes sharing a folder must not share a signal file",
    ),
    PrivateAPI(
        "composer",
        "composer.algorithms.ema.ema",
        "EMAParameters",
        "(self, model)",
        "algorithms/ema.py: FusedEMA's fused storage subclasses Composer's EMA storage",
    ),
    PrivateAPI(
        "composer",
        "composer.algorithms:EMA",
        "_should_start",
        "(self, state)",
        "algorithms/ema.py: FusedEMA starts averaging when Composer's EMA would",
    ),
    PrivateAPI(
        "streaming",
        "streaming:StreamingDataset",
        "_resume_incr_epoch",
        "(self)",
        "StreamingDatasetFixes below: where each loader worker learns the epoch it iterates (keyed draws)",
    ),
    PrivateAPI(
        "streaming",
        "streaming:StreamingDataset",
        "_prepare_thread",
        "(self, it)",
        "StreamingDatasetFixes below: a download thread that fails is counted out (else the epoch hangs)",
    ),
    PrivateAPI(
        "streaming",
        "streaming:StreamingDataset",
        "_ready_thread",
        "(self, it)",
        "StreamingDatasetFixes below: as _prepare_thread",
    ),
    PrivateAPI(
        "torch",
        "torch._dynamo",
        "maybe_mark_dynamic",
        "(t, index)",
        "mark_dynamic below: the eval batch dimension is dynamic, so the last, smaller batch compiles nothing",
    ),
    PrivateAPI(
        "torch",
        "torch._dynamo.exc",
        "BackendCompilerFailed",
        None,
        "compiler_exception below: a compile failure becomes one line naming the model",
    ),
    PrivateAPI(
        "torch",
        "torch",
        "_foreach_lerp_",
        None,
        "algorithms/ema.py: FusedEMA's update (also _foreach_mul_, _foreach_add_, _foreach_copy_)",
    ),
    PrivateAPI(
        "numpy",
        "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray",  # numpy 2, numpy 1
        "_reconstruct",
        None,
        "checkpoints.py: allow-listed for the numpy arrays (RNG state) in Composer checkpoints",
    ),
)
_WANDB = PrivateAPI(
    "wandb",
    "wandb.sdk.wandb_run:Run",
    "url",
    None,
    "WandBLogger below: Composer 0.32.1 calls Run.get_url(), which newer wandb replaced by Run.url",
)


def check_upstream(apis: tuple[PrivateAPI, ...] = PRIVATE_APIS) -> None:
    """Raise :class:`SetupError` (one line) for the first API in ``apis`` that moved in the installed library."""
    for api in apis:
        problem = api.problem()
        if problem is not None:
            checked, distribution = CHECKED[api.library], _DISTRIBUTIONS.get(api.library, api.library)
            raise SetupError(
                f"usi_composer/patches.py relies on {api.owner.replace(':', '.')}.{api.name}, checked against "
                f"{api.library} {checked}; in the installed {api.library} {_version(api.library)} {problem}: "
                f"install {distribution}=={checked}, or update the code PRIVATE_APIS names for it ({api.why})"
            )


def _version(library: str) -> str:
    try:
        return str(importlib.import_module(library).__version__)
    except (ImportError, AttributeError):
        return "(unknown version)"


# --------------------------------------------------------------------------- Composer's Trainer

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


# --------------------------------------------------------------------------- module-level replacements


def _torch_load_with_validation(checkpoint_filepath: Any, map_location: str) -> Any:
    """Composer 0.32.1 reads every monolithic checkpoint (``load_path``, autoresume, FSDP monolith)
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


# --------------------------------------------------------------------------- streaming


class StreamingDatasetFixes(StreamingDataset):
    """streaming's ``StreamingDataset`` (0.13.0) with two private hooks:

    - :meth:`on_epoch` is called in each loader worker at each epoch start, with the epoch it
      iterates, counted up from 0 or the checkpoint's on resume (streaming learns it in
      ``_resume_incr_epoch``, from its resume state in shared memory): the keyed draws need it;
    - streaming's download threads count themselves out (``it.on_exit()``) only when they return
      normally; one that raises is never counted, and the epoch's final ``it.exit()`` then waits
      forever. A failed thread is counted out too, so a dead server ends in an error, never a hang.
    """

    def on_epoch(self, epoch: int) -> None:
        """The epoch this worker process starts iterating (override)."""

    @property
    def parallel_world(self) -> Any:
        """streaming's view of the job (nodes, ranks per node, workers): ``_parallel_rank_world``."""
        world = getattr(self, "_parallel_rank_world", None)
        if world is None:
            raise SetupError(
                f"streaming {_version('streaming')}: StreamingDataset._parallel_rank_world is gone "
                f"(checked against {CHECKED['streaming']}); update usi_composer/patches.py"
            )
        return world

    def _resume_incr_epoch(self) -> tuple[int, int]:
        epoch, sample_in_epoch = super()._resume_incr_epoch()
        self.on_epoch(epoch)
        return epoch, sample_in_epoch

    def _prepare_thread(self, it: Any) -> None:
        try:
            super()._prepare_thread(it)
        except BaseException:
            it.on_exit()
            raise

    def _ready_thread(self, it: Any) -> None:
        try:
            super()._ready_thread(it)
        except BaseException:
            it.on_exit()
            raise


# --------------------------------------------------------------------------- wandb


def wandb_logger_class() -> type:
    """Composer's ``WandBLogger`` (imported only when W&B is configured), as the recipe needs it:

    - wandb records the command line in its run metadata: the arguments it sees at ``wandb.init``
      are redacted like the config (a global ``sys.argv`` swap around Composer's ``init``);
    - Composer 0.32.1's ``init`` calls ``wandb.run.get_url()``, which newer wandb releases removed
      in favour of the ``Run.url`` property (same value): the old name is restored where missing.
    """
    from composer.loggers import WandBLogger as ComposerWandBLogger
    from wandb.sdk.wandb_run import Run

    from usi_composer.redaction import redact_argv

    check_upstream((_WANDB,))
    if not hasattr(Run, "get_url"):
        Run.get_url = lambda self: self.url  # type: ignore[attr-defined]

    class WandBLogger(ComposerWandBLogger):
        def init(self, state: Any, logger: Any) -> None:
            argv = sys.argv
            sys.argv = [argv[0], *redact_argv(argv[1:])]
            try:
                super().init(state, logger)
            finally:
                sys.argv = argv

    return WandBLogger


# --------------------------------------------------------------------------- torch


def mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """torch's ``maybe_mark_dynamic`` (private ``torch._dynamo``): the compiled graph takes any size in
    ``dim``; a model that needs a fixed size gets a static graph and one more compile, not an error."""
    torch._dynamo.maybe_mark_dynamic(tensor, dim)


def compiler_exception(error: BaseException) -> BaseException | None:
    """The compiler's own exception inside ``error`` (dynamo wraps the backend's in its private
    ``BackendCompilerFailed``; a lazily compiled backward raises inductor's directly), else None."""
    from torch._dynamo.exc import BackendCompilerFailed

    seen: BaseException | None = error
    for _ in range(8):  # the chain of causes is short; bound it anyway
        if seen is None:
            return None
        if isinstance(seen, BackendCompilerFailed):
            return getattr(seen, "inner_exception", None) or seen
        if type(seen).__module__.startswith("torch._inductor"):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None
