"""The one place that turns a validated :class:`Config` and its :class:`RunPlan` into Composer objects.

Every builder takes ``(cfg, plan)`` and derives nothing again: the plan settled the device, precision,
compilation, batch layout, normalizations, learning rate and EMA smoothing. An algorithm is built from
its config section as ``Cls(**section)`` (llm-foundry's ``build_algorithm``): its hyper-parameters are
written once in the schema and once in its signature, never in between.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import fields
from typing import Any

from composer.algorithms import ChannelsLast, ProgressiveResizing
from composer.callbacks import ImageVisualizer, LRMonitor, SpeedMonitor
from composer.core import Algorithm, Callback, Event, State
from composer.loggers import LoggerDestination
from composer.models import ComposerModel
from composer.utils import create_interval_scheduler

from usi_composer.algorithms import BestOfEMAAndRaw, FusedEMA, KnowledgeDistillation, MixUpCutMix
from usi_composer.checkpoints import ConfigRecord
from usi_composer.compilation import CompileTime
from usi_composer.config import Config, ConfigError
from usi_composer.console import TrainingConsole
from usi_composer.data.loaders import build_dataloaders
from usi_composer.errors import CheckpointError, UnsafeCheckpointError
from usi_composer.models import USIClassifier, create_backbone
from usi_composer.optim import CosineWithWarmupFrom, build_optimizer
from usi_composer.patches.trainer import Trainer, trusting_checkpoints
from usi_composer.plan import RunPlan
from usi_composer.preflight import checkpoint_key
from usi_composer.process import prepare
from usi_composer.teacher import TeacherEvaluation, build_teacher
from usi_composer.teacher_cache import TeacherCacheReader, TeacherCacheWriter, open_teacher_cache
from usi_composer.tracking import build_wandb_logger, loggable_config

log = logging.getLogger(__name__)

__all__ = [
    "algorithm_kwargs",
    "build_algorithms",
    "build_distillation",
    "build_model",
    "build_trainer",
    "final_evaluation_first",
]


def build_model(cfg: Config) -> USIClassifier:
    """The student: ``cfg.model``'s timm backbone (its weights as the config says) in the recipe's ComposerModel."""
    model, data = cfg.model, cfg.data
    with checkpoint_key("model.checkpoint", "model.trust_checkpoint"):
        backbone = create_backbone(
            model.name,
            data.num_classes,
            checkpoint=model.checkpoint,
            pretrained=model.pretrained,
            img_size=model.img_size or data.image_size,
            trust_checkpoint=model.trust_checkpoint,
            section="model",
            drop_path_rate=model.drop_path_rate,
            **model.kwargs,
        )
    if not model.checkpoint:  # a checkpoint's loading says what it loaded (models.load_weights)
        weights = "timm's pretrained weights" if model.pretrained else "timm's initial weights (random)"
        log.info("student %s: %s", model.name, weights)
    return USIClassifier(backbone, num_classes=data.num_classes)


def algorithm_kwargs(section: Any, algorithm: type) -> dict[str, Any]:
    """The fields of a config ``section`` that are ``algorithm``'s hyper-parameters (its ``hparams``,
    named as in its signature)."""
    return {f.name: getattr(section, f.name) for f in fields(section) if f.name in algorithm.hparams}


def build_algorithms(
    cfg: Config, plan: RunPlan, teacher_cache: TeacherCacheReader | TeacherCacheWriter | None = None
) -> list[Algorithm]:
    """The recipe's algorithms, in the order they act. ``teacher_cache``: ``algorithms.distillation.cache``'s
    reader (the teacher is not built) or ``cache_write``'s writer."""
    section = cfg.algorithms
    algorithms: list[Algorithm] = []
    if section.mixup_cutmix.enabled:
        algorithms.append(MixUpCutMix(cfg.data.num_classes, **algorithm_kwargs(section.mixup_cutmix, MixUpCutMix)))
    if section.distillation.enabled:
        algorithms.append(build_distillation(cfg, plan, teacher_cache))
    if plan.ema_smoothing is not None:
        algorithms.append(FusedEMA(half_life=None, smoothing=plan.ema_smoothing, update_interval="1ba"))
    if section.channels_last:
        algorithms.append(ChannelsLast())
    if section.progressive_resizing:
        algorithms.append(ProgressiveResizing())
    return algorithms


