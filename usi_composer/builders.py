"""The one place that turns a validated :class:`Config` into Composer objects."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from composer.algorithms import ChannelsLast, ProgressiveResizing
from composer.callbacks import LRMonitor, SpeedMonitor
from composer.core import Algorithm, Callback, DataSpec
from composer.loggers import LoggerDestination
from composer.models import ComposerModel
from composer.utils import dist, format_name_with_dist, is_tar, parse_uri, reproducibility
from timm.data import resolve_data_config
from timm.models import resolve_pretrained_cfg, split_model_name_tag

from usi_composer.algorithms import BestOfEMAAndRaw, FusedEMA, KnowledgeDistillation, MixUpCutMix
from usi_composer.checkpoints import ConfigRecord, refuse_plain_http, set_aside_partial_checkpoints
from usi_composer.compilation import CompileTime, mark_batch_dynamic, resolve_compile
from usi_composer.config import Config, ConfigError, DataConfig
from usi_composer.data import BytesTransform, DeviceNormalize, TransformSpec, folder_dataloader
from usi_composer.data.gpu_pipeline import (
    DeviceTransform,
    EncodedSample,
    collate_encoded,
    num_samples,
    split_encoded,
)
from usi_composer.data.layout import find_classes
from usi_composer.data.mds import read_classes_json, streaming_dataloader
from usi_composer.errors import CheckpointError, InputSizeError, UnsafeCheckpointError
from usi_composer.models import USIClassifier, check_input_size, create_backbone
from usi_composer.optim import CosineWithWarmupFrom, build_optimizer
from usi_composer.patches.trainer import Trainer, apply_patches, separate_node_signal_files, trusting_checkpoints
from usi_composer.teacher import build_teacher
from usi_composer.teacher_cache import TeacherCacheReader, TeacherCacheWriter, open_teacher_cache
from usi_composer.tracking import build_wandb_logger, loggable_config

__all__ = [
    "build_algorithms",
    "build_distillation",
    "build_model",
    "build_trainer",
    "check_model_sizes",
    "check_teacher_classes",
    "ema_smoothing",
    "local_checkpoints_to_keep",
    "scaled_lr",
    "student_normalization",
]

log = logging.getLogger(__name__)


def build_model(cfg: Config) -> USIClassifier:
    m = cfg.model
    with _checkpoint_key("model.checkpoint", "model.trust_checkpoint"):
        backbone = create_backbone(
            m.name,
            cfg.data.num_classes,
            checkpoint=m.checkpoint,
            pretrained=m.pretrained,
            img_size=m.img_size or cfg.data.image_size,
            trust_checkpoint=m.trust_checkpoint,
            drop_path_rate=m.drop_path_rate,
            **m.kwargs,
        )
    return USIClassifier(backbone, num_classes=cfg.data.num_classes)


@contextlib.contextmanager
def _checkpoint_key(key: str, trust_key: str) -> Iterator[None]:
    """Weights that cannot be loaded are a config error (exit 2) naming the key that points at them;
    a refused unpickling also names ``trust_key``, the opt-in that loads the file in full."""
    try:
        yield
    except UnsafeCheckpointError as e:
        raise ConfigError("", key, f"{e}; if you trust this file, set {trust_key}=true") from None
    except CheckpointError as e:
        raise ConfigError("", key, str(e)) from None


def check_teacher_classes(cfg: Config) -> None:
    """A pretrained teacher must have been trained on the data's classes (before anything is downloaded).

    ``timm.create_model(pretrained=True, num_classes=N)`` with weights for another number of classes
    drops their classifier and builds a random one without a word (timm 1.0.31 ``_builder.py:
    load_pretrained``, where ``num_classes != pretrained_cfg['num_classes']``); distilling from it
    teaches nothing. timm's pretrained cfg (with ``pretrained_cfg_overlay``) says the weights' classes.
    The student may start from weights of another class count: that is ordinary fine-tuning.
    """
    t, n = cfg.teacher, cfg.data.num_classes
    if not (cfg.algorithms.distillation.enabled and t.pretrained and t.name):
        return
    architecture, tag = split_model_name_tag(t.name)
    overlay = dict(t.kwargs.get("pretrained_cfg_overlay") or {})
    weights = resolve_pretrained_cfg(architecture, t.kwargs.get("pretrained_cfg") or tag or None, overlay)
    if weights.num_classes == n:
        return
    source = next((k for k in ("num_classes", "file", "url", "hf_hub_id") if overlay.get(k) is not None), None)
    key = f"teacher.kwargs.pretrained_cfg_overlay.{source}" if source else "teacher.pretrained"
    raise ConfigError(
        "",
        key,
        f"the pretrained weights of teacher {t.name} classify {weights.num_classes} classes, data.num_classes is "
        f"{n}: timm would give the teacher a new, untrained classifier, which knows nothing of these classes; "
        "fine-tune a teacher on this data as yamls/demo_teacher.yaml does, then set teacher.checkpoint=PATH "
        "and teacher.pretrained=false",
    )


def local_checkpoints_to_keep(cfg: Config) -> int:
    """``trainer.save_num_checkpoints_to_keep``; null: -1 (all) for a local save_folder, 1 for a remote one.

    With a remote save_folder, Composer 0.32.1's CheckpointSaver writes each checkpoint into a local
    temporary folder and uploads a copy of it (``RemoteUploader`` stages its own), so the local files
    are only the last few: kept all (-1), 300 epochs of them fill the node's disk. Autoresume reads
    the remote ``latest`` then, not the local files.
    """
    t = cfg.trainer
    if t.save_num_checkpoints_to_keep is not None:
        return t.save_num_checkpoints_to_keep
    return 1 if t.save_folder and parse_uri(t.save_folder)[0] else -1


def check_model_sizes(cfg: Config) -> list[str]:
    """Check, before anything is built, that the student (and the teacher, where distillation is
    on) run at the size they will see; one line each saying what it is built for.

    A model that cannot raises a :class:`ConfigError` naming the size's key and the nearest
    sizes that run (``models.check_input_size``: a forward on the meta device, no weights).
    """
    d = cfg.data
    roles = [("model", "student", cfg.model, d.image_size)]
    if cfg.algorithms.distillation.enabled:
        roles.append(("teacher", "teacher", cfg.teacher, cfg.teacher.img_size or d.image_size))
    lines = []
    for section, role, m, runs_at in roles:
        built_for = m.img_size or d.image_size
        key = f"{section}.img_size" if m.img_size else "data.image_size"
        extra = {"drop_path_rate": cfg.model.drop_path_rate} if section == "model" else {}
        try:
            took = check_input_size(str(m.name), runs_at, d.num_classes, img_size=built_for, **extra, **m.kwargs)
        except InputSizeError as e:
            hint = ""
            if section == "teacher" and not m.img_size:
                hint = " (or set teacher.img_size to one: the student's batch is resized for the teacher)"
            raise ConfigError("", key, f"{e}{hint}") from None
        if took:
            lines.append(f"{role} {m.name}: built for {built_for} px (timm's img_size), runs at {runs_at} px")
        else:
            lines.append(
                f"{role} {m.name}: runs at {runs_at} px (no img_size in its timm constructor: any size it can)"
            )
    return lines


def check_classes(cfg: Config) -> None:
    """The data's classes against ``data.num_classes``, before anything is built: the MDS root's
    ``classes.json`` (usi-convert-imagenet writes it) or the training folder's class folders. A
    mismatch is a :class:`ConfigError` on ``data.num_classes``; labels are also checked per sample
    as they are read (``LabelError``), since a label out of range is an opaque assert on a GPU."""
    d = cfg.data
    if d.remote or d.local:
        where = f"{(d.remote or d.local or '').rstrip('/')}/classes.json"
        wnids = read_classes_json(d.remote, d.local)
        if wnids is None:
            log.warning("no %s beside the shards: labels are checked sample by sample only", where)
            return
        found = f"{where} lists {len(wnids)} classes"
    else:
        assert d.train_dir is not None  # validated
        wnids = find_classes(d.train_dir)
        found = f"{d.train_dir} has {len(wnids)} class folders"
    if len(wnids) != d.num_classes:
        raise ConfigError("", "data.num_classes", f"is {d.num_classes}, but {found}: set data.num_classes={len(wnids)}")


def student_normalization(cfg: Config, backbone: torch.nn.Module | None = None) -> tuple[list[float], list[float]]:
    """The student's input mean/std: the config's, else the backbone's own (timm's data config).
    ``backbone`` None: ``cfg.model``'s, built on the meta device (no weights, no memory)."""
    if backbone is None:
        with torch.device("meta"):
            m = cfg.model
            img_size = m.img_size or cfg.data.image_size
            backbone = create_backbone(m.name, cfg.data.num_classes, img_size=img_size, **m.kwargs)
    resolved = resolve_data_config({}, model=backbone)
    return list(cfg.data.mean or resolved["mean"]), list(cfg.data.std or resolved["std"])


