"""Filling a teacher cache without a student: what ``usi-cache-teacher`` runs.

The training run's own loop (``builders.build_trainer``: the same data, microbatching, device
transforms, MixUp/CutMix and teacher, in the same precision and compile setting) over
``trainer.max_duration`` with a :class:`NullStudent` and without EMA, evaluation, checkpoints or W&B.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
from typing import Any

import torch
from composer.models import ComposerModel
from composer.utils import dist
from torch import nn

from usi_composer import storage
from usi_composer.config import Config
from usi_composer.console import TrainingConsole
from usi_composer.teacher_cache.format import MANIFEST
from usi_composer.teacher_cache.store import CacheStore
from usi_composer.teacher_cache.writer import TeacherCacheWriter

__all__ = ["NullStudent", "complete_cache", "fill_cache", "remove_cache", "teacher_only"]

# A cache's own files inside its folder (format.py's names; a killed writer's temporary files too)
_OWN_FILE = re.compile(rf"{re.escape(MANIFEST)}|rank\d+/(written\.json|ep\d+/ba\d+\.safetensors)")
_OWN_TEMP = re.compile(rf"(rank\d+/(ep\d+/)?)?{re.escape(storage.TEMP_PREFIX)}.*")


def teacher_only(cfg: Config, out: str) -> Config:
    """``cfg`` as the run that fills a cache at ``out``: ``cache_write`` set, and what does not shape
    the teacher's inputs (EMA, evaluation, checkpoints, resuming, W&B) turned off."""
    cfg = copy.deepcopy(cfg)
    kd = cfg.algorithms.distillation
    kd.cache, kd.cache_write = None, out
    cfg.algorithms.ema.enabled = False
    cfg.data.val_dir = None
    cfg.data.streaming.val_split = None
    trainer = cfg.trainer
    trainer.save_folder, trainer.autoresume, trainer.load_path = None, False, None
    cfg.loggers.wandb = None
    return cfg


def complete_cache(cfg: Config, out: str) -> bool:
    """Whether ``out`` holds ``cfg``'s teacher outputs for the whole run already: a manifest of the same
    format, world size and fingerprint (the config's and this machine's plan's teacher inputs and the
    teacher weights; the data's identity needs the loader: a run reading the cache compares it), and
    ``written.json`` files covering ``trainer.max_duration``."""
    from usi_composer.plan import resolve
    from usi_composer.teacher_cache.fingerprint import DATA_CONTENT, fingerprint, first_difference, weights_identity
    from usi_composer.teacher_cache.opening import cache_covers, read_manifest

    manifest = read_manifest(CacheStore(out, "--out"))
    if manifest is None:
        return False
    cfg = teacher_only(cfg, out)
    plan, kd = resolve(cfg), cfg.algorithms.distillation
    weights = weights_identity(plan)
    current = fingerprint(cfg, plan, data={}, teacher_weights=weights)
    skip = ["data", DATA_CONTENT, *(() if weights else ("teacher weights",))]
    same = (
        (manifest.format, manifest.k) == (kd.cache_format, kd.cache_topk if kd.cache_format == "topk" else None)
        and manifest.world_size == plan.world_size
        and first_difference(manifest.fingerprint, current, skip=skip) is None
    )
    return same and cache_covers(out, cfg.trainer.max_duration, cfg.trainer.global_batch_size)


def remove_cache(out: str) -> int:
    """Delete the teacher cache's own files in the local folder ``out`` (``cache.json``, ``rank*/written.json``,
    ``rank*/ep*/ba*.safetensors``, a killed writer's temporary files) and the folders that leaves empty;
    never another file. Return how many files went. For ``usi-cache-teacher --overwrite``, in one process."""
    if storage.is_remote(out):
        return 0  # objects cannot be deleted from here: the writer rewrites each batch's object in place
    removed = 0
    for folder, _, files in os.walk(out, topdown=False, followlinks=False):
        for name in files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, out).replace(os.sep, "/")
            if (_OWN_FILE.fullmatch(relative) or _OWN_TEMP.fullmatch(relative)) and not os.path.islink(path):
                os.remove(path)
                removed += 1
        if folder != out and re.fullmatch(r"rank\d+(/ep\d+)?", os.path.relpath(folder, out).replace(os.sep, "/")):
            with contextlib.suppress(OSError):
                os.rmdir(folder)  # only where it is empty now
    return removed


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def fill_cache(cfg: Config, out: str) -> str | None:
    """Run ``cfg``'s training loop with a :class:`NullStudent`, storing the teacher's outputs at ``out``;
    return the summary line (rank 0, where anything was written), else None."""
    from usi_composer.builders import build_trainer

    cfg = teacher_only(cfg, out)
    console = TrainingConsole("teacher cache", cfg.trainer.log_interval, cfg.trainer.progress_bar, losses=False)
    trainer = build_trainer(cfg, student=NullStudent(cfg.data.num_classes), loggers=[console])
    trainer.fit()
    writer = next(c for c in trainer.state.callbacks if isinstance(c, TeacherCacheWriter))
    trainer.close()
    if dist.get_global_rank() != 0 or not writer.samples:
        return None
    m = writer.manifest
    what = f"top-{m.k} logits" if m.format == "topk" else "every logit"
    per_sample, epochs = writer.stored_bytes / writer.samples, writer.stored_batches / m.batches_per_epoch
    return (
        f"teacher cache {out}: {writer.stored_batches} batches ({epochs:g} epochs) x {m.world_size} "
        f"rank(s), {what} of {m.num_classes} classes; "
        f"{per_sample:.1f} bytes per sample per epoch ({writer.payload_bytes / writer.samples:.1f} of them the "
        f"outputs), {_size(writer.stored_bytes * m.world_size)} in all"
    )


class NullStudent(ComposerModel):
    """What ``usi-cache-teacher`` trains in place of the student: nothing worth computing.

    Its outputs are zeros of the classes' shape, from one parameter, so the loss, backward pass
    and optimizer step of Composer's loop run as in training (and cost nothing), while the data,
    the microbatching, the device transforms, MixUp/CutMix and the teacher run exactly as they do
    in a training run: the teacher's inputs are a training run's by construction.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.module = nn.Module()
        self.module.register_parameter("weight", nn.Parameter(torch.zeros(())))

    def forward(self, batch: Any) -> torch.Tensor:
        inputs = batch[0]
        return self.module.weight.expand(inputs.shape[0], self.num_classes)

    def loss(self, outputs: torch.Tensor, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return outputs.sum() * 0.0

    def get_metrics(self, is_train: bool = False) -> dict[str, Any]:
        return {}
