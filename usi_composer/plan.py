"""The run plan: every value derived from the config and the environment, settled once.

``resolve(cfg, env) -> RunPlan`` decides the device, precision and compilation, the world layout and
the per-process batch and microbatches, the student's and the teacher's normalization, the teacher's
resolved pretrained config and where its weights come from, the scaled learning rate and the EMA
smoothing. Every builder, the teacher cache's fingerprint, the sweep's grouping, ``usi-eval``,
``usi-export`` and ``--dry-run`` read them here and derive nothing again.

Like the config's fields, the plan's fields declare a role (``usi_composer/config/fields.py``): the
ones marked ``teacher_input`` join the config's in a teacher cache's fingerprint. This module builds
nothing: the student's normalization comes from its timm config, read from a model made on PyTorch's
meta device (no weights, no memory), and the teacher's from timm's pretrained config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from usi_composer.config import Config, ConfigError, leaf_fields
from usi_composer.config.fields import free, math, teacher_input
from usi_composer.storage import is_remote

__all__ = ["Env", "RunPlan", "describe", "kwargs_key", "resolve", "student_normalization", "teacher_pretrained_cfg"]


@dataclass(frozen=True)
class Env:
    """What the environment says about this process: the job's layout (Composer's launcher sets
    ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``RANK``) and whether CUDA is there."""

    world_size: int = 1
    local_world_size: int = 1
    global_rank: int = 0
    cuda: bool = False

    @classmethod
    def current(cls, environ: Mapping[str, str] | None = None) -> Env:
        import torch

        environ = os.environ if environ is None else environ
        world_size = int(environ.get("WORLD_SIZE", "1"))
        return cls(
            world_size=world_size,
            local_world_size=int(environ.get("LOCAL_WORLD_SIZE", str(world_size))),
            global_rank=int(environ.get("RANK", "0")),
            cuda=torch.cuda.is_available(),
        )


def _streams(cfg: Any) -> bool:
    return bool(cfg.data.remote or cfg.data.local)


@dataclass(frozen=True)
class RunPlan:
    """The values derived from a config and an environment (see the module's doc)."""

    # where and how it runs
    device: str = teacher_input()  # cpu | gpu | mps
    precision: str = teacher_input()  # Composer's: fp32, amp_bf16, ...
    compile: bool = teacher_input()  # torch.compile the student and the teacher
    torch: str = teacher_input()  # kernels differ between versions in their last bits
    world_size: int = teacher_input()
    ranks_per_node: int = teacher_input(when=_streams)  # streaming partitions by nodes and ranks
    num_nodes: int = free()
    # the batch
    per_process_batch: int = math()
    microbatch_size: int | str = teacher_input()  # auto: Composer's automatic microbatching (CUDA)
    microbatches: int | None = math()  # per batch, per process; None: auto
    eval_batch_size: int = free()  # per process
    # the data
    streams: bool = free()  # MDS shards (data.remote / data.local), else image folders
    shuffle_seed: int = teacher_input(when=_streams)
    validate_hash: str | None = free()
    evaluates: bool = free()
    student_mean: tuple[float, ...] = teacher_input()  # the data is normalized for the student
    student_std: tuple[float, ...] = teacher_input()
    # the teacher (None where the run does not distil)
    builds_teacher: bool = free()  # distils with a teacher in memory (not from a cache)
    teacher_img_size: int | None = teacher_input()
    teacher_mean: tuple[float, ...] | None = teacher_input()
    teacher_std: tuple[float, ...] | None = teacher_input()
    teacher_classes: int | None = free()  # its outputs: the data's classes, or its weights' (teacher.class_map)
    teacher_outputs: tuple[int, ...] | None = teacher_input()  # which of them are the data's (teacher.class_map)
    teacher_weights: str | None = free()  # where its weights come from (a cache compares their sha256)
    # the optimization
    lr: float = math()  # scaled: optimizer.lr * global batch / reference batch
    warmup_from: float = math()  # scheduler.warmup_lr / lr, at most 1
    anneal_to: float = math()  # scheduler.min_lr / lr, at most 1
    ema_smoothing: float | None = math()  # per step, for this global batch
    checkpoints_to_keep: int = free()  # trainer.save_num_checkpoints_to_keep, resolved
    notes: tuple[str, ...] = free()  # what the plan changed from the config, said once at the start

    def teacher_inputs(self, cfg: Config) -> dict[str, Any]:
        """The plan's ``teacher_input`` fields that apply to ``cfg``'s run, by name."""
        return {
            leaf.key: _plain(getattr(self, leaf.key))
            for leaf in leaf_fields(self)
            if leaf.role == "teacher_input" and leaf.applies(cfg)
        }

    def as_dict(self) -> dict[str, Any]:
        """Every field, as plain data (for ``--dry-run`` and the W&B config)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def resolve(cfg: Config, env: Env | None = None) -> RunPlan:
    """The :class:`RunPlan` of ``cfg`` in ``env`` (default: this process's). Raises a one-line
    :class:`ConfigError` for what only the environment shows wrong (a batch that does not split over
    the processes, a model's kwargs that timm does not take)."""
    import torch

    env = env or Env.current()
    notes: list[str] = []
    device, precision = _device_and_precision(cfg, env, notes)
    per_process, micro = _batch_layout(cfg, env, device)
    mean, std = student_normalization(cfg)
    teacher = _teacher_plan(cfg, mean, std)
    lr = cfg.optimizer.lr * cfg.trainer.global_batch_size / cfg.optimizer.reference_batch_size
    warmup_from = _warmup_from(cfg, lr, notes)
    ema = cfg.algorithms.ema
    streaming, trainer = cfg.data.streaming, cfg.trainer
    return RunPlan(
        device=device,
        precision=precision,
        compile=device == "gpu" if trainer.compile == "auto" else bool(trainer.compile),
        torch=torch.__version__,
        world_size=env.world_size,
        ranks_per_node=env.local_world_size,
        num_nodes=max(1, env.world_size // max(1, env.local_world_size)),
        per_process_batch=per_process,
        microbatch_size=micro,
        microbatches=-(-per_process // micro) if isinstance(micro, int) else None,
        eval_batch_size=trainer.eval_batch_size or per_process,
        streams=_streams(cfg),
        shuffle_seed=trainer.seed if streaming.shuffle_seed is None else streaming.shuffle_seed,
        validate_hash=_validate_hash(cfg),
        evaluates=bool(cfg.data.val_dir if not _streams(cfg) else streaming.val_split),
        student_mean=mean,
        student_std=std,
        **teacher,
        lr=lr,
        warmup_from=warmup_from,
        anneal_to=min(1.0, cfg.scheduler.min_lr / lr),
        # keeps the half-life in samples: decay ** (global batch / reference batch) per step
        ema_smoothing=ema.decay ** (trainer.global_batch_size / ema.reference_batch_size) if ema.enabled else None,
        checkpoints_to_keep=_checkpoints_to_keep(cfg),
        notes=tuple(notes),
    )


def _device_and_precision(cfg: Config, env: Env, notes: list[str]) -> tuple[str, str]:
    """``gpu`` where there is one; mixed precision on GPUs, fp32 on the CPU (Composer trains on the CPU in
    fp32 only), so one yaml serves both."""
    device = cfg.trainer.device or ("gpu" if env.cuda else "cpu")
    precision = cfg.trainer.precision or ("amp_bf16" if device == "gpu" else "fp32")
    if device == "cpu" and precision != "fp32":
        notes.append(f"trainer.precision={precision} needs a GPU: training in fp32 on the CPU")
        precision = "fp32"
    return device, precision


def _batch_layout(cfg: Config, env: Env, device: str) -> tuple[int, int | str]:
    """The per-process batch and microbatch: the global batch over the processes, each process's batch
    into microbatches, and MixUp/CutMix's even microbatches."""
    trainer = cfg.trainer
    if trainer.global_batch_size % env.world_size:
        message = f"{trainer.global_batch_size} does not divide by the world size {env.world_size}"
        raise ConfigError("trainer.global_batch_size", message)
    per_process = trainer.global_batch_size // env.world_size
    if trainer.microbatch_size == "auto":
        return per_process, _auto_microbatching(cfg, device)
    micro = int(trainer.microbatch_size or per_process)
    if not 0 < micro <= per_process:
        message = f"must be in [1, {per_process}] (the per-process batch), got {trainer.microbatch_size}"
        raise ConfigError("trainer.microbatch_size", message)
    if cfg.algorithms.mixup_cutmix.enabled and micro % 2:
        key = "trainer.microbatch_size" if trainer.microbatch_size else "trainer.global_batch_size"
        message = f"MixUp/CutMix mixes each microbatch with its reverse and needs an even size per process, got {micro}"
        raise ConfigError(key, message)
    return per_process, micro


def _auto_microbatching(cfg: Config, device: str) -> str:
    """``trainer.microbatch_size=auto``: Composer halves the microbatch after a CUDA out-of-memory error
    until the step fits. Only on GPUs; and not with a teacher cache, whose batches are stored by microbatch."""
    if device != "gpu":
        message = (
            "auto (Composer's automatic microbatching) needs CUDA: on this machine set a number of samples "
            f"(e.g. {cfg.trainer.global_batch_size // 4}) or null for the whole batch"
        )
        raise ConfigError("trainer.microbatch_size", message)
    kd = cfg.algorithms.distillation
    if kd.enabled and (kd.cache or kd.cache_write):
        message = "auto cannot serve a teacher cache (its batches are stored by microbatch): set a number"
        raise ConfigError("trainer.microbatch_size", message)
    return "auto"


def student_normalization(cfg: Config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The student's input mean/std: ``data.mean``/``data.std``, else the backbone's own (timm's data
    config of ``cfg.model``, made on the meta device)."""
    data = cfg.data
    if data.mean and data.std:
        return tuple(map(float, data.mean)), tuple(map(float, data.std))
    import torch
    from timm.data import resolve_data_config

    from usi_composer.models import create_model_for_size

    model = cfg.model
    kwargs = {k: v for k, v in model.kwargs.items() if v is not None}
    with torch.device("meta"), kwargs_key("model"):
        backbone, _ = create_model_for_size(model.name, model.img_size or data.image_size, **kwargs)
    resolved = resolve_data_config({}, model=backbone)
    mean, std = data.mean or resolved["mean"], data.std or resolved["std"]
    return tuple(map(float, mean)), tuple(map(float, std))


@contextlib.contextmanager
def kwargs_key(section: str) -> Iterator[None]:
    """A timm constructor's ``TypeError`` for an argument it does not take, as a one-line config error on
    ``<section>.kwargs.<argument>`` (timm passes ``model.kwargs`` on to the model's class)."""
    try:
        yield
    except TypeError as e:
        found = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if found is None:
            raise
        key = f"{section}.kwargs.{found.group(1)}"
        raise ConfigError(key, f"not an argument of the timm model's constructor ({e})") from None


def teacher_pretrained_cfg(cfg: Config) -> Any:
    """timm's pretrained config of ``teacher.name`` (its tag, ``pretrained_cfg`` and
    ``pretrained_cfg_overlay`` kwargs included): what its pretrained weights are, classify and expect."""
    from timm.models import resolve_pretrained_cfg, split_model_name_tag

    teacher = cfg.teacher
    architecture, tag = split_model_name_tag(str(teacher.name))
    overlay = dict(teacher.kwargs.get("pretrained_cfg_overlay") or {})
    return resolve_pretrained_cfg(architecture, teacher.kwargs.get("pretrained_cfg") or tag or None, overlay)


def _teacher_plan(cfg: Config, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, Any]:
    """The teacher's fields of the plan: its size, its normalization (``teacher.mean``/``std``, else its
    timm pretrained config's, else the student's), its weights' classes and source."""
    kd, teacher = cfg.algorithms.distillation, cfg.teacher
    if not kd.enabled or teacher.name is None:
        none = (
            "teacher_img_size",
            "teacher_mean",
            "teacher_std",
            "teacher_classes",
            "teacher_outputs",
            "teacher_weights",
        )
        return {"builds_teacher": False, **dict.fromkeys(none)}
    pretrained = teacher_pretrained_cfg(cfg)
    teacher_mean = teacher.mean or getattr(pretrained, "mean", None) or mean
    teacher_std = teacher.std or getattr(pretrained, "std", None) or std
    if teacher.checkpoint:
        weights = teacher.checkpoint
    elif teacher.pretrained:
        weights = f"timm:{pretrained.hf_hub_id or pretrained.url or teacher.name}"
    else:
        weights = None
    return {
        "builds_teacher": not kd.cache,
        "teacher_img_size": teacher.img_size or cfg.data.image_size,
        "teacher_mean": tuple(map(float, teacher_mean)),
        "teacher_std": tuple(map(float, teacher_std)),
        "teacher_classes": pretrained.num_classes if teacher.pretrained or teacher.class_map else cfg.data.num_classes,
        "teacher_outputs": _teacher_outputs(cfg, pretrained.num_classes),
        "teacher_weights": weights,
    }


def data_classes(cfg: Config) -> tuple[list[str] | None, str]:
    """The data's class names, in label order, and where they were read: the MDS root's ``classes.json``
    (usi-convert-imagenet writes it; None where there is none) or the training folder's class folders."""
    from usi_composer import storage
    from usi_composer.data.layout import find_classes
    from usi_composer.data.mds import read_classes_json

    data = cfg.data
    if _streams(cfg):
        where = storage.join((data.remote or data.local or "").rstrip("/"), "classes.json")
        return read_classes_json(data.remote, data.local), where
    return find_classes(str(data.train_dir)), f"{data.train_dir}'s class folders"


def _teacher_outputs(cfg: Config, teacher_classes: int) -> tuple[int, ...] | None:
    """``teacher.class_map``: for each of the data's classes, the teacher's output that is that class."""
    class_map, key = cfg.teacher.class_map, "teacher.class_map"
    if class_map is None:
        return None
    if class_map == "imagenet":
        from timm.data import ImageNetInfo

        index = {wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())}
        names, where = data_classes(cfg)
        if names is None:
            raise ConfigError(key, f"imagenet needs the data's class names (wnids): {where} has none")
        unknown = [name for name in names if name not in index]
        if unknown:
            raise ConfigError(
                key, f"imagenet: {len(unknown)} of {where} are not ImageNet-1k wnids (first: {unknown[0]})"
            )
        outputs = [index[name] for name in names]
    else:
        try:
            outputs = [int(line) for line in Path(class_map).read_text().split()]
        except (OSError, ValueError) as e:
            raise ConfigError(key, f"not a file of one output index per line: {class_map} ({e})") from None
    if len(outputs) != cfg.data.num_classes or not all(0 <= i < teacher_classes for i in outputs):
        message = f"maps {len(outputs)} classes to outputs {min(outputs, default=0)}..{max(outputs, default=0)}"
        raise ConfigError(
            key, f"{message}; it needs data.num_classes ({cfg.data.num_classes}) outputs of 0..{teacher_classes - 1}"
        )
    return tuple(outputs)


def _warmup_from(cfg: Config, lr: float, notes: list[str]) -> float:
    """The warm-up's start as a fraction of the scaled LR: ``scheduler.warmup_lr`` is absolute, so at a
    small global batch it can reach the scaled peak, and the warm-up is flat; said once."""
    start = cfg.scheduler.warmup_lr / lr
    if start >= 1.0 and cfg.scheduler.warmup not in ("0ep", "0ba", "0sp", "0dur"):
        notes.append(
            f"scheduler.warmup_lr={cfg.scheduler.warmup_lr:g} is not below the scaled learning rate {lr:g} "
            f"(optimizer.lr at global batch {cfg.trainer.global_batch_size}): the warm-up is flat; set "
            f"scheduler.warmup_lr below {lr:g} (e.g. {lr / 20:.3g}), or scheduler.warmup=0ep"
        )
    return min(1.0, start)


def _validate_hash(cfg: Config) -> str | None:
    """``data.streaming.validate_hash``: ``auto`` checks every shard downloaded from ``data.remote``
    against the sha1 in its index (the converter writes it), and nothing for a local root."""
    setting = cfg.data.streaming.validate_hash
    return ("sha1" if cfg.data.remote else None) if setting == "auto" else setting


def _checkpoints_to_keep(cfg: Config) -> int:
    """``trainer.save_num_checkpoints_to_keep``; null: -1 (all) for a local save_folder, 1 for a remote one.

    With a remote save_folder, Composer 0.32.1's CheckpointSaver writes each checkpoint into a local
    temporary folder and uploads a copy of it, so the local files are only the last few: kept all (-1),
    300 epochs of them fill the node's disk. Autoresume reads the remote ``latest`` then.
    """
    trainer = cfg.trainer
    if trainer.save_num_checkpoints_to_keep is not None:
        return trainer.save_num_checkpoints_to_keep
    return 1 if trainer.save_folder and is_remote(trainer.save_folder) else -1


def describe(plan: RunPlan) -> Iterator[str]:
    """The plan as ``key: value`` lines, secrets redacted (``--dry-run`` prints them after the config; a
    teacher checkpoint's pre-signed URL is among the values)."""
    from usi_composer.redaction import redact

    for key, value in redact(plan.as_dict()).items():
        yield f"{key}: {value}"