def ema_smoothing(decay: float, reference_batch_size: int, global_batch_size: int) -> float:
    """Per-step EMA smoothing equivalent to ``decay`` per step at ``reference_batch_size``.

    Keeps the half-life constant in samples: ``decay ** (global_batch / reference_batch)``.
    USI: 0.99996 per step at global batch 1024, a half-life of about 17.3k steps (17.7M samples).
    """
    return decay ** (global_batch_size / reference_batch_size)


def scaled_lr(cfg: Config) -> float:
    """The linear scaling rule: ``lr * global_batch / reference_batch``."""
    o = cfg.optimizer
    return o.lr * cfg.trainer.global_batch_size / o.reference_batch_size


def build_algorithms(
    cfg: Config,
    mean: list[float],
    std: list[float],
    compile: bool = False,
    teacher_cache: TeacherCacheReader | TeacherCacheWriter | None = None,
) -> list[Algorithm]:
    """``compile``: compile the teacher (the student is compiled by the Trainer). ``teacher_cache``:
    ``algorithms.distillation.cache``'s reader (the teacher is not built) or ``cache_write``'s writer."""
    a = cfg.algorithms
    algorithms: list[Algorithm] = []
    if a.mixup_cutmix.enabled:
        mc = a.mixup_cutmix
        algorithms.append(
            MixUpCutMix(
                cfg.data.num_classes,
                mixup_alpha=mc.mixup_alpha,
                cutmix_alpha=mc.cutmix_alpha,
                switch_prob=mc.switch_prob,
                prob=mc.prob,
                label_smoothing=mc.label_smoothing,
            )
        )
    if a.distillation.enabled:
        algorithms.append(build_distillation(cfg, mean, std, compile, teacher_cache))
    if a.ema.enabled:
        smoothing = ema_smoothing(a.ema.decay, a.ema.reference_batch_size, cfg.trainer.global_batch_size)
        algorithms.append(FusedEMA(half_life=None, smoothing=smoothing, update_interval="1ba"))
    if a.channels_last:
        algorithms.append(ChannelsLast())
    if a.progressive_resizing:
        algorithms.append(ProgressiveResizing())
    return algorithms


