"""timm backbones by name, wrapped as Composer classifiers with soft-target cross-entropy."""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

import timm
import torch
import torch.nn.functional as F
from composer.models import ComposerClassifier
from composer.utils import get_file
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from usi_composer import storage
from usi_composer.checkpoints import read_checkpoint, refuse_plain_http
from usi_composer.errors import CheckpointError, InputSizeError, SetupError, UnreachableError, reason
from usi_composer.storage import atomic_file

__all__ = [
    "USIClassifier",
    "check_input_size",
    "create_backbone",
    "create_model_for_size",
    "load_weights",
    "save_weights",
    "trained_weights",
]

log = logging.getLogger(__name__)


def soft_target_cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class indices ``(N,)`` or distributions ``(N, C)`` (after MixUp/CutMix).

    Composer's ``soft_cross_entropy`` computes the same, but checks the targets' total probability
    with two host syncs per step; timm's ``SoftTargetCrossEntropy`` has none.
    """
    if targets.ndim == 1:
        return F.cross_entropy(outputs, targets)
    return _SOFT_CE(outputs, targets)


_SOFT_CE = SoftTargetCrossEntropy()


class USIClassifier(ComposerClassifier):
    """``ComposerClassifier`` with soft-target cross-entropy and top-1/top-5 validation accuracy.

    No training metrics (the official recipe has none): Composer would update and compute them
    on every training step (an extra forward of metric kernels, host syncs, and under DDP a
    cross-rank sync of each metric per step), and accuracy on mixed batches says little.
    Validation targets are class indices; should a distribution come in, metrics compare
    against its arg-max.
    """

    def __init__(self, module: nn.Module, num_classes: int) -> None:
        val_metrics = MetricCollection(
            {
                "top1": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro"),
                "top5": MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro"),
            }
        )
        super().__init__(module, num_classes=num_classes, val_metrics=val_metrics, loss_fn=soft_target_cross_entropy)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return {} if is_train else super().get_metrics(is_train=False)

    def forward(self, batch: Any) -> torch.Tensor:
        # The inputs alone: with trainer.compile, dynamo then guards on the inputs only, never on
        # the targets, whose shape and layout differ between training (soft), Composer's eval loop
        # (views of the batch) and BestOfEMAAndRaw's; guarding on them would recompile.
        return self.module(batch[0])

    def update_metric(self, batch: Any, outputs: Any, metric: Any) -> None:
        _, targets = batch
        if targets.ndim == 2:
            targets = targets.argmax(dim=1)
        metric.update(outputs, targets)


def create_backbone(
    name: str,
    num_classes: int,
    checkpoint: str | None = None,
    pretrained: bool = False,
    img_size: int | None = None,
    trust_checkpoint: bool = False,
    section: str = "",
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` with weights from a checkpoint (path or object-store URI) or timm's hub.
    ``section``: the config section it is built for (``model``, ``teacher``), for the keys a message names.

    ``trust_checkpoint``: unpickle the checkpoint in full (it may run code); else it is read as data.

    ``img_size``: the input size, passed to timm where the model's constructor takes it
    (ViT/DeiT, Swin, LeViT, MLP-Mixer, ...); convnets without it run at any size they can.
    Downloading pretrained weights needs network; offline, this stops with a message that says
    how to pass a checkpoint instead.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if pretrained and checkpoint:
        raise SetupError(f"{name}: give either a checkpoint or pretrained=true, not both")
    if pretrained:
        instead = _offline_alternative(name, section)
        _check_hub_reachable(name, kwargs, instead)
        try:
            return create_model_for_size(name, img_size, pretrained=True, num_classes=num_classes, **kwargs)[0]
        except (OSError, RuntimeError, ValueError) as e:  # huggingface_hub raises OSError subclasses offline
            kind = UnreachableError if isinstance(e, OSError) else SetupError  # the network, or timm refused
            raise kind(f"could not get timm's pretrained weights for '{name}' ({reason(e)}). {instead}") from None
    model, _ = create_model_for_size(name, img_size, pretrained=False, num_classes=num_classes, **kwargs)
    if checkpoint:
        load_weights(model, checkpoint, name, trust=trust_checkpoint)
    return model


def _offline_alternative(name: str, section: str) -> str:
    keys = f"{section}.checkpoint=PATH {section}.pretrained=false" if section else "checkpoint=PATH, not pretrained"
    return (
        "Download them once where there is network (timm.create_model("
        f"'{name}', pretrained=True), then torch.save(model.state_dict(), PATH)) and pass {keys} "
        "(PATH a local path or an s3:// / gs:// URI)"
    )


def _check_hub_reachable(name: str, kwargs: dict[str, Any], instead: str) -> None:
    """Stop in seconds, not after huggingface_hub's retries (about a minute), where timm would download
    ``name``'s pretrained weights from the Hugging Face hub that this machine cannot reach: offline
    (``HF_HUB_OFFLINE``) without them in the local cache, or no answer from the hub within 3 s."""
    import socket
    from urllib.parse import urlsplit

    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import resolve_pretrained_cfg, split_model_name_tag

    architecture, tag = split_model_name_tag(name)
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    weights = resolve_pretrained_cfg(architecture, kwargs.get("pretrained_cfg") or tag or None, overlay)
    if overlay.get("file") or not getattr(weights, "hf_hub_id", None):
        return  # a local file, or a URL torch.hub fetches
    repo = str(weights.hf_hub_id).split("@")[0]
    names = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
    if any(isinstance(try_to_load_from_cache(repo, file), str) for file in names):
        return  # cached: huggingface_hub reads it from there
    if constants.HF_HUB_OFFLINE:
        raise UnreachableError(
            f"timm's pretrained weights for '{name}' are on the hub (HF_HUB_OFFLINE is set). {instead}"
        )
    host = urlsplit(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError as e:
        raise UnreachableError(
            f"timm's pretrained weights for '{name}' are on {host}, which does not answer ({reason(e)}). {instead}"
        ) from None


def create_model_for_size(name: str, img_size: int | None, **kwargs: Any) -> tuple[nn.Module, bool]:
    """``timm.create_model`` built for ``img_size`` where the model's constructor takes it, and
    whether it did.

    timm has no registry of which models take ``img_size`` (entrypoints take ``**kwargs``), so
    we ask the constructor: those without it raise TypeError before building anything.
    """
    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs), True
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(name, **kwargs), False


def check_input_size(name: str, size: int, num_classes: int, img_size: int | None = None, **kwargs: Any) -> bool:
    """Check that ``name`` built for ``img_size`` (default: ``size``) runs ``size`` px images;
    return whether timm's constructor took ``img_size`` (else the model takes any size it can).

    Builds the model on PyTorch's meta device (no memory, no weights: well under a second even
    for a ViT-L) and runs one image through it there, so every shape check of the forward (a
    patch larger than the image, LeViT's attention biases, TResNet's space-to-depth, a convnet's
    kernels outgrowing its feature map) runs before training. A meta failure is confirmed on the
    CPU (an op without a meta kernel must not stop a model that works) and reported with the
    CPU's reason. Raises :class:`InputSizeError`, naming the nearest sizes that run.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    built_for = img_size or size
    try:
        return _run_once(name, built_for, size, num_classes, "meta", kwargs)
    except Exception:  # any failure of the forward: confirmed, and reported, below
        pass
    try:
        return _run_once(name, built_for, size, num_classes, "cpu", kwargs)
    except TypeError:  # a constructor argument it does not take (model.kwargs): not a size problem
        raise
    except Exception as e:  # the model's own shape check, whatever it raises
        why = reason(e, 160)
    if built_for == size:
        raise InputSizeError(
            f"{name} cannot run at {size} px ({why}); {_sizes_that_run(name, size, num_classes, kwargs)}"
        )
    message = f"{name} built for {built_for} px cannot run at {size} px ({why})"
    if _runs(name, size, size, num_classes, kwargs):
        raise InputSizeError(f"{message}; built for {size} px it runs")
    raise InputSizeError(
        f"{message}; built for the size it runs at, {_sizes_that_run(name, size, num_classes, kwargs)}"
    )


