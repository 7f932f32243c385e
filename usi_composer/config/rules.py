"""The rules that span keys, each named for what it requires, and :func:`validate`.

Each rule returns ``(key, message)`` for the first problem it finds, or None. What needs the
environment (the world size, CUDA) is the run plan's to check (``usi_composer/plan.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import fields

from usi_composer.algorithms import MixUpCutMix
from usi_composer.config.fields import leaf_fields, value_at
from usi_composer.config.schema import Config, suggest

__all__ = ["RULES", "Problem", "validate"]

Problem = tuple[str, str] | None


def data_source_is_set(cfg: Config) -> Problem:
    d = cfg.data
    if d.remote or d.local or d.train_dir:
        return None
    return "data.train_dir", "set data.train_dir (an ImageNet folder) or data.remote / data.local (MDS shards)"


def img_size_is_not_a_kwarg(cfg: Config) -> Problem:
    for section in ("model", "teacher"):
        if "img_size" in getattr(cfg, section).kwargs:
            message = f"set {section}.img_size instead (the recipe passes it to timm where the model takes it)"
            return f"{section}.kwargs.img_size", message
    return None


def distillation_has_a_teacher(cfg: Config) -> Problem:
    if not cfg.algorithms.distillation.enabled:
        return None
    teacher = cfg.teacher
    if teacher.name is None:
        return "teacher.name", (
            "distillation is enabled but no teacher is set (set teacher.name, or algorithms.distillation.enabled=false)"
        )
    if (
        not (teacher.checkpoint or teacher.pretrained) and not cfg.algorithms.distillation.cache
    ):  # a cache needs no weights
        return "teacher.checkpoint", (
            "a teacher needs trained weights: set teacher.checkpoint=PATH_OR_URI "
            "or teacher.pretrained=true (needs network)"
        )
    return None


def teacher_cache_is_read_or_written(cfg: Config) -> Problem:
    kd = cfg.algorithms.distillation
    key = "algorithms.distillation"
    if kd.cache and kd.cache_write:
        return f"{key}.cache_write", "a run reads a teacher cache (cache) or writes one (cache_write), not both"
    if (kd.cache or kd.cache_write) and not kd.enabled:
        which = "cache" if kd.cache else "cache_write"
        return f"{key}.{which}", "a teacher cache needs distillation: set algorithms.distillation.enabled=true"
    if kd.cache_format == "topk" and kd.cache_topk is None:
        return f"{key}.cache_topk", "cache_format=topk needs k: set algorithms.distillation.cache_topk (e.g. 10)"
    if kd.cache_format == "topk" and kd.cache_topk is not None and kd.cache_topk >= cfg.data.num_classes:
        return f"{key}.cache_topk", (
            f"must be below data.num_classes ({cfg.data.num_classes}), got {kd.cache_topk}; for every logit set "
            "algorithms.distillation.cache_format=full"
        )
    if kd.cache_format == "full" and kd.cache_topk is not None:
        return f"{key}.cache_topk", "is for cache_format=topk (cache_format is full: every logit is stored)"
    return None


def mixup_has_an_alpha(cfg: Config) -> Problem:
    m = cfg.algorithms.mixup_cutmix
    message = MixUpCutMix.alphas_violation(m.mixup_alpha, m.cutmix_alpha) if m.enabled else None
    if message is None:
        return None
    return "algorithms.mixup_cutmix.mixup_alpha", f"{message} (or set algorithms.mixup_cutmix.enabled=false)"


def gpu_pipeline_limits(cfg: Config) -> Problem:
    d = cfg.data
    if d.pipeline != "gpu":
        return None
    if d.auto_augment and not d.auto_augment.startswith("rand-"):
        return "data.auto_augment", (
            f"data.pipeline=gpu implements timm's RandAugment (rand-...) only, got '{d.auto_augment}'"
        )
    if cfg.algorithms.progressive_resizing:
        return (
            "algorithms.progressive_resizing",
            "resizes the batch before the device has decoded it: use data.pipeline=cpu",
        )
    return None


def fsdp_on_gpus(cfg: Config) -> Problem:
    trainer = cfg.trainer
    if trainer.fsdp is None:
        return None
    from composer.utils.parallelism import FSDPConfig

    known = [f.name for f in fields(FSDPConfig) if not f.name.startswith("_")]
    unknown = sorted(set(trainer.fsdp) - set(known))
    if unknown:
        return f"trainer.fsdp.{unknown[0]}", f"not a Composer FSDP option{suggest(unknown[0], known)}"
    if trainer.device == "cpu":
        return "trainer.fsdp", "FSDP runs on GPUs only (Composer); use DDP on CPUs"
    return None


def autoresume_has_a_run(cfg: Config) -> Problem:
    trainer = cfg.trainer
    if trainer.autoresume and not trainer.run_name:
        return "trainer.run_name", "autoresume needs a fixed run_name"
    if trainer.autoresume and not trainer.save_folder:
        return "trainer.save_folder", "autoresume needs a save_folder"
    return None


def sharded_checkpoints_are_trusted(cfg: Config) -> Problem:
    trainer = cfg.trainer
    sharded = (trainer.fsdp or {}).get("state_dict_type") == "sharded"
    if not sharded or not (trainer.autoresume or trainer.load_path) or trainer.trust_checkpoints:
        return None
    # torch.distributed.checkpoint unpickles sharded checkpoints in full (their .metadata too)
    return "trainer.fsdp.state_dict_type", (
        "sharded checkpoints can only be loaded by unpickling them in full (torch.distributed.checkpoint): "
        "set trainer.trust_checkpoints=true if the checkpoint folder is as trusted as the code"
    )


RULES: tuple[Callable[[Config], Problem], ...] = (
    data_source_is_set,
    img_size_is_not_a_kwarg,
    distillation_has_a_teacher,
    teacher_cache_is_read_or_written,
    mixup_has_an_alpha,
    gpu_pipeline_limits,
    fsdp_on_gpus,
    autoresume_has_a_run,
    sharded_checkpoints_are_trusted,
)


def validate(cfg: Config) -> Problem:
    """The first problem of ``cfg``: each key against its declared constraint, then :data:`RULES`."""
    return next(_field_problems(cfg), None) or next((p for rule in RULES if (p := rule(cfg))), None)


def _field_problems(cfg: Config) -> Iterator[tuple[str, str]]:
    for leaf in leaf_fields(cfg):
        value, meta = value_at(cfg, leaf.key), leaf.field.metadata
        if value is None:
            continue
        if "range" in meta and value not in meta["range"]:
            unit = f" {meta['unit']}" if meta["unit"] else ""
            yield leaf.key, f"must be {meta['range']}{unit}, got {value}"
        elif "check" in meta and (message := meta["check"](value)) is not None:
            yield leaf.key, message