def build_distillation(
    cfg: Config,
    mean: list[float],
    std: list[float],
    compile: bool = False,
    teacher_cache: TeacherCacheReader | TeacherCacheWriter | None = None,
) -> KnowledgeDistillation:
    """``KnowledgeDistillation`` from the teacher (built, BN-folded, re-normalized from the student's
    ``mean``/``std``), or from a cache of its outputs (a reader: the teacher is not built)."""
    kd, t = cfg.algorithms.distillation, cfg.teacher
    reader = teacher_cache if isinstance(teacher_cache, TeacherCacheReader) else None
    teacher = None
    if reader is None:
        assert t.name is not None  # validated
        with _checkpoint_key("teacher.checkpoint", "teacher.trust_checkpoint"):
            teacher = build_teacher(
                t.name,
                cfg.data.num_classes,
                mean,
                std,
                checkpoint=t.checkpoint,
                pretrained=t.pretrained,
                teacher_mean=t.mean,
                teacher_std=t.std,
                fold_bn=t.fold_bn,
                channels_last=t.channels_last,
                compile=compile,
                img_size=t.img_size or cfg.data.image_size,
                trust_checkpoint=t.trust_checkpoint,
                **t.kwargs,
            )
    return KnowledgeDistillation(
        teacher,
        alpha=kd.alpha,
        temperature=kd.temperature,
        ce_weight=kd.ce_weight,
        log_interval=kd.log_interval,
        teacher_outputs=reader,
        on_teacher_outputs=teacher_cache if reader is None else None,
    )


