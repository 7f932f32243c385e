"""Composer's ``EMA`` with a fused update: a few multi-tensor kernels per step, no per-tensor loop.

Composer's ``EMA`` updates the average one tensor at a time in Python (several kernels per
tensor, ~320 tensors for a ResNet-50: ~19 ms a step on an H100) and, under FSDP, all-gathers the
whole model every step (``summon_full_params``). ``FusedEMA`` keeps Composer's algorithm (its
events, eval and checkpoint swaps, state and attributes; ``isinstance(x, EMA)`` holds) and
replaces the storage of the average:

- the update is one ``torch._foreach_lerp_`` over the parameters, one ``_foreach_mul_`` +
  ``_foreach_add_`` over the float buffers and one ``_foreach_copy_`` of the integer buffers
  (BN's ``num_batches_tracked``), per device and dtype, on tensor lists bound once per fit and
  eval, never per step, and without host syncs;
- under FSDP (v1, ``use_orig_params=True``, Composer's default) each rank averages, swaps and
  copies its own shard in place, with no communication; only checkpoints gather (and, on load,
  scatter) the full tensors, so a checkpoint holds the same full, rank-independent tensors as
  Composer's ``EMA`` writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from composer.algorithms import EMA

# Private to Composer (checked against 0.32.1, as EMA._should_start and torch's _foreach_* kernels
# below): the recipe's start-up check lists and guards them (usi_composer/patches/__init__.py: PRIVATE_APIS).
from composer.algorithms.ema.ema import EMAParameters
from composer.core import Event, State
from composer.loggers import Logger
from composer.utils import misc

from ._hparams import Range, declare_ranges

__all__ = ["FusedEMA"]

_Pairs = list[tuple[list[torch.Tensor], list[torch.Tensor]]]  # (averages, live tensors) per device/dtype


class FusedEMA(EMA):
    r"""Exponential moving average of the weights, evaluated in place of the training weights.

    A drop-in for :class:`composer.algorithms.EMA` (same arguments, meaning and behaviour):
    ``W_ema <- smoothing * W_ema + (1 - smoothing) * W`` every ``update_interval``, with
    ``smoothing = 2 ** -(update_interval / half_life)`` when ``half_life`` is given. Evaluation
    and checkpoints see the EMA weights; training continues from the raw weights.

    Differences from Composer's ``EMA``: the update is fused (see the module docstring); under
    FSDP nothing is all-gathered per step; integer buffers (BN's ``num_batches_tracked``) are
    copied, not averaged and truncated; ``EMA(half_life=None, smoothing=s)`` works without an
    ``update_interval`` (it defaults to ``"1ba"``).

    Args:
        half_life: time string of the half-life of the average, e.g. ``"1000ba"``; or ``None``
            with ``smoothing``.
        smoothing: per-update weight of the old average, in ``(0, 1)``; excludes ``half_life``.
        ema_start: time string, how much training runs before averaging starts.
        update_interval: time string, how often the average is updated; defaults to one unit of
            ``half_life``, or ``"1ba"`` with ``smoothing``.

    ``ValueError`` for a ``smoothing`` outside ``FusedEMA.ranges``, ``(0, 1)`` (Composer's ``EMA``
    does not check it; at 1 the average never moves, at 0 it is the raw weights).
    """

    ranges = declare_ranges(smoothing=Range.open(0, 1))

    def __init__(
        self,
        half_life: str | None = "1000ba",
        smoothing: float | None = None,
        ema_start: str = "0.0dur",
        update_interval: str | None = None,
    ) -> None:
        if smoothing is not None:
            self.ranges["smoothing"].check("smoothing", smoothing)
        if half_life is None and update_interval is None:
            update_interval = "1ba"  # Composer's EMA reads the unset half_life here and crashes
        super().__init__(half_life, smoothing, ema_start, update_interval)
        if half_life is None:
            self.half_life = None
        self._args = dict(
            half_life=half_life, smoothing=smoothing, ema_start=ema_start, update_interval=update_interval
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self._args.items())})"

    def match(self, event: Event, state: State) -> bool:
        # Start as Composer does, with our storage (Composer's would summon full FSDP params)
        if event == self.update_event and not self.ema_started and self._should_start(state):
            self.ema_model = FusedEMAParameters(state.model)
            self.ema_started = True
        return super().match(event, state)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self.ema_model = FusedEMAParameters(state.model)  # a checkpoint can load into it
        elif event in (Event.BATCH_END, Event.EPOCH_END):  # only the update event matches
            assert isinstance(self.ema_model, FusedEMAParameters)
            self.ema_model.update(state.model, self.smoothing)
        else:  # device moves (our rebinding), eval and checkpoint swaps: Composer's logic
            super().apply(event, state, logger)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if isinstance(self.ema_model, FusedEMAParameters):
            params, buffers = self.ema_model.full_dicts()
            state["ema_model"] = {"named_parameters_dict": params, "named_buffers_dict": buffers}
        return state

    def load_state_dict(self, state: dict[str, Any], strict: bool = False) -> None:
        super().load_state_dict(state, strict)
        loaded = self.ema_model
        if loaded is not None and not isinstance(loaded, FusedEMAParameters):
            self.ema_model = FusedEMAParameters.from_full(loaded.named_parameters_dict, loaded.named_buffers_dict)


class FusedEMAParameters(EMAParameters):
    """The averaged tensors (``named_parameters_dict``, ``named_buffers_dict``, as Composer's),
    bound by name to the live model's tensors as lists for the ``torch._foreach_*`` kernels.

    Under FSDP the tensors are this rank's shards: the flat 1-D views FSDP (``use_orig_params``)
    gives each parameter outside forward/backward. Names are ``model.named_parameters()``'s.
    """

    def __init__(self, model: torch.nn.Module | None) -> None:
        self.named_parameters_dict: dict[str, torch.Tensor] = {}
        self.named_buffers_dict: dict[str, torch.Tensor] = {}
        self._model: torch.nn.Module | None = None  # the model the lists below belong to
        self._params: _Pairs = []
        self._float_buffers: _Pairs = []
        self._other_buffers: _Pairs = []
        self._full = False  # holds full tensors from a checkpoint; under FSDP, scattered at binding
        self._sharded = False  # holds this rank's FSDP shards
        if model is not None:
            self._copy_local(model)

    @torch.no_grad()
    def _copy_local(self, model: torch.nn.Module) -> None:
        """The model's own tensors (under FSDP, this rank's shards): no summon_full_params."""
        self.named_parameters_dict = {n: p.detach().clone() for n, p in _params(model)}
        self.named_buffers_dict = {n: b.detach().clone() for n, b in model.named_buffers()}
        self._sharded = _is_fsdp(model)

    @classmethod
    def from_full(cls, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> FusedEMAParameters:
        shadow = cls(None)
        shadow.named_parameters_dict, shadow.named_buffers_dict = dict(params), dict(buffers)
        shadow._full = True
        return shadow

    # ---------------------------------------------------------------- binding
    def bind(self, model: torch.nn.Module) -> None:
        """Match the averages to ``model``'s tensors by name and build the per-device/dtype lists.

        Runs at ``FIT_START``, ``EVAL_START``, ``PREDICT_START`` (Composer's device-move events)
        and when the storage or the model object changed, never per step. Moves each average to
        its tensor's device and layout (parameters: also dtype), so the kernels take their fast path.
        """
        if _is_fsdp(model) and not self._sharded:
            if self._full:  # from a checkpoint
                self._scatter(model)
            else:  # copied at INIT, before Composer wrapped the model; unused until EMA starts
                self._copy_local(model)
        self._full = False
        groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for store, name, live in self._named_live(model):
            avg = store[name]
            if avg.shape != live.shape:
                raise ValueError(f"EMA: {name} has shape {tuple(avg.shape)}, the model's {tuple(live.shape)}")
            # buffers keep their own dtype: FSDP's mixed precision recasts the model's buffers at run time
            dtype = live.dtype if store is self.named_parameters_dict else avg.dtype
            if avg.device != live.device or avg.dtype != dtype or avg.stride() != live.stride():
                avg = store[name] = torch.empty_like(live, dtype=dtype).copy_(avg)
            kind = "param" if store is self.named_parameters_dict else "float" if avg.is_floating_point() else "other"
            avgs, lives = groups.setdefault((kind, avg.device, avg.dtype), ([], []))
            avgs.append(avg)
            lives.append(live)
        self._params = [pair for key, pair in groups.items() if key[0] == "param"]
        self._float_buffers = [pair for key, pair in groups.items() if key[0] == "float"]
        self._other_buffers = [pair for key, pair in groups.items() if key[0] == "other"]
        self._model = model

    def _named_live(self, model: torch.nn.Module) -> Iterator[tuple[dict[str, torch.Tensor], str, torch.Tensor]]:
        """(storage dict, name, live tensor) per averaged tensor of ``model``, matched by name as Composer."""
        for name, p in _params(model):
            if name in self.named_parameters_dict:
                yield self.named_parameters_dict, name, p
        for name, b in model.named_buffers():
            if name in self.named_buffers_dict:
                yield self.named_buffers_dict, name, b

    def _bound(self, model: torch.nn.Module) -> _Pairs:
        if self._model is not model:
            self.bind(model)
        return self._params + self._float_buffers + self._other_buffers

    # ---------------------------------------------------------------- per step
    @torch.no_grad()
    def update(self, model: torch.nn.Module, smoothing: float) -> None:
        """``avg <- smoothing * avg + (1 - smoothing) * live``, a few multi-tensor kernels in all."""
        self._bound(model)
        for avgs, lives in self._params:
            torch._foreach_lerp_(avgs, lives, 1.0 - smoothing)
        for avgs, lives in self._float_buffers:  # mul + add: the live buffer's dtype may differ (FSDP)
            torch._foreach_mul_(avgs, smoothing)
            torch._foreach_add_(avgs, lives, alpha=1.0 - smoothing)
        for avgs, lives in self._other_buffers:  # BN's num_batches_tracked: the latest count
            torch._foreach_copy_(avgs, lives)

    # ---------------------------------------------------------------- Composer's EMAParameters API
    @torch.no_grad()
    def swap_params(self, model: torch.nn.Module) -> None:
        """Exchange the averages with the model's tensors (in place; under FSDP, each rank's shard)."""
        for avgs, lives in self._bound(model):
            held = [t.clone() for t in lives]  # eval/checkpoint only, not per step
            torch._foreach_copy_(lives, avgs)
            torch._foreach_copy_(avgs, held)

    @torch.no_grad()
    def transfer_ema_params(self, model: torch.nn.Module) -> None:
        """Copy the averages into ``model`` (Composer's ``get_ema_model``)."""
        if model is not self._model:  # another module (a copy to export): by name, keeping the binding
            for store, name, live in self._named_live(model):
                live.copy_(store[name])
            return
        for avgs, lives in self._bound(model):
            torch._foreach_copy_(lives, avgs)

    def move_params_to_device(self, destination_model: torch.nn.Module) -> None:
        self.bind(destination_model)

    # ---------------------------------------------------------------- checkpoints
    def full_dicts(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The averages as full tensors: the storage itself, or under FSDP gathered from every rank."""
        if self._model is None or self._full or not _is_fsdp(self._model):
            return self.named_parameters_dict, self.named_buffers_dict
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = self._model
        self.swap_params(model)  # the model holds the averages' shards
        try:
            with torch.no_grad(), FullyShardedDataParallel.summon_full_params(model, writeback=False):
                params = {n: p.detach().clone() for n, p in _params(model) if n in self.named_parameters_dict}
        finally:
            self.swap_params(model)
        return params, {n: b.clone() for n, b in self.named_buffers_dict.items()}

    @torch.no_grad()
    def _scatter(self, model: torch.nn.Module) -> None:
        """Replace full parameter tensors (from a checkpoint) by this rank's shards of them."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        live = dict(_params(model))
        names = [n for n in self.named_parameters_dict if n in live]
        held = [live[n].detach().clone() for n in names]
        with FullyShardedDataParallel.summon_full_params(model, writeback=True):
            full = dict(_params(model))
            for n in names:
                full[n].copy_(self.named_parameters_dict[n])
        for n, original in zip(names, held, strict=True):
            self.named_parameters_dict[n] = live[n].detach().clone()  # the shard, as FSDP cut it
            live[n].copy_(original)
        self._sharded = True


def _params(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    """The averaged parameters: those trained (as Composer's EMA)."""
    return ((n, p) for n, p in model.named_parameters() if p.requires_grad)


def _is_fsdp(model: torch.nn.Module) -> bool:
    if not misc.is_model_fsdp(model):
        return False
    if any(n.endswith("_flat_param") for n, _ in model.named_parameters()):
        raise ValueError("FusedEMA under FSDP needs use_orig_params=True (Composer's default)")
    return True
