"""``trainer.compile``: whether student and teacher are compiled, the eval batch that reuses one
graph, the compile time (logged once) and a compile failure as one line.

Composer compiles the student (``Trainer(compile_config=...)``); ``build_teacher(compile=True)``
compiles the teacher in place. Both compile at their first call, in the first training batch
(student forward and backward, teacher forward); the student's eval graph compiles at the first
evaluation. Nothing recompiles after that: training batches have one size (``drop_last``), eval
batches are marked dynamic in the batch dimension (:func:`mark_batch_dynamic`), and swapping the
EMA and raw weights copies values into the same parameters, which dynamo does not guard on.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from torch import nn

from usi_composer.errors import UsiError, reason
from usi_composer.patches.torch_compile import compiler_exception, mark_dynamic

__all__ = ["CompileError", "CompileTime", "compile_failure", "mark_batch_dynamic"]

log = logging.getLogger(__name__)


class CompileError(UsiError, RuntimeError):
    """Compiling the student or the teacher failed; the message names it and the option to turn off."""


def mark_batch_dynamic(batch: Any) -> Any:
    """Mark the batch dimension of an eval batch's inputs dynamic, so the eval graph is compiled for
    any batch size and the last, smaller batch reuses it instead of compiling another.

    Marked on every eval batch (before the first compile of the eval graph, which is what counts).
    ``maybe_mark_dynamic``: a model that needs a fixed batch size gets a static graph and one more
    compile for the last batch, instead of an error. Two cases still compile one more graph: a last
    batch of exactly one sample (dynamo specializes sizes 0 and 1), and, on the CPU only, a conv net
    whose eval batch is 16 or more with a last batch below 16 (the CPU conv backend, mkldnn or not,
    is chosen by batch size, which splits the graph at 16).
    """
    inputs = batch[0]
    if isinstance(inputs, torch.Tensor) and inputs.ndim > 0:
        mark_dynamic(inputs, 0)
    return batch


class CompileTime(Callback):
    """Logs the wall time of the first training batch, where student and teacher compile, once:
    to Python logging and as ``time/compile`` (seconds) to Composer's loggers.

    It includes that batch's own step (small next to compiling); the eval graph compiles at the
    first evaluation and is not included.
    """

    def __init__(self, models: str) -> None:
        self.models = models
        self._start: float | None = None
        self._logged = False

    def batch_start(self, state: State, logger: Logger) -> None:
        if self._start is None:
            self._start = time.perf_counter()

    def batch_end(self, state: State, logger: Logger) -> None:
        if self._logged or self._start is None:
            return
        seconds = time.perf_counter() - self._start
        log.info("compiled %s in the first batch: %.1f s (including the batch's step)", self.models, seconds)
        logger.log_metrics({"time/compile": seconds})
        self._logged = True


def compile_failure(error: BaseException, student: str, teacher: tuple[str, nn.Module] | None) -> CompileError | None:
    """A :class:`CompileError` naming the model whose compilation raised ``error``, else ``None``
    (``error`` is not a compilation failure).

    ``student``: the student's name. ``teacher``: its name and the module given to the algorithm;
    the failure is the teacher's when that module's call is on the traceback. The student's
    backward compiles lazily, outside any module call: everything else is the student's.
    """
    cause = compiler_exception(error)
    if cause is None:
        return None
    which = f"the student '{student}'"
    if teacher is not None:
        frames = (frame for frame, _ in traceback.walk_tb(error.__traceback__))
        if any(frame.f_locals.get("self") is teacher[1] for frame in frames):
            which = f"the teacher '{teacher[0]}'"
    return CompileError(
        f"compiling {which} failed ({reason(cause)}); set trainer.compile=false to train without compilation"
    )