def build_dataloaders(
    cfg: Config, mean: list[float], std: list[float], compile: bool = False
) -> tuple[DataSpec, DataSpec | None]:
    """Train and eval ``DataSpec``s: MDS shards via streaming when ``data.remote`` or ``data.local``
    is set, else ImageNet folders. Both yield uint8 images; normalization runs on the device.
    ``mean``/``std``: the student's normalization (:func:`student_normalization`); with ``cfg.data`` they
    make the one :class:`TransformSpec` both pipelines follow.
    ``compile``: eval batches are marked dynamic in size, so the last, smaller one compiles nothing."""
    d, t = cfg.data, cfg.trainer
    spec = TransformSpec.from_data(d, mean=mean, std=std)
    # The samples' transform (data: bytes, rng) -> what the loader batches, the same for MDS and folders
    gpu = build_gpu_pipeline(cfg, spec) if d.pipeline == "gpu" else None
    if gpu is not None:
        samples = (gpu.train_sample, gpu.eval_sample)
    else:
        fast = d.streaming.fast_decode
        samples = (BytesTransform(spec, training=True, fast=fast), BytesTransform(spec, training=False, fast=fast))
    loader_args: dict[str, Any] = dict(
        num_workers=d.num_workers,
        pin_memory=d.pin_memory and torch.cuda.is_available(),
        persistent_workers=d.persistent_workers,
        seed=t.seed,  # keys each sample's random view: sample_rng(seed, epoch, index)
        collate_fn=collate_encoded if gpu is not None else None,
    )
    per_device = t.global_batch_size // dist.get_world_size()
    batch_sizes = (per_device, t.eval_batch_size or per_device)
    make = _mds_loaders if d.remote or d.local else _folder_loaders
    train, val = make(cfg, samples, batch_sizes, loader_args)
    if gpu is not None:
        train_transform, eval_transform = gpu.train_device, gpu.eval_device
    else:
        train_transform = eval_transform = DeviceNormalize(
            spec.mean, spec.std, channels_last=cfg.algorithms.channels_last
        )
    # gpu: the batch holds host-side encoded images, which Composer's default split/count cannot read
    split = dict(split_batch=split_encoded, get_num_samples_in_batch=num_samples) if gpu else {}
    train_spec = DataSpec(train, microbatch_transforms=train_transform, **split)
    if val is None:
        return train_spec, None
    if compile:
        to_device = eval_transform
        eval_transform = lambda batch: mark_batch_dynamic(to_device(batch))  # noqa: E731
    return train_spec, DataSpec(val, microbatch_transforms=eval_transform, **split)


Loaders = tuple[Any, Any]  # the train loader, and the eval loader or None


def _mds_loaders(cfg: Config, samples: tuple[Any, Any], batch_sizes: tuple[int, int], args: dict[str, Any]) -> Loaders:
    d, s = cfg.data, cfg.data.streaming
    knobs: dict[str, Any] = dict(
        remote=d.remote,
        local=d.local,
        shuffle_algo=s.shuffle_algo,
        shuffle_seed=cfg.trainer.seed if s.shuffle_seed is None else s.shuffle_seed,
        shuffle_block_size=s.shuffle_block_size,
        num_canonical_nodes=s.num_canonical_nodes,
        predownload=s.predownload,
        cache_limit=s.cache_limit,
        download_timeout=s.download_timeout,
        download_retry=s.download_retry,
        validate_hash=validate_hash(d),
        num_classes=d.num_classes,
        **args,
    )
    train = streaming_dataloader(
        split=s.train_split, transform=samples[0], batch_size=batch_sizes[0], shuffle=True, drop_last=True, **knobs
    )
    if s.val_split is None:
        return train, None
    val = streaming_dataloader(
        split=s.val_split, transform=samples[1], batch_size=batch_sizes[1], shuffle=False, drop_last=False, **knobs
    )
    return train, val


def _folder_loaders(
    cfg: Config, samples: tuple[Any, Any], batch_sizes: tuple[int, int], args: dict[str, Any]
) -> Loaders:
    d = cfg.data
    assert d.train_dir is not None  # validated
    train = folder_dataloader(d.train_dir, samples[0], batch_sizes[0], shuffle=True, drop_last=True, **args)
    if d.val_dir is None:
        return train, None
    classes = train.dataset.classes  # val's labels are train's class indices
    val = folder_dataloader(
        d.val_dir, samples[1], batch_sizes[1], shuffle=False, drop_last=False, classes=classes, **args
    )
    return train, val


def validate_hash(d: DataConfig) -> str | None:
    """``data.streaming.validate_hash``: ``auto`` checks every shard downloaded from ``data.remote``
    against the sha1 in its index (the converter writes it), and nothing for a local root."""
    setting = d.streaming.validate_hash
    return ("sha1" if d.remote else None) if setting == "auto" else setting


@dataclass
class GPUPipeline:
    """``data.pipeline=gpu``: the workers' sample transforms and the device transforms."""

    train_sample: EncodedSample
    eval_sample: EncodedSample
    train_device: DeviceTransform
    eval_device: DeviceTransform


