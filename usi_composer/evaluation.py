"""Top-1 and top-5 of trained weights on a validation split, through the pipeline training evaluates
with (``usi-eval``): the same loader and ``TransformSpec`` (``data/loaders.py``), device
transform, precision, memory format and metrics (``USIClassifier``), so a checkpoint scores what
training reported for its weights.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from composer.core.precision import get_precision_context
from composer.utils import get_device

from usi_composer.config import Config, ConfigError
from usi_composer.data.loaders import build_dataloaders
from usi_composer.export import resolve_checkpoint, trained_backbone
from usi_composer.models import USIClassifier
from usi_composer.patches.trainer import apply_patches
from usi_composer.plan import resolve

__all__ = ["Evaluation", "evaluate", "validation_split"]


@dataclass
class Evaluation:
    metrics: dict[str, float]  # under the names training logs them: metrics/eval/top1, metrics/eval/top5
    samples: int  # images evaluated
    split: str  # where they came from
    checkpoint: str
    weights: str  # which weights of the checkpoint (models.trained_weights' description)


def validation_split(cfg: Config) -> str:
    """Where ``cfg`` validates: ``data.val_dir``, or ``<data.remote or data.local>/<data.streaming.val_split>``;
    a :class:`ConfigError` where it sets none."""
    d = cfg.data
    if d.remote or d.local:
        if d.streaming.val_split is None:
            raise ConfigError("data.streaming.val_split", "is null: name the MDS split to evaluate on (e.g. val)")
        return f"{(d.remote or d.local or '').rstrip('/')}/{d.streaming.val_split}"
    if d.val_dir is None:
        raise ConfigError("data.val_dir", "is unset: set it to the validation folder (<val_dir>/<class>/<image>)")
    return d.val_dir


def evaluate(cfg: Config, checkpoint: str | None = None, trust: bool = False) -> Evaluation:
    """Evaluate the trained weights of ``checkpoint`` (``export.resolve_checkpoint``: a Composer checkpoint,
    a weights file, an export; None: the run's latest checkpoint) on ``cfg``'s validation split, as
    Composer's eval loop does in training (``trainer.eval_subset_num_batches`` included).

    Class indices are the training folder's (``data.train_dir``, as training labels ``data.val_dir``) or
    the shards' labels. On the CPU the numbers are training's, exactly. On a GPU training evaluated with
    cuDNN's autotuned kernels and, with ``trainer.compile``, compiled; this runs eager (no compile time):
    the numbers agree but for images whose top two logits (nearly) tie.
    """
    split = validation_split(cfg)  # before any weights are read
    plan = resolve(cfg)
    checkpoint = resolve_checkpoint(cfg, checkpoint)
    apply_patches()  # the streaming fixes build_dataloaders relies on, as in training
    trained = trained_backbone(cfg, checkpoint, trust)
    model = USIClassifier(trained.module, num_classes=cfg.data.num_classes)
    _, val = build_dataloaders(cfg, plan)
    assert val is not None  # validation_split
    precision = plan.precision
    device = get_device(plan.device)
    model = device.module_to_device(model)
    if cfg.algorithms.channels_last:  # as Composer's ChannelsLast algorithm converts the student
        model = model.to(memory_format=torch.channels_last)
    model.eval()
    metrics = {name: device.module_to_device(metric) for name, metric in model.get_metrics(is_train=False).items()}
    for metric in metrics.values():
        metric.reset()
    limit, samples = cfg.trainer.eval_subset_num_batches, 0
    microbatch_size = val.dataloader.batch_size  # Composer's Evaluator default: one microbatch per batch
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Cannot split tensor of length")  # the last batch, smaller
        for i, batch in enumerate(val.dataloader):
            if 0 <= limit <= i:
                break
            # Composer's eval loop (Trainer._eval_loop): batch transforms, split, to the device, the
            # device transform, forward, metrics
            batch = val.batch_transforms(batch)
            samples += int(val.get_num_samples_in_batch(batch))
            for microbatch in val.split_batch(batch, microbatch_size):
                microbatch = val.microbatch_transforms(device.batch_to_device(microbatch))
                with get_precision_context(precision, fp8_autocast_enabled=False):  # Composer: no FP8 in eval
                    outputs = model.eval_forward(microbatch)
                with get_precision_context(precision):
                    for metric in metrics.values():
                        model.update_metric(microbatch, outputs, metric)
    scores = {f"metrics/eval/{name}": float(metric.compute()) for name, metric in metrics.items()}
    return Evaluation(scores, samples, split, checkpoint, trained.weights)