def _run_once(name: str, img_size: int, size: int, num_classes: int, device: str, kwargs: dict[str, Any]) -> bool:
    with torch.device(device), torch.no_grad():
        model, took_img_size = create_model_for_size(name, img_size, num_classes=num_classes, **kwargs)
        model.eval()(torch.zeros(1, 3, size, size))
    return took_img_size


# Sizes tried for a model that cannot run at the requested one: multiples of 8 (what GPUs and
# most strides like) nearest to it, then timm's default size for the model.
_SEARCH_STEP, _SEARCH_PROBES = 8, 12


def _runs(name: str, img_size: int, size: int, num_classes: int, kwargs: dict[str, Any]) -> bool:
    try:
        _run_once(name, img_size, size, num_classes, "meta", kwargs)
    except Exception:  # a size that does not run
        return False
    return True


def _sizes_that_run(name: str, size: int, num_classes: int, kwargs: dict[str, Any]) -> str:
    def runs(s: int) -> bool:
        return _runs(name, s, s, num_classes, kwargs)

    below = size // _SEARCH_STEP * _SEARCH_STEP
    down = [s for s in range(below, 7, -_SEARCH_STEP) if s != size][:_SEARCH_PROBES]
    up = list(range(below + _SEARCH_STEP, below + _SEARCH_STEP * (_SEARCH_PROBES + 1), _SEARCH_STEP))
    found = [s for s in (next((s for s in down if runs(s)), None), next((s for s in up if runs(s)), None)) if s]
    if found:
        return f"nearest sizes that run: {' or '.join(f'{s} px' for s in found)}"
    default = timm.get_pretrained_cfg_value(name.split(".", 1)[0], "input_size")  # e.g. (3, 224, 224)
    if default is not None and runs(default[-1]):
        return f"no multiple of {_SEARCH_STEP} px near it runs; timm's default size, {default[-1]} px, does"
    return f"no multiple of {_SEARCH_STEP} px from {down[-1] if down else size} to {up[-1]} px runs either"