def build_gpu_pipeline(cfg: Config, spec: TransformSpec) -> GPUPipeline:
    """``spec``'s transforms, split between the loader workers and the device (``cfg.data.gpu_decode``,
    ``cfg.algorithms.channels_last``)."""
    decode_on_device, channels_last = cfg.data.gpu_decode, cfg.algorithms.channels_last
    return GPUPipeline(
        train_sample=EncodedSample(spec, training=True, decode_on_device=decode_on_device),
        eval_sample=EncodedSample(spec, training=False, decode_on_device=decode_on_device),
        train_device=DeviceTransform(spec, training=True, channels_last=channels_last),
        eval_device=DeviceTransform(spec, training=False, channels_last=channels_last),
    )


def build_callbacks(cfg: Config, evaluates: bool, compile: bool = False) -> list[Callback]:
    callbacks: list[Callback] = [LRMonitor(), SpeedMonitor(window_size=50)]
    if compile:
        kd = cfg.algorithms.distillation
        teacher = f" and teacher {cfg.teacher.name}" if kd.enabled and not kd.cache else ""  # a cache: none
        callbacks.append(CompileTime(f"student {cfg.model.name}{teacher}"))
    if cfg.algorithms.ema.enabled and cfg.algorithms.ema.best_of_raw and evaluates:
        callbacks.append(BestOfEMAAndRaw("top1"))
    return callbacks


def resolve_device_and_precision(cfg: Config, warn: bool = True) -> tuple[str, str]:
    """``gpu`` where there is one; mixed precision on GPUs, fp32 on the CPU (Composer trains
    on the CPU in fp32 only), so one yaml serves both. ``warn``: say so where the config asked
    for mixed precision on the CPU."""
    device = cfg.trainer.device or ("gpu" if torch.cuda.is_available() else "cpu")
    precision = cfg.trainer.precision or ("amp_bf16" if device == "gpu" else "fp32")
    if device == "cpu" and precision != "fp32":
        if warn:
            log.warning("trainer.precision=%s needs a GPU: training in fp32 on the CPU", precision)
        precision = "fp32"
    return device, precision


def build_trainer(
    cfg: Config,
    loggers: list[LoggerDestination] | None = None,
    callbacks: list[Callback] | None = None,
    student: ComposerModel | None = None,
) -> Trainer:
    """Model, teacher, algorithms, data, optimizer, schedule, checkpointing and the configured
    loggers (``loggers.wandb``), plus ``loggers``/``callbacks`` given here -> a ready Trainer.
    ``student``: train it instead of ``cfg.model`` (``usi-cache-teacher``'s ``NullStudent``); the data
    is still normalized for ``cfg.model``, as the run it stands in for."""
    t = cfg.trainer
    apply_patches()  # first: a Composer its overrides do not fit stops here, before anything is built
    # Composer warns on every batch about things that are expected here: MixUp/CutMix targets
    # sum to 1 only up to float rounding, and the last eval batch is smaller than the others.
    warnings.filterwarnings("ignore", message="Some targets have less than 1 total probability")
    warnings.filterwarnings("ignore", message="Cannot split tensor of length")
    check_before_building(cfg)
    wandb_logger = build_wandb_logger(cfg)
    loggers = [*(loggers or []), *([wandb_logger] if wandb_logger is not None else [])]
    reproducibility.seed_all(t.seed)
    device, precision = resolve_device_and_precision(cfg)
    _join_the_job(cfg, device)
    model = build_model(cfg) if student is None else student
    mean, std = student_normalization(cfg, model.module if student is None else None)
    compile = resolve_compile(t.compile, device)
    train_spec, eval_spec = build_dataloaders(cfg, mean, std, compile)
    teacher_cache = open_teacher_cache(
        cfg, train_spec.dataloader, mean=mean, std=std, device=device, precision=precision, compile=compile
    )
    lr = scaled_lr(cfg)
    o, s = cfg.optimizer, cfg.scheduler
    optimizer = build_optimizer(model.module, lr, o.weight_decay, (o.betas[0], o.betas[1]), o.eps)
    scheduler = CosineWithWarmupFrom(s.warmup, alpha_i=min(1.0, s.warmup_lr / lr), alpha_f=min(1.0, s.min_lr / lr))
    if device == "gpu":  # one input size throughout: let cuDNN pick the fastest kernels (as timm's train.py does)
        torch.backends.cudnn.benchmark = True
    all_callbacks = [
        *build_callbacks(cfg, eval_spec is not None, compile),
        # every checkpoint records the config, for a later autoresume to check (patches.Trainer)
        ConfigRecord(loggable_config(cfg), accept=t.autoresume_accept),
        *([teacher_cache] if teacher_cache is not None else []),
        *(callbacks or []),
    ]
    with trusting_checkpoints(t.trust_checkpoints), _resume_errors(cfg):
        return Trainer(
            model=model,
            train_dataloader=train_spec,
            eval_dataloader=eval_spec,
            eval_interval=t.eval_interval if eval_spec is not None else 1,
            optimizers=optimizer,
            schedulers=scheduler,
            step_schedulers_every_batch=True,
            algorithms=build_algorithms(cfg, mean, std, compile, teacher_cache),
            device=device,
            precision=precision,
            compile_config={} if compile else None,  # Composer compiles the student (after DDP wrapping)
            loggers=loggers or None,
            callbacks=all_callbacks,
            **_trainer_settings(cfg),
        )