def build_distillation(
    cfg: Config, plan: RunPlan, teacher_cache: TeacherCacheReader | TeacherCacheWriter | None = None
) -> KnowledgeDistillation:
    """``KnowledgeDistillation`` from the teacher (built, BN-folded, re-normalized from the student's
    normalization to its own, as the plan resolved them), or from a cache of its outputs (a reader:
    the teacher is not built)."""
    section, teacher = cfg.algorithms.distillation, cfg.teacher
    reader = teacher_cache if isinstance(teacher_cache, TeacherCacheReader) else None
    module = None
    if reader is None:
        assert teacher.name is not None and plan.teacher_mean and plan.teacher_std  # validated, resolved
        with checkpoint_key("teacher.checkpoint", "teacher.trust_checkpoint"):
            module = build_teacher(
                teacher.name,
                plan.teacher_classes or cfg.data.num_classes,
                student=(plan.student_mean, plan.student_std),
                teacher=(plan.teacher_mean, plan.teacher_std),
                checkpoint=teacher.checkpoint,
                pretrained=teacher.pretrained,
                fold_bn=teacher.fold_bn,
                channels_last=teacher.channels_last,
                compile=plan.compile,
                img_size=plan.teacher_img_size,
                trust_checkpoint=teacher.trust_checkpoint,
                outputs=plan.teacher_outputs,
                **teacher.kwargs,
            )
    return KnowledgeDistillation(
        module,
        **algorithm_kwargs(section, KnowledgeDistillation),
        teacher_outputs=reader,
        on_teacher_outputs=teacher_cache if reader is None else None,
    )


def build_callbacks(cfg: Config, plan: RunPlan) -> list[Callback]:
    callbacks: list[Callback] = [LRMonitor(), SpeedMonitor(window_size=cfg.trainer.speed_window)]
    if plan.compile:
        teacher = f" and teacher {cfg.teacher.name}" if plan.builds_teacher else ""
        callbacks.append(CompileTime(f"student {cfg.model.name}{teacher}"))
    if cfg.algorithms.ema.enabled and cfg.algorithms.ema.best_of_raw and plan.evaluates:
        callbacks.append(BestOfEMAAndRaw("top1"))
    if cfg.teacher.evaluate_first and plan.builds_teacher and plan.evaluates:
        callbacks.append(TeacherEvaluation(str(cfg.teacher.name)))
    wandb = cfg.loggers.wandb
    if wandb is not None and wandb.log_images:
        callbacks.append(ImageVisualizer(interval=wandb.log_images, mode="input"))
    return callbacks


def build_trainer(
    cfg: Config,
    plan: RunPlan | None = None,
    *,
    loggers: list[LoggerDestination] | None = None,
    callbacks: list[Callback] | None = None,
    student: ComposerModel | None = None,
) -> Trainer:
    """Model, teacher, algorithms, data, optimizer, schedule, checkpointing and the configured loggers
    (``loggers.wandb``), plus ``loggers``/``callbacks`` given here -> a ready Trainer. ``plan``: None
    resolves, checks and sets up the process (``process.prepare``). ``student``: train it instead of
    ``cfg.model`` (``usi-cache-teacher``'s null student); the data is still normalized for ``cfg.model``,
    as the run it stands in for. The run's console (``TrainingConsole``) is added unless ``loggers`` has one."""
    plan = prepare(cfg, plan) if plan is None else plan
    wandb_logger = build_wandb_logger(cfg, plan)
    loggers = [*(loggers or []), *([wandb_logger] if wandb_logger is not None else [])]
    if not any(isinstance(destination, TrainingConsole) for destination in loggers):
        loggers.append(TrainingConsole(log_interval=cfg.trainer.log_interval, bar=cfg.trainer.progress_bar))
    model = build_model(cfg) if student is None else student
    train_spec, eval_spec = build_dataloaders(cfg, plan)
    teacher_cache = open_teacher_cache(cfg, plan, train_spec.dataloader)
    trainer = cfg.trainer
    all_callbacks = [
        *build_callbacks(cfg, plan),
        # every checkpoint records the config, for a later autoresume to check (patches.Trainer)
        ConfigRecord(loggable_config(cfg), accept=trainer.autoresume_accept),
        *([teacher_cache] if teacher_cache is not None else []),
        *(callbacks or []),
    ]
    with trusting_checkpoints(trainer.trust_checkpoints), _resume_errors(cfg):
        return Trainer(
            model=model,
            train_dataloader=train_spec,
            eval_dataloader=eval_spec,
            eval_interval=final_evaluation_first(trainer.eval_interval) if eval_spec is not None else 1,
            algorithms=build_algorithms(cfg, plan, teacher_cache),
            loggers=loggers or None,
            callbacks=all_callbacks,
            **_optimization(cfg, plan, model),
            **_trainer_settings(cfg, plan),
        )


