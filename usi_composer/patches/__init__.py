"""Every use of a private upstream API the recipe makes, listed in one place.

Each is there for a reason Composer, streaming, torch or wandb does not cover, says which upstream
version it was checked against (:data:`CHECKED`), and is listed in :data:`PRIVATE_APIS` with the
parameters it has there. :func:`check_upstream` compares them with the installed libraries at
start-up (``apply_patches``, first in ``builders.build_trainer``) and stops with one line naming
the API and both versions where one moved, instead of training with an override that no longer
fits. The overrides live in one module per patched library:

- :mod:`~usi_composer.patches.trainer` (Composer): ``Trainer``, Composer's Trainer without two
  per-step host syncs, and an autoresume that checks the config and fetches a remote folder's latest
  checkpoint afresh; Composer's checkpoint reader and writer, replaced (``apply_patches``):
  checkpoints read as data, written atomically; and its node signal files, made per node;
- :mod:`~usi_composer.patches.streaming_dataset` (streaming): ``StreamingDatasetFixes``, streaming's
  dataset with each worker's epoch exposed and failed download threads counted out (a hang otherwise);
- :mod:`~usi_composer.patches.wandb_logger` (wandb): ``wandb_logger_class``, Composer's
  ``WandBLogger``, with the command line redacted and wandb's removed ``Run.get_url`` restored;
- :mod:`~usi_composer.patches.torch_compile` (torch): torch's ``maybe_mark_dynamic`` and the
  compiler's exception types (``mark_dynamic``, ``compiler_exception``).

``usi_composer.algorithms`` (which must not depend on the recipe) keeps its own two: ``FusedEMA``
subclasses Composer's ``EMAParameters`` and calls ``EMA._should_start``, and uses torch's
``_foreach_*`` kernels. They are listed and checked here too.

This module imports none of the patched libraries (it reads them only when checking), so a user of
one override imports that override's library alone: the data layer takes the streaming fixes
without Composer's Trainer or the checkpoint stack. The submodules are not named after the libraries
they patch (``torch``, ``wandb``): a submodule is also an attribute of this package, where it would
hide the library of the same name.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np

from usi_composer.errors import SetupError

__all__ = ["CHECKED", "PRIVATE_APIS", "WANDB_API", "PrivateAPI", "check_upstream", "installed_version"]

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
        "patches/trainer.py, Trainer: "
        "torch's optimizers get no closure, whose loss.item() is a host sync between backward and step",
    ),
    PrivateAPI(
        "composer",
        "composer:Trainer",
        "_accumulate_time_across_ranks",
        "(self, num_samples, num_tokens, batch_time)",
        "patches/trainer.py, Trainer: one reduction of the batch's samples, tokens and time instead of three syncs",
    ),
    PrivateAPI(
        "composer",
        "composer:Trainer",
        "_get_autoresume_checkpoint",
        "(self, save_folder, save_latest_filename, save_latest_remote_file_name, loggers, load_progress_bar)",
        "patches/trainer.py, Trainer: "
        "autoresume checks the config, and fetches a remote folder's latest checkpoint afresh",
    ),
    PrivateAPI(
        "composer",
        "composer.utils.checkpoint",
        "_torch_load_with_validation",
        "(checkpoint_filepath, map_location)",
        "replaced by _torch_load_with_validation in patches/trainer.py: checkpoints are read as data",
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
        "replaced by _write_checkpoint_file in patches/trainer.py: checkpoints are written atomically",
    ),
    PrivateAPI(
        "composer",
        "composer.utils.dist",
        "get_node_signal_file_name",
        "(rng)",
        "separate_node_signal_files in patches/trainer.py: nodes sharing a folder must not share a signal file",
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
        "patches/streaming_dataset.py, StreamingDatasetFixes: "
        "where each loader worker learns the epoch it iterates (keyed draws)",
    ),
    PrivateAPI(
        "streaming",
        "streaming:StreamingDataset",
        "_prepare_thread",
        "(self, it)",
        "patches/streaming_dataset.py, StreamingDatasetFixes: "
        "a download thread that fails is counted out (else the epoch hangs)",
    ),
    PrivateAPI(
        "streaming",
        "streaming:StreamingDataset",
        "_ready_thread",
        "(self, it)",
        "patches/streaming_dataset.py, StreamingDatasetFixes: as _prepare_thread",
    ),
    PrivateAPI(
        "torch",
        "torch._dynamo",
        "maybe_mark_dynamic",
        "(t, index)",
        "mark_dynamic in patches/torch_compile.py: "
        "the eval batch dimension is dynamic, so the last, smaller batch compiles nothing",
    ),
    PrivateAPI(
        "torch",
        "torch._dynamo.exc",
        "BackendCompilerFailed",
        None,
        "compiler_exception in patches/torch_compile.py: a compile failure becomes one line naming the model",
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
WANDB_API = PrivateAPI(
    "wandb",
    "wandb.sdk.wandb_run:Run",
    "url",
    None,
    "patches/wandb_logger.py, WandBLogger: Composer 0.32.1 calls Run.get_url(), which newer wandb replaced by Run.url",
)


def check_upstream(apis: tuple[PrivateAPI, ...] = PRIVATE_APIS) -> None:
    """Raise :class:`SetupError` (one line) for the first API in ``apis`` that moved in the installed library."""
    for api in apis:
        problem = api.problem()
        if problem is not None:
            checked, distribution = CHECKED[api.library], _DISTRIBUTIONS.get(api.library, api.library)
            raise SetupError(
                f"usi_composer/patches relies on {api.owner.replace(':', '.')}.{api.name}, checked against "
                f"{api.library} {checked}; in the installed {api.library} {installed_version(api.library)} {problem}: "
                f"install {distribution}=={checked}, or update the code PRIVATE_APIS names for it ({api.why})"
            )


def installed_version(library: str) -> str:
    try:
        return str(importlib.import_module(library).__version__)
    except (ImportError, AttributeError):
        return "(unknown version)"
