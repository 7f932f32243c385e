"""timm backbones by name, wrapped as Composer classifiers with soft-target cross-entropy."""

from __future__ import annotations

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

from usi_composer.errors import SetupError

__all__ = ["USIClassifier", "create_backbone", "load_weights"]


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
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` with weights from a checkpoint (path or object-store URI) or timm's hub.

    Downloading pretrained weights needs network; offline, this stops with a message that says
    how to pass a checkpoint instead.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if pretrained and checkpoint:
        raise SetupError(f"{name}: give either a checkpoint or pretrained=true, not both")
    if pretrained:
        try:
            return timm.create_model(name, pretrained=True, num_classes=num_classes, **kwargs)
        except (OSError, RuntimeError, ValueError) as e:  # huggingface_hub raises OSError subclasses offline
            raise SetupError(
                f"could not get timm's pretrained weights for '{name}' ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}). Offline? Download them once where there is network "
                f"(timm.create_model('{name}', pretrained=True) then torch.save(model.state_dict(), PATH)) "
                "and pass checkpoint=PATH (a local path or an s3:// / gs:// URI) instead of pretrained=true."
            ) from None
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    if checkpoint:
        load_weights(model, checkpoint)
    return model


def load_weights(module: nn.Module, checkpoint: str) -> None:
    """Load a state dict, a timm checkpoint or a Composer checkpoint into ``module`` (strict).

    ``checkpoint`` is a local path or any URI Composer's ``get_file`` reads (s3://, gs://, oci://, ...).
    """
    with tempfile.TemporaryDirectory() as tmp:
        local = checkpoint
        if "://" in checkpoint:
            local = os.path.join(tmp, "weights.pt")
            get_file(checkpoint, local, progress_bar=False)
        elif not os.path.isfile(checkpoint):
            raise SetupError(f"checkpoint not found: {checkpoint}")
        state = torch.load(local, map_location="cpu", weights_only=False)
    state = _model_state_dict(state)
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise SetupError(
            f"{checkpoint} does not fit the model: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )


def _model_state_dict(state: dict) -> dict:
    """The backbone's weights from a plain, timm (``state_dict``) or Composer checkpoint."""
    if "state" in state and isinstance(state["state"], dict) and "model" in state["state"]:
        state = state["state"]["model"]  # Composer: the ComposerClassifier's `module.` prefix follows
    elif "state_dict" in state:
        state = state["state_dict"]
    elif "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    prefix = "module."
    if state and all(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def save_weights(trainer: Any, path: str | os.PathLike) -> None:
    """Save the trained backbone's state dict (the EMA weights where EMA ran) to ``path``.

    The file loads with ``load_weights`` / ``model.checkpoint`` / ``teacher.checkpoint``.
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
    torch.save(_model_state_dict(state), path)
