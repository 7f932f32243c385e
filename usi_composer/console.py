"""What a training run says to the person running it: the recipe's console, in place of Composer's.

On a terminal, one progress bar for the whole run (batches, loss, learning rate, images per second)
with a line above it after each evaluation. In a log file (not a terminal), plain lines: one every
``trainer.log_interval`` and at each epoch's end (epoch and batch, total/CE/KD loss, LR, img/s, ETA),
one after each evaluation (EMA, raw and best top-1/top-5), and a last one when the run ends. No
escape codes, nothing on stderr (warnings and errors go there), no Composer "Config:" block.

It reads only what the run logs anyway (Composer's loss, ``LRMonitor``, ``SpeedMonitor``,
``KnowledgeDistillation``'s CE/KD means, the evaluation metrics and ``BestOfEMAAndRaw``'s choice):
it adds no read of a device value to the step.
"""

from __future__ import annotations

import datetime
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import torch
from composer.core import Event, State, TimeUnit
from composer.loggers import LoggerDestination
from composer.utils import create_interval_scheduler, dist

__all__ = ["TrainingConsole", "show_library_logs", "total_batches"]


def total_batches(state: State) -> int | None:
    """The batches the whole run trains, where its duration says (None for a duration in samples or time)."""
    duration, per_epoch = state.max_duration, state.dataloader_len
    if duration is None:
        return None
    if duration.unit == TimeUnit.BATCH:
        return int(duration.value)
    if duration.unit == TimeUnit.EPOCH and per_epoch is not None:
        return int(duration.value) * int(per_epoch)
    return None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(seconds)))


