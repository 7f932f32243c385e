"""Validate both the EMA and the raw weights, keep the better (as the official USI code does).

Composer's ``EMA`` evaluates only the averaged weights. USI validates the raw weights too after
every epoch and keeps whichever scores higher: early in training, or with a short schedule, the
raw weights can be ahead of a slow average.
"""

from __future__ import annotations

import copy

import torch
from composer.algorithms import EMA
from composer.core import Callback, Event, State
from composer.core.precision import get_precision_context
from composer.loggers import Logger
from torch.nn.parallel import DistributedDataParallel

__all__ = ["BestOfEMAAndRaw"]


class BestOfEMAAndRaw(Callback):
    """After each evaluation of the EMA weights, evaluates the raw weights on the same evaluators.

    Logs, for each evaluator ``label`` (Composer logs the EMA weights' ``metrics/{label}/...``):

    - ``metrics/{label}_raw/{name}``: every metric of the raw (training) weights;
    - ``metrics/{label}_best/{metric}``: the better of the two on ``metric``;
    - ``metrics/{label}_best/is_ema``: 1 when the EMA weights are the better, else 0.

    ``best`` holds the latest comparison (``"ema"`` or ``"raw"``), ``scores`` the latest values
    per evaluator: ``{label: {"ema": ..., "raw": ...}}``. At the final evaluation of
    ``fit()``, if the raw weights are better, they are copied into the EMA's storage, so every
    later consumer of "the EMA weights" (Composer's final checkpoint, exported weights, eval)
    gets the better model.

    Args:
        metric: the metric compared, higher is better. Default ``"top1"``.
    """

    def __init__(self, metric: str = "top1") -> None:
        self.metric = metric
        self.best: str | None = None
        self.scores: dict[str, dict[str, float]] = {}

    def state_dict(self) -> dict:
        return {"metric": self.metric, "best": self.best, "scores": self.scores}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")
        self.scores = state.get("scores", {})

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.FIT_START and _ema(state) is None:
            raise ValueError("BestOfEMAAndRaw needs Composer's EMA algorithm in the trainer's algorithms")
        if event != Event.EVAL_AFTER_ALL or _ema(state) is None:
            return
        ema = _ema(state)
        if ema.ema_weights_active:  # only between EMA's eval swaps; not expected here
            return
        for evaluator in state.evaluators:
            label = evaluator.label
            ema_metrics = state.eval_metrics.get(label, {})
            if self.metric not in ema_metrics:
                continue
            raw = _evaluate(state, evaluator, ema_metrics)
            ema_value = float(ema_metrics[self.metric].compute())
            self.best = "ema" if ema_value >= raw[self.metric] else "raw"
            self.scores[label] = {"ema": ema_value, "raw": raw[self.metric]}
            logger.log_metrics({f"metrics/{label}_raw/{name}": value for name, value in raw.items()})
            logger.log_metrics(
                {
                    f"metrics/{label}_best/{self.metric}": max(ema_value, raw[self.metric]),
                    f"metrics/{label}_best/is_ema": float(self.best == "ema"),
                }
            )
        if self.best == "raw" and _training_done(state):
            _copy_raw_into_ema(state, ema)


def _ema(state: State) -> EMA | None:
    return next((a for a in state.algorithms if isinstance(a, EMA)), None)


def _training_done(state: State) -> bool:
    return state.max_duration is not None and state.timestamp.get(state.max_duration.unit) >= state.max_duration


def _evaluate(state: State, evaluator, template_metrics: dict) -> dict[str, float]:
    """The evaluator's metrics for the weights now in ``state.model`` (Composer's eval math)."""
    model = state.model.module if isinstance(state.model, DistributedDataParallel) else state.model
    metrics = {name: copy.deepcopy(m) for name, m in template_metrics.items()}
    for m in metrics.values():
        m.reset()
    data_spec = evaluator.dataloader
    limit = evaluator.subset_num_batches if evaluator.subset_num_batches is not None else -1
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i, batch in enumerate(data_spec.dataloader):
            if 0 <= limit <= i:
                break
            batch = data_spec.microbatch_transforms(state.device.batch_to_device(data_spec.batch_transforms(batch)))
            with get_precision_context(state.precision, state.precision_config):
                outputs = model.eval_forward(batch)
            for m in metrics.values():
                model.update_metric(batch, outputs, m)
    model.train(was_training)
    return {name: float(m.compute()) for name, m in metrics.items()}  # torchmetrics syncs across ranks


def _copy_raw_into_ema(state: State, ema: EMA) -> None:
    named = {**dict(state.model.named_parameters()), **dict(state.model.named_buffers())}
    stored = {**ema.ema_model.named_parameters_dict, **ema.ema_model.named_buffers_dict}
    with torch.no_grad():
        for name, tensor in stored.items():
            tensor.copy_(named[name].detach())