def final_evaluation_first(interval: str) -> Callable[[State, Event], bool]:
    """Composer's schedule for ``trainer.eval_interval``, with the run's last evaluation at its last batch's
    end, before that batch's checkpoint is written.

    Composer 0.32.1 evaluates a run that ends between two intervals (``max_duration`` in batches, say) at
    ``FIT_END``, after the final checkpoint: ``BestOfEMAAndRaw``'s choice, and the weights ``eval_best``
    scored, would be missing from it. Evaluated at that batch's ``BATCH_END`` instead (after the EMA
    update, as at an epoch's end), the checkpoint holds them for every duration unit; a batch is never
    evaluated twice (an epoch's end right after it).
    """
    periodic = create_interval_scheduler(interval, checkpoint_events=False, include_end_of_training=False)
    evaluated_at = -1

    def should_evaluate(state: State, event: Event) -> bool:
        nonlocal evaluated_at
        batch = int(state.timestamp.batch)
        if batch == evaluated_at:
            return False
        last = event == Event.BATCH_END and (state.get_elapsed_duration() or 0) >= 1.0
        if last or periodic(state, event):
            evaluated_at = batch
            return True
        return False

    return should_evaluate


def _optimization(cfg: Config, plan: RunPlan, model: ComposerModel) -> dict[str, Any]:
    """The optimizer (AdamW without decay on biases and norms) and the warm-up + cosine schedule, per batch."""
    optimizer, scheduler = cfg.optimizer, cfg.scheduler
    betas = (optimizer.betas[0], optimizer.betas[1])
    return dict(
        optimizers=build_optimizer(model.module, plan.lr, optimizer.weight_decay, betas, optimizer.eps),
        schedulers=CosineWithWarmupFrom(scheduler.warmup, alpha_i=plan.warmup_from, alpha_f=plan.anneal_to),
        step_schedulers_every_batch=True,
    )


def _trainer_settings(cfg: Config, plan: RunPlan) -> dict[str, Any]:
    """The Trainer's arguments that are ``trainer.*`` keys or the plan's values as they are."""
    trainer = cfg.trainer
    return dict(
        device=plan.device,
        precision=plan.precision,
        compile_config={} if plan.compile else None,  # Composer compiles the student (after DDP wrapping)
        max_duration=trainer.max_duration,
        device_train_microbatch_size=plan.microbatch_size,
        seed=trainer.seed,
        run_name=trainer.run_name,
        save_folder=trainer.save_folder,
        save_interval=trainer.save_interval,
        save_num_checkpoints_to_keep=plan.checkpoints_to_keep,
        save_overwrite=trainer.save_overwrite,
        autoresume=trainer.autoresume,
        load_path=trainer.load_path,
        progress_bar=False,  # the recipe's console speaks instead (usi_composer/console.py)
        log_to_console=False,
        train_subset_num_batches=trainer.train_subset_num_batches,
        eval_subset_num_batches=trainer.eval_subset_num_batches,
        parallelism_config={"fsdp": dict(trainer.fsdp)} if trainer.fsdp is not None else None,
    )


@contextlib.contextmanager
def _resume_errors(cfg: Config) -> Iterator[None]:
    """The checkpoint Composer resumes from, refused or not complete: a config error on the key that named it."""
    trainer = cfg.trainer
    try:
        yield
    except CheckpointError as e:
        key = "trainer.autoresume" if trainer.autoresume else "trainer.load_path"
        if not isinstance(e, UnsafeCheckpointError):
            raise ConfigError(key, str(e)) from None
        where = (
            e.path if os.path.exists(e.path) else str(trainer.load_path or trainer.save_folder)
        )  # a download is gone
        refused = UnsafeCheckpointError(where, e.what)
        raise ConfigError(key, f"{refused}; if you trust this file, set trainer.trust_checkpoints=true") from None