def check_before_building(cfg: Config) -> None:
    """What can be refused before anything is built, downloaded or started: sizes the models cannot
    run at, classes that do not fit the data, a teacher of other classes, a load path not to be read."""
    for line in check_model_sizes(cfg):  # before the data, the weights and the W&B run
        log.info(line)
    check_classes(cfg)
    check_teacher_classes(cfg)
    t = cfg.trainer
    if t.load_path:
        with _checkpoint_key("trainer.load_path", "trainer.trust_checkpoints"):
            refuse_plain_http(t.load_path)
            if is_tar(t.load_path) and not t.trust_checkpoints:  # Composer 0.32.1: download_checkpoint
                what = "extract a tar archive (Composer extracts it unfiltered: a member can write any file)"
                raise UnsafeCheckpointError(t.load_path, what)


def _join_the_job(cfg: Config, device: str) -> None:
    t = cfg.trainer
    if dist.get_world_size() > 1:
        # One rendezvous for the run, before the data: a StreamingDataset built before it makes
        # its own process group and destroys it, and the Trainer's rendezvous on the same port
        # then races with that store's teardown (a node fails with "failed to recv, got 0 bytes").
        # Composer's default timeout, as the Trainer's.
        dist.initialize_dist(device)
        if dist.get_world_size() > dist.get_local_world_size():
            separate_node_signal_files()
    if t.autoresume and not parse_uri(str(t.save_folder))[0]:  # a local folder, where a write may have failed
        if dist.get_global_rank() == 0:
            set_aside_partial_checkpoints(format_name_with_dist(str(t.save_folder), t.run_name))
        dist.barrier()


def _trainer_settings(cfg: Config) -> dict[str, Any]:
    """The Trainer's arguments that are ``trainer.*`` keys as they are."""
    t = cfg.trainer
    return dict(
        max_duration=t.max_duration,
        device_train_microbatch_size=t.microbatch_size,
        seed=t.seed,
        run_name=t.run_name,
        save_folder=t.save_folder,
        save_interval=t.save_interval,
        save_num_checkpoints_to_keep=local_checkpoints_to_keep(cfg),
        save_overwrite=t.save_overwrite,
        autoresume=t.autoresume,
        load_path=t.load_path,
        progress_bar=t.progress_bar,
        log_to_console=t.log_to_console,
        console_log_interval=t.console_log_interval,
        train_subset_num_batches=t.train_subset_num_batches,
        eval_subset_num_batches=t.eval_subset_num_batches,
        parallelism_config={"fsdp": dict(t.fsdp)} if t.fsdp is not None else None,
    )


@contextlib.contextmanager
def _resume_errors(cfg: Config) -> Iterator[None]:
    """The checkpoint Composer resumes from, refused or not complete: a config error on the key that named it."""
    t = cfg.trainer
    try:
        yield
    except CheckpointError as e:
        key = "trainer.autoresume" if t.autoresume else "trainer.load_path"
        if not isinstance(e, UnsafeCheckpointError):
            raise ConfigError("", key, str(e)) from None
        where = e.path if os.path.exists(e.path) else str(t.load_path or t.save_folder)  # a download is gone
        refused = UnsafeCheckpointError(where, e.what)
        raise ConfigError("", key, f"{refused}; if you trust this file, set trainer.trust_checkpoints=true") from None