def load_weights(
    module: nn.Module, checkpoint: str, name: str | None = None, trust: bool = False, say: bool = True
) -> str:
    """Load a safetensors file, a state dict, a timm checkpoint or a Composer checkpoint into ``module``
    (strict); return which weights of it were loaded (:func:`trained_weights`).

    ``checkpoint`` is a local path or any URI Composer's ``get_file`` reads (s3://, gs://, oci://,
    https://, ...; not plain http://). It is read as data (``checkpoints.read_checkpoint``): a file
    that would run code when unpickled raises :class:`UnsafeCheckpointError`, unless ``trust``.
    Weights that do not fit raise :class:`CheckpointError` with one line counting the missing,
    unexpected and mis-shaped keys, naming the first of each (``name``: the model, for the
    message); the module is then partly loaded, to be discarded.
    """
    refuse_plain_http(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        local = checkpoint
        if "://" in checkpoint:
            local = os.path.join(tmp, os.path.basename(checkpoint.split("?", 1)[0]) or "weights")
            try:
                get_file(checkpoint, local, progress_bar=False)
            except Exception as e:  # requests', urllib3's and each store's own types: one line, never a traceback
                raise storage.failure("download", checkpoint, e) from None
        elif not os.path.isfile(checkpoint):
            raise CheckpointError(f"checkpoint not found: {checkpoint}")
        state, which = trained_weights(read_checkpoint(local, trust=trust, name=checkpoint, mmap=True), checkpoint)
        if say:  # one line a user reads: which weights of the file were taken (EMA or raw, ...)
            log.info("%s: %s, from %s", name or type(module).__name__, which, checkpoint)
        # torch's own message is one line per mis-shaped key (tens of lines for another architecture):
        # load what fits (torch decides what is missing or unexpected), then report all three in one line.
        expected = module.state_dict()
        misshaped = [k for k, v in state.items() if k in expected and getattr(v, "shape", None) != expected[k].shape]
        fitting = {k: v for k, v in state.items() if k not in misshaped}
        missing, unexpected = module.load_state_dict(fitting, strict=False)  # copies out of the mapped file
    missing = [k for k in missing if k not in misshaped]  # held back above, not missing from the file
    if missing or unexpected or misshaped:
        shape = [f"{k}: {list(state[k].shape)} in the file, {list(expected[k].shape)} in the model" for k in misshaped]
        counts = ", ".join(
            f"{len(keys)} {what}" + (f" (first: {keys[0]})" if keys else "")
            for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (shape, "mis-shaped"))
        )
        raise CheckpointError(f"{checkpoint} does not fit {name or type(module).__name__}: {counts}")
    return which


# The entries timm's load_state_dict(use_ema=True) takes, in its order: a timm train.py checkpoint's
# EMA weights first. (timm's loader is not called itself: its allow-list lacks what Composer
# checkpoints hold, it turns a refusal into a RuntimeError of its own wording, and it recognizes
# safetensors by the name alone; its entry order and clean_state_dict are reused.)
_TIMM_ENTRIES = ("state_dict_ema", "model_ema", "state_dict", "model")