class TrainingConsole(LoggerDestination):
    """The run's console (see the module's doc). ``label``: what the lines are about (the demo names its
    stages); ``log_interval``: a Composer time string for the plain lines, None for only the last line;
    ``bar``: a progress bar where ``stream`` is a terminal; ``losses``: show the loss and LR (not for
    ``usi-cache-teacher``, which trains no student). Rank 0 speaks; the other ranks stay quiet."""

    def __init__(
        self,
        label: str = "train",
        log_interval: str | None = "100ba",
        bar: bool = True,
        stream: TextIO | None = None,
        losses: bool = True,
    ) -> None:
        self.label, self.stream, self.losses = label, stream if stream is not None else sys.stdout, losses
        self._every: Callable[[State, Event], bool] | None = None
        if log_interval is not None:
            self._every = create_interval_scheduler(
                log_interval, checkpoint_events=False, include_end_of_training=False
            )
        self._want_bar, self._bar = bar, None
        self._values: dict[str, float] = {}
        self._eval: dict[str, float] = {}  # the evaluation not yet reported
        self._last_top1: float | None = None
        self._start, self._first_batch, self._first_sample, self._total = 0.0, 0, 0, None

    # ------------------------------------------------------------------ what the run logs
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for name, value in metrics.items():
            evaluation = name.startswith("metrics/eval")
            if evaluation and isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()  # Composer logs computed metrics as tensors; read once per evaluation
            if isinstance(value, int | float):
                (self._eval if evaluation else self._values)[name] = float(value)

    # ------------------------------------------------------------------ events
    def fit_start(self, state: State, logger: Any) -> None:
        self._start, self._first_batch = time.perf_counter(), int(state.timestamp.batch)
        self._first_sample = int(state.timestamp.sample)
        self._total = total_batches(state)
        if self._want_bar and _isatty(self.stream) and dist.get_global_rank() == 0:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self._total, initial=self._first_batch, desc=self.label, unit="ba", file=self.stream, leave=True
            )

    def batch_end(self, state: State, logger: Any) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(self._short(state), refresh=False)
            return
        last_of_epoch = state.dataloader_len is not None and state.timestamp.batch_in_epoch >= state.dataloader_len
        if self._every is not None and self._every(state, Event.BATCH_END) and not last_of_epoch:
            self._say(self._progress(state, f"epoch {int(state.timestamp.epoch) + 1}"))  # the epoch's own line next

    def epoch_end(self, state: State, logger: Any) -> None:
        if self._bar is None and self._every is not None:  # the epoch counter has moved on already
            self._say(self._progress(state, f"epoch {int(state.timestamp.epoch)} done"))

    def batch_checkpoint(self, state: State, logger: Any) -> None:
        self._report_evaluation(state)  # after the batch's evaluation, whose best is logged at its very end

    def epoch_checkpoint(self, state: State, logger: Any) -> None:
        self._report_evaluation(state)

    def fit_end(self, state: State, logger: Any) -> None:
        self._report_evaluation(state)
        done = int(state.timestamp.batch) - self._first_batch
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        facts = "".join(f", {text}" for text in (self._loss(), self._speed(state), self._top1()) if text)
        self._say(f"{self.label}: {done} batch{'es' if done != 1 else ''} in {self._elapsed()}{facts}")

    def close(self, state: State, logger: Any) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------ lines
    def _say(self, line: str) -> None:
        if dist.get_global_rank() != 0:
            return
        if self._bar is not None:
            self._bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _elapsed(self) -> str:
        return _clock(time.perf_counter() - self._start)

    def _loss(self) -> str:
        total = self._values.get("loss/train/total")
        if total is None or not self.losses:
            return ""
        parts = [
            f"{name} {self._values[f'loss/train/{name}']:.4f}"
            for name in ("ce", "kd")
            if f"loss/train/{name}" in self._values
        ]
        return f"loss {total:.4f}" + (f" ({', '.join(parts)})" if parts else "")

    def _lr(self) -> str:
        rates = [value for name, value in self._values.items() if name.startswith("lr-") and self.losses]
        return f"lr {rates[0]:.3g}" if rates else ""

    def _speed(self, state: State) -> str:
        """Images per second since the run (or its resumption) started, by the wall clock."""
        seconds = time.perf_counter() - self._start
        samples = int(state.timestamp.sample) - self._first_sample
        return f"{samples / seconds:,.0f} img/s" if seconds > 0 and samples > 0 else ""

    def _top1(self) -> str:
        return f"top-1 {self._last_top1:.2%}" if self._last_top1 is not None else ""

    def _short(self, state: State) -> str:
        return ", ".join(text for text in (self._loss(), self._lr(), self._speed(state), self._top1()) if text)

    def _progress(self, state: State, epoch: str) -> str:
        batch, done = int(state.timestamp.batch), int(state.timestamp.batch) - self._first_batch
        of = f"/{self._total}" if self._total else ""
        eta = ""
        if self._total and done:
            seconds = (time.perf_counter() - self._start) / done * (self._total - batch)
            eta = f"eta {_clock(seconds)}"
        parts = [epoch, f"batch {batch}{of}", self._loss(), self._lr(), self._speed(state), eta]
        return "  ".join(part for part in parts if part)

    def _report_evaluation(self, state: State) -> None:
        if not self._eval:
            return
        ev, self._eval = self._eval, {}
        when = f"batch {int(state.timestamp.batch)} (epoch {int(state.timestamp.epoch)})"
        rows = [self._scores(ev, "metrics/eval", "EMA " if "metrics/eval_raw/top1" in ev else "")]
        if "metrics/eval_raw/top1" in ev:
            rows.append(self._scores(ev, "metrics/eval_raw", "raw "))
        if "metrics/eval_best/top1" in ev:
            kept = "EMA" if ev.get("metrics/eval_best/is_ema", 1.0) else "raw"
            rows.append(f"best {ev['metrics/eval_best/top1']:.2%} ({kept})")
        self._last_top1 = ev.get("metrics/eval_best/top1", ev.get("metrics/eval/top1"))
        if self._every is not None:  # log_interval None: only the run's last line, which carries this top-1
            self._say(f"eval after {when}: {'; '.join(rows)}")

    @staticmethod
    def _scores(ev: dict[str, float], prefix: str, weights: str) -> str:
        top5 = f", top-5 {ev[f'{prefix}/top5']:.2%}" if f"{prefix}/top5" in ev else ""
        return f"{weights}top-1 {ev.get(f'{prefix}/top1', float('nan')):.2%}{top5}"


class _Stdout(logging.StreamHandler):
    """A handler on whatever ``sys.stdout`` is when a line is written (a test's capture, a redirect)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


class _LibraryInfo(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        # the recipe's INFO lines; warnings and errors: the root's other handler, on stderr
        return record.name.startswith("usi_composer") and record.levelno < logging.WARNING


def show_library_logs(stream: TextIO | None = None) -> None:
    """The recipe's own INFO lines (what was loaded: the student's and the teacher's weights, which entry,
    or the teacher cache read instead; what each model is built for) on ``stream`` (stdout), plain and
    redacted; warnings stay on stderr. For a command-line tool; idempotent."""
    from usi_composer import redaction

    redaction.install()  # the root's stderr handler (warnings and errors)
    root = logging.getLogger()
    for handler in root.handlers:
        if handler.level == logging.NOTSET:
            handler.setLevel(logging.WARNING)
    if not any(getattr(handler, "usi_console", False) for handler in root.handlers):
        console = logging.StreamHandler(stream) if stream is not None else _Stdout()
        console.setFormatter(logging.Formatter("%(message)s"))
        console.addFilter(_LibraryInfo())
        console.usi_console = True  # type: ignore[attr-defined]
        root.addHandler(console)
        redaction.install()  # its redacting filter on the new handler too
    logging.getLogger("usi_composer").setLevel(logging.INFO)