def trained_weights(checkpoint: Any, source: str = "weights") -> tuple[dict[str, Any], str]:
    """The backbone's trained weights in a checkpoint (what ``read_checkpoint`` returns), and which they are.

    - A Composer checkpoint (``trainer.save_folder``): the EMA weights where EMA ran. Composer's ``EMA``
      (and ``FusedEMA``) swaps them into ``state.model`` to checkpoint (``ema_weights_active``), the raw
      weights then sit in its storage; else the storage holds them. Where ``BestOfEMAAndRaw`` found the
      raw weights better at the final evaluation it wrote them into that storage: the two sets are then
      equal, and the description says so. Before EMA started (or without it): the training weights.
    - A timm checkpoint: its EMA weights first (timm's ``use_ema=True`` order).
    - A state dict (``save_weights``' file, timm's and the Hugging Face hub's ``model.safetensors``): itself.
    ``source``: the file, for messages.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{source}: holds a {type(checkpoint).__name__}, not a state dict")
    if isinstance(checkpoint.get("state"), dict) and "model" in checkpoint["state"]:
        state, which = _composer_weights(checkpoint["state"], source)
    else:
        entry = next((k for k in _TIMM_ENTRIES if isinstance(checkpoint.get(k), dict)), None)
        state, which = (checkpoint[entry], f"its '{entry}'") if entry else (checkpoint, "its state dict")
    return _unwrapped(state), which


def _composer_weights(state: dict[str, Any], source: str) -> tuple[dict[str, Any], str]:
    model = state["model"]
    if not isinstance(model, dict):
        raise CheckpointError(f"{source}: its state.model holds a {type(model).__name__}, not a state dict")
    algorithms = state.get("algorithms") if isinstance(state.get("algorithms"), list) else []
    ema = next(
        (s for _, s in algorithms if isinstance(s, dict) and isinstance(s.get("ema_model"), dict)), None
    )  # Composer's EMA or FusedEMA: (name, state) pairs
    stamp = (state.get("timestamp") or {}).get("Timestamp") or {}
    at = f" (epoch {stamp['epoch']}, batch {stamp['batch']})" if {"epoch", "batch"} <= set(stamp) else ""
    if ema is None or not ema.get("ema_started"):
        return model, f"the training weights{at}: " + ("EMA had not started" if ema else "the run had no EMA")
    stored = {
        **(ema["ema_model"].get("named_parameters_dict") or {}),
        **(ema["ema_model"].get("named_buffers_dict") or {}),
    }
    # The storage is named as the model was when EMA started: under DDP with its wrapper's prefix too
    stored = {_unwrap_key(k, model): v for k, v in stored.items()}
    stray = [k for k in stored if k not in model]
    if stray:
        raise CheckpointError(f"{source}: its EMA storage holds {stray[0]}, which its state.model lacks")
    swapped = {**model, **stored}
    averaged, raw = (model, swapped) if ema.get("ema_weights_active") else (swapped, model)
    best = (state.get("callbacks") or {}).get("BestOfEMAAndRaw") or {}
    scores = "; ".join(
        f"{label}: {best.get('metric', 'top1')} {s['ema']:.4f} EMA, {s['raw']:.4f} raw"
        for label, s in (best.get("scores") or {}).items()
        if isinstance(s, dict) and {"ema", "raw"} <= set(s)
    )
    if best.get("best") == "raw" and all(torch.equal(averaged[k], raw[k]) for k in stored):
        return averaged, (
            f"the raw training weights{at}: BestOfEMAAndRaw found them better than the EMA weights at the final "
            f"evaluation{f' ({scores})' if scores else ''} and wrote them into the EMA storage"
        )
    return averaged, f"the EMA weights{at}" + (f"; BestOfEMAAndRaw's last evaluation: {scores}" if scores else "")


_WRAPPERS = ("module.", "_orig_mod.")  # DDP's and the ComposerClassifier's, torch.compile's


def _unwrap_key(key: str, known: dict[str, Any]) -> str:
    while key not in known and key.startswith(_WRAPPERS):
        key = key.split(".", 1)[1]
    return key


def _unwrapped(state: dict[str, Any]) -> dict[str, Any]:
    """timm's ``clean_state_dict`` until nothing changes: DDP (``module.``) around the ComposerClassifier
    (``module.``) nests two prefixes, one more than timm strips."""
    while True:
        cleaned = timm.models.clean_state_dict(state)
        if list(cleaned) == list(state):
            return cleaned
        state = cleaned


def save_weights(trainer: Any, path: str | os.PathLike) -> None:
    """Save the trained backbone's weights (the EMA weights where EMA ran) to ``path``, atomically.

    A ``.safetensors`` path gets safetensors (what timm and the Hugging Face hub publish); any other a
    torch file holding a dict of tensors only. Either loads as data (``load_weights``,
    ``model.checkpoint`` / ``teacher.checkpoint``, ``torch.load(weights_only=True)``) with no
    allow-listed global; ``.pt`` stays what torch and timm expect under that name.
    Reads the EMA copy without swapping it into the model (Composer's ``get_ema_model``
    overwrites the training weights).
    """
    from composer.algorithms import EMA

    model = trainer.state.model
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    ema = next((a for a in trainer.state.algorithms if isinstance(a, EMA)), None)
    if ema is not None and ema.ema_model is not None and not ema.ema_weights_active:
        averaged = {**ema.ema_model.named_parameters_dict, **ema.ema_model.named_buffers_dict}
        state.update({k: v.detach().cpu().clone() for k, v in averaged.items() if k in state})
    weights = {k: v.contiguous() for k, v in _unwrapped(state).items()}  # safetensors: contiguous
    with atomic_file(path) as tmp:
        if os.fspath(path).endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file(weights, tmp)
        else:
            torch.save(weights, tmp)
