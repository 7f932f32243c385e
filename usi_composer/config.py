"""The recipe's typed configuration: YAML + ``key=value`` overrides -> validated dataclasses.

Every problem becomes a :class:`ConfigError` whose one-line message names the source (the
yaml file or the override), the key path and, where one exists, a suggestion. Nothing heavy
(models, data, processes) is built here; the only outside knowledge consulted is timm's
model registry, to catch misspelled model names before anything is downloaded or trained.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from composer.core import Time
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from usi_composer.errors import UsiError

__all__ = ["Config", "ConfigError", "config_to_dict", "dump_config", "load_config"]


class ConfigError(UsiError, ValueError):
    """A bad configuration, with a one-line message: ``<source>: <key.path>: <what is wrong>``."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source, self.key, self.message = source, key, message
        location = ": ".join(part for part in (source, key) if part)  # no source: found after loading
        super().__init__(f"{location}: {message}")


# --------------------------------------------------------------------------- schema
# Defaults are USI's values (Ridnik et al., 2022, and the official Solving_ImageNet code);
# yamls/usi.yaml repeats them with their sources.


@dataclass
class ModelConfig:
    name: str = MISSING  # any timm model name, e.g. resnet50, deit_small_patch16_224
    checkpoint: str | None = None  # initial weights: local path or object-store URI
    trust_checkpoint: bool = False  # unpickle checkpoint in full (it may run code); false: read it as data
    pretrained: bool = False  # timm's pretrained weights (needs network)
    drop_path_rate: float | None = None  # None: the backbone's own default
    # The size timm builds the model for (img_size=, where its constructor takes it: ViT, Swin,
    # LeViT, MLP-Mixer, ...); None: data.image_size. Its inputs are data.image_size regardless.
    img_size: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class TeacherConfig:
    name: str | None = None  # timm model name (a pretrained tag like '.miil_in21k_ft_in1k' is allowed)
    checkpoint: str | None = None  # weights: local path or object-store URI (s3://, gs://, ...)
    trust_checkpoint: bool = False  # unpickle checkpoint in full (it may run code); false: read it as data
    pretrained: bool = False  # timm's pretrained weights instead (needs network)
    # The size the teacher is built for (as model.img_size) and sees: the student's batch is
    # resized to it where they differ. None: data.image_size.
    img_size: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    mean: list[float] | None = None  # the inputs the teacher was trained on; None: its timm pretrained_cfg
    std: list[float] | None = None
    fold_bn: bool = True  # fold BatchNorm into the preceding conv where that is exact
    channels_last: bool = True


@dataclass
class StreamingConfig:
    """mosaicml-streaming knobs for MDS data (``data.remote`` / ``data.local``); null = streaming's default."""

    train_split: str = "train"  # <remote or local>/<split>/index.json, as written by usi-convert-imagenet
    val_split: str | None = "val"  # None: no evaluation
    shuffle_algo: str = "py1e"
    shuffle_seed: int | None = None  # None: trainer.seed
    shuffle_block_size: int | None = None
    num_canonical_nodes: int | None = None  # None: the first run's node count (checkpoints keep it); see usi.yaml
    predownload: int | None = None  # samples to download ahead per worker
    cache_limit: str | None = None  # e.g. 100gb: evict shards beyond this; None: keep all
    download_timeout: float = 60.0  # seconds per shard
    download_retry: int = 2
    validate_hash: str | None = None  # e.g. sha1 (the converter stores sha1 per shard)
    fast_decode: bool = True  # reduced-size JPEG decode + one-call crop/resize (same views); folders too


@dataclass
class DataConfig:
    train_dir: str | None = None  # ImageNet layout: <train_dir>/<class>/<image> (unused when streaming)
    val_dir: str | None = None  # same layout; None: no evaluation
    remote: str | None = None  # MDS root (s3://bucket/imagenet, ...) from usi-convert-imagenet; set = streaming
    local: str | None = None  # local cache of remote; without remote: a local MDS root
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    num_classes: int = 1000
    image_size: int = 224
    crop_pct: float = 0.95  # eval: resize to image_size / crop_pct, center crop image_size
    interpolation: str = "bicubic"
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])
    hflip: float = 0.5
    auto_augment: str | None = "rand-m7-mstd0.5-inc1"
    mean: list[float] | None = None  # None: the student backbone's own
    std: list[float] | None = None
    num_workers: int = 8
    pin_memory: bool = True
    persistent_workers: bool = True
    # cpu: workers decode and augment (timm's PIL transforms); gpu: workers read bytes and draw the
    # random choices, decode/crop/RandAugment/normalize run batched on the device (data/gpu_pipeline.py)
    pipeline: str = "cpu"
    gpu_decode: bool = True  # gpu pipeline: decode JPEGs on the device (nvJPEG); false: in the workers, reduced size


@dataclass
class DistillationConfig:
    enabled: bool = True
    alpha: float = 5.0
    temperature: float = 1.0
    ce_weight: float = 1.0
    log_interval: int = 100  # batches between reads of the ce/kd means and the non-finite check (one sync each)


@dataclass
class MixUpCutMixConfig:
    enabled: bool = True
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    switch_prob: float = 0.5
    prob: float = 1.0
    label_smoothing: float = 0.0


@dataclass
class EMAConfig:
    enabled: bool = True
    decay: float = 0.99996  # per optimizer step ...
    reference_batch_size: int = 1024  # ... at this global batch; rescaled to keep the half-life in samples
    best_of_raw: bool = True  # also validate the raw weights; keep the better (official USI)


@dataclass
class AlgorithmsConfig:
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    mixup_cutmix: MixUpCutMixConfig = field(default_factory=MixUpCutMixConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    channels_last: bool = True
    progressive_resizing: bool = False  # deliberately off in USI, see yamls/usi.yaml


@dataclass
class OptimizerConfig:
    lr: float = 2e-3  # at reference_batch_size; scaled linearly with the global batch
    reference_batch_size: int = 1024
    weight_decay: float = 2e-2  # not on biases and norm parameters
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    warmup: str = "5ep"
    warmup_lr: float = 1e-4  # warm-up starts here ...
    min_lr: float = 1e-6  # ... and the cosine ends here (absolute learning rates)


@dataclass
class TrainerConfig:
    global_batch_size: int = 1024  # summed over all processes
    eval_batch_size: int | None = None  # per process; None: the training batch per process
    microbatch_size: int | None = None  # per process; None: the whole per-process batch
    max_duration: str = "300ep"
    eval_interval: str = "1ep"
    precision: str | None = "amp_bf16"  # fp32 | amp_fp16 | amp_bf16; None: fp32 on CPU, amp_bf16 on GPU
    device: str | None = None  # cpu | gpu; None: gpu if available
    # torch.compile student and teacher: auto | true | false; auto = on for GPUs, off on the CPU.
    # (Any: omegaconf has no bool-or-str type; validated below.)
    compile: Any = "auto"
    seed: int = 0
    run_name: str | None = None
    save_folder: str | None = None  # local path or object-store URI; None: no checkpoints
    save_interval: str = "1ep"
    save_num_checkpoints_to_keep: int | None = None  # local copies; None: all (-1) for a local save_folder, 1 remote
    save_overwrite: bool = False
    autoresume: bool = False  # needs run_name and save_folder
    autoresume_accept: list[str] = field(default_factory=list)  # keys whose change to the training math may resume
    load_path: str | None = None
    trust_checkpoints: bool = False  # resume (load_path, autoresume) unpickling in full; false: read as data
    progress_bar: bool = True
    log_to_console: bool = False
    console_log_interval: str = "1ep"
    train_subset_num_batches: int = -1
    eval_subset_num_batches: int = -1
    fsdp: dict[str, Any] | None = None  # Composer FSDP (v1) options, e.g. {sharding_strategy: FULL_SHARD}; GPUs only


@dataclass
class WandBConfig:
    """Composer's ``WandBLogger``; the mode (online/offline) follows ``WANDB_MODE`` unless set here."""

    project: str | None = None  # None: W&B's default (WANDB_PROJECT, else 'uncategorized')
    entity: str | None = None  # None: your default entity
    group: str | None = None  # e.g. one ablation's name, to compare its runs side by side
    tags: list[str] = field(default_factory=list)
    name: str | None = None  # run name; None: Composer's run name (trainer.run_name)
    notes: str | None = None
    mode: str | None = None  # online | offline | disabled; None: WANDB_MODE, else online
    dir: str | None = None  # parent of the wandb/ run directories; None: WANDB_DIR, else the working directory
    log_artifacts: bool = False  # upload checkpoints as W&B artifacts


@dataclass
class LoggersConfig:
    wandb: WandBConfig | None = None  # null (the default): no W&B, except under `wandb agent` (W&B's defaults)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algorithms: AlgorithmsConfig = field(default_factory=AlgorithmsConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    loggers: LoggersConfig = field(default_factory=LoggersConfig)


# --------------------------------------------------------------------------- loading


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path``, apply ``key=value`` ``overrides`` in order, validate, return a :class:`Config`."""
    source = str(path)
    if not Path(path).is_file():
        raise ConfigError(source, "", "no such config file")
    try:
        file_cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(source, "", f"not valid YAML: {_first_line(e)}") from None
    merged = _merge(OmegaConf.structured(Config), file_cfg, source)

    origin: dict[str, str] = {}  # key path -> the override that set it, for error messages
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{override}'", "", "expected key=value (e.g. trainer.max_duration=2ep)")
        try:
            dot = OmegaConf.from_dotlist([override])
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{override}'", key, _first_line(e)) from None
        merged = _merge(merged, dot, f"override '{override}'")
        origin[key.strip()] = f"override '{override}'"

    for key in sorted(OmegaConf.missing_keys(merged)):
        raise ConfigError(
            origin.get(key, source), key, f"missing required value (set it in the yaml or pass {key}=...)"
        )
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _validate(cfg, lambda key: _source_of(key, origin, source))
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML; ``load_config`` on it gives back an equal ``Config``."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of the config (for loggers)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _merge(base: Any, other: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        message = _first_line(e)
        if type(e).__name__ == "ConfigKeyError":
            message = f"unknown key '{key.rsplit('.', 1)[-1]}'"
            suggestion = _suggest(key.rsplit(".", 1)[-1], _field_names(getattr(e, "object_type", None)))
            message += suggestion or f" (valid keys: {', '.join(_field_names(getattr(e, 'object_type', None)))})"
        raise ConfigError(source, key, message) from None


def _field_names(obj_type: Any) -> list[str]:
    return [f.name for f in fields(obj_type)] if obj_type is not None and is_dataclass(obj_type) else []


def _suggest(word: str, candidates: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _first_line(e: BaseException) -> str:
    text = getattr(e, "msg", None) or str(e)
    return str(text).strip().splitlines()[0] if str(text).strip() else type(e).__name__


def _source_of(key: str, origin: dict[str, str], default: str) -> str:
    # The override that set this key or one of its parents, else the file.
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in origin:
            return origin[prefix]
    return default


# --------------------------------------------------------------------------- validation


def _validate(cfg: Config, source_of: Any) -> None:
    def fail(key: str, message: str) -> None:
        raise ConfigError(source_of(key), key, message)

    def check(key: str, ok: bool, message: str) -> None:
        if not ok:
            fail(key, message)

    _check_timm_name("model.name", cfg.model.name, fail)
    check(
        "model.drop_path_rate",
        cfg.model.drop_path_rate is None or 0 <= cfg.model.drop_path_rate < 1,
        f"must be in [0, 1), got {cfg.model.drop_path_rate}",
    )

    for section in ("model", "teacher"):
        m = getattr(cfg, section)
        check(f"{section}.img_size", m.img_size is None or m.img_size >= 8, f"must be >= 8 pixels, got {m.img_size}")
        check(
            f"{section}.kwargs.img_size",
            "img_size" not in m.kwargs,
            f"set {section}.img_size instead (the recipe passes it to timm where the model takes it)",
        )

    d = cfg.data
    if d.remote or d.local:
        _validate_streaming(d, fail, check)
    else:
        check(
            "data.train_dir",
            bool(d.train_dir),
            "set data.train_dir (an ImageNet folder) or data.remote / data.local (MDS shards)",
        )
    check("data.num_classes", d.num_classes >= 2, f"must be >= 2, got {d.num_classes}")
    check("data.image_size", d.image_size >= 8, f"must be >= 8 pixels, got {d.image_size}")
    check("data.crop_pct", 0 < d.crop_pct <= 1, f"must be in (0, 1], got {d.crop_pct}")
    check(
        "data.interpolation",
        d.interpolation in ("bicubic", "bilinear", "nearest", "random"),
        f"must be bicubic, bilinear, nearest or random, got '{d.interpolation}'",
    )
    check(
        "data.scale",
        len(d.scale) == 2 and 0 < d.scale[0] <= d.scale[1] <= 1,
        f"must be [min, max] with 0 < min <= max <= 1, got {d.scale}",
    )
    check(
        "data.ratio",
        len(d.ratio) == 2 and 0 < d.ratio[0] <= d.ratio[1],
        f"must be [min, max] with 0 < min <= max, got {d.ratio}",
    )
    check("data.hflip", 0 <= d.hflip <= 1, f"must be in [0, 1], got {d.hflip}")
    for section, mean, std in (("data", d.mean, d.std), ("teacher", cfg.teacher.mean, cfg.teacher.std)):
        for key, value in ((f"{section}.mean", mean), (f"{section}.std", std)):
            check(key, value is None or len(value) == 3, f"must be 3 numbers (RGB) or null, got {value}")
        check(f"{section}.std", std is None or all(s > 0 for s in std), f"must be > 0, got {std}")
    check("data.num_workers", d.num_workers >= 0, f"must be >= 0, got {d.num_workers}")
    check("data.pipeline", d.pipeline in ("cpu", "gpu"), f"must be cpu or gpu, got '{d.pipeline}'")
    if d.auto_augment and d.pipeline == "gpu":
        check(
            "data.auto_augment",
            d.auto_augment.startswith("rand-"),
            f"data.pipeline=gpu implements timm's RandAugment (rand-...) only, got '{d.auto_augment}'",
        )
    if d.auto_augment:
        check(
            "data.auto_augment",
            d.auto_augment.split("-")[0]
            in ("rand", "augmix", "original", "v0", "originalr", "v0r", "3a", "trivialaugment"),
            f"not a timm auto-augment policy: '{d.auto_augment}' (e.g. rand-m7-mstd0.5-inc1)",
        )

    a = cfg.algorithms
    check(
        "algorithms.progressive_resizing",
        not (a.progressive_resizing and d.pipeline == "gpu"),
        "resizes the batch before the device has decoded it: use data.pipeline=cpu",
    )
    kd = a.distillation
    check("algorithms.distillation.alpha", kd.alpha >= 0, f"must be >= 0, got {kd.alpha}")
    check("algorithms.distillation.temperature", kd.temperature > 0, f"must be > 0, got {kd.temperature}")
    check("algorithms.distillation.ce_weight", kd.ce_weight >= 0, f"must be >= 0, got {kd.ce_weight}")
    check("algorithms.distillation.log_interval", kd.log_interval >= 1, f"must be >= 1, got {kd.log_interval}")
    if kd.enabled:
        if cfg.teacher.name is None:
            fail(
                "teacher.name",
                "distillation is enabled but no teacher is set "
                "(set teacher.name, or algorithms.distillation.enabled=false)",
            )
        if not (cfg.teacher.checkpoint or cfg.teacher.pretrained):
            fail(
                "teacher.checkpoint",
                "a teacher needs trained weights: set teacher.checkpoint=PATH_OR_URI "
                "or teacher.pretrained=true (needs network)",
            )
    if cfg.teacher.name is not None:
        _check_timm_name("teacher.name", cfg.teacher.name, fail)

    m = a.mixup_cutmix
    for name in ("mixup_alpha", "cutmix_alpha"):
        check(f"algorithms.mixup_cutmix.{name}", getattr(m, name) >= 0, f"must be >= 0, got {getattr(m, name)}")
    if m.enabled:
        check(
            "algorithms.mixup_cutmix.mixup_alpha",
            m.mixup_alpha > 0 or m.cutmix_alpha > 0,
            "one of mixup_alpha and cutmix_alpha must be > 0 (or set algorithms.mixup_cutmix.enabled=false)",
        )
    for name in ("switch_prob", "prob", "label_smoothing"):
        value = getattr(m, name)
        check(f"algorithms.mixup_cutmix.{name}", 0 <= value <= 1, f"must be in [0, 1], got {value}")
    check("algorithms.ema.decay", 0 < a.ema.decay < 1, f"must be in (0, 1), got {a.ema.decay}")
    check(
        "algorithms.ema.reference_batch_size",
        a.ema.reference_batch_size > 0,
        f"must be > 0, got {a.ema.reference_batch_size}",
    )

    o = cfg.optimizer
    check("optimizer.lr", o.lr > 0, f"must be > 0, got {o.lr}")
    check("optimizer.reference_batch_size", o.reference_batch_size > 0, f"must be > 0, got {o.reference_batch_size}")
    check("optimizer.weight_decay", o.weight_decay >= 0, f"must be >= 0, got {o.weight_decay}")
    check(
        "optimizer.betas",
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"must be two numbers in [0, 1), got {o.betas}",
    )
    s = cfg.scheduler
    check("scheduler.warmup_lr", s.warmup_lr >= 0, f"must be >= 0, got {s.warmup_lr}")
    check("scheduler.min_lr", s.min_lr >= 0, f"must be >= 0, got {s.min_lr}")

    t = cfg.trainer
    for key in (
        "scheduler.warmup",
        "trainer.max_duration",
        "trainer.eval_interval",
        "trainer.save_interval",
        "trainer.console_log_interval",
    ):
        section, name = key.split(".")
        _check_time(key, getattr(getattr(cfg, section), name), fail)
    check(
        "trainer.precision",
        t.precision in (None, "fp32", "amp_fp16", "amp_bf16", "amp_fp8"),
        f"must be fp32, amp_fp16, amp_bf16 or amp_fp8, got '{t.precision}'",
    )
    check("trainer.device", t.device in (None, "cpu", "gpu", "mps"), f"must be cpu, gpu or mps, got '{t.device}'")
    check("trainer.compile", t.compile in ("auto", True, False), f"must be auto, true or false, got '{t.compile}'")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check("trainer.global_batch_size", t.global_batch_size > 0, f"must be > 0, got {t.global_batch_size}")
    check(
        "trainer.global_batch_size",
        t.global_batch_size % world_size == 0,
        f"{t.global_batch_size} does not divide by the world size {world_size}",
    )
    per_device = t.global_batch_size // world_size
    micro = t.microbatch_size or per_device
    check(
        "trainer.microbatch_size",
        0 < micro <= per_device,
        f"must be in [1, {per_device}] (the per-process batch), got {t.microbatch_size}",
    )
    if m.enabled:
        check(
            "trainer.microbatch_size" if t.microbatch_size else "trainer.global_batch_size",
            micro % 2 == 0,
            f"MixUp/CutMix mixes each microbatch with its reverse and needs an even size per process, got {micro}",
        )
    check(
        "trainer.eval_batch_size",
        t.eval_batch_size is None or t.eval_batch_size > 0,
        f"must be > 0, got {t.eval_batch_size}",
    )
    if t.fsdp is not None:
        unknown = sorted(set(t.fsdp) - set(_fsdp_keys()))
        if unknown:
            fail(f"trainer.fsdp.{unknown[0]}", f"not a Composer FSDP option{_suggest(unknown[0], _fsdp_keys())}")
        check("trainer.fsdp", t.device != "cpu", "FSDP runs on GPUs only (Composer); use DDP on CPUs")
    if t.autoresume:
        check("trainer.run_name", bool(t.run_name), "autoresume needs a fixed run_name")
        check("trainer.save_folder", bool(t.save_folder), "autoresume needs a save_folder")
    check(
        "trainer.save_num_checkpoints_to_keep",
        t.save_num_checkpoints_to_keep is None or t.save_num_checkpoints_to_keep >= -1,
        f"must be -1 (all), >= 0 or null, got {t.save_num_checkpoints_to_keep}",
    )
    check(
        "trainer.autoresume_accept",
        all(key.strip() for key in t.autoresume_accept),
        f"must be key paths (e.g. [optimizer.lr]), got {list(t.autoresume_accept)}",
    )
    if (t.fsdp or {}).get("state_dict_type") == "sharded" and (t.autoresume or t.load_path):
        # torch.distributed.checkpoint unpickles sharded checkpoints in full (their .metadata too)
        check(
            "trainer.fsdp.state_dict_type",
            t.trust_checkpoints,
            "sharded checkpoints can only be loaded by unpickling them in full (torch.distributed.checkpoint): "
            "set trainer.trust_checkpoints=true if the checkpoint folder is as trusted as the code",
        )

    w = cfg.loggers.wandb
    if w is not None:
        check(
            "loggers.wandb.mode",
            w.mode in (None, "online", "offline", "disabled"),
            f"must be online, offline or disabled, got '{w.mode}'",
        )
        for key, value in (("project", w.project), ("entity", w.entity), ("group", w.group), ("name", w.name)):
            check(f"loggers.wandb.{key}", value is None or value.strip() != "", "must be a non-empty string or null")
        check(
            "loggers.wandb.tags",
            all(0 < len(tag) <= 64 for tag in w.tags),
            f"each tag must have 1 to 64 characters (W&B's limit), got {list(w.tags)}",
        )


def _fsdp_keys() -> list[str]:
    from composer.utils.parallelism import FSDPConfig

    return [f.name for f in fields(FSDPConfig) if not f.name.startswith("_")]


def _validate_streaming(d: DataConfig, fail: Any, check: Any) -> None:
    from streaming.base.hashing import get_hashes
    from streaming.base.shuffle import algos
    from streaming.base.storage.download import DOWNLOADER_MAPPINGS
    from streaming.base.util import bytes_to_int

    if d.remote:
        scheme = d.remote.split("://", 1)[0] if "://" in d.remote else ""
        check(
            "data.remote",
            scheme in DOWNLOADER_MAPPINGS or scheme == "dbfs",
            f"not a remote streaming can read: '{d.remote}' (e.g. s3://bucket/imagenet; "
            "for a local copy set data.local instead)",
        )
    s = d.streaming
    check("data.streaming.train_split", bool(s.train_split), "must name the training split (e.g. train)")
    check(
        "data.streaming.shuffle_algo",
        s.shuffle_algo in algos,
        f"unknown shuffle algorithm '{s.shuffle_algo}'{_suggest(s.shuffle_algo, sorted(algos))} "
        f"(one of {', '.join(sorted(algos))})",
    )
    for name in ("shuffle_seed", "predownload"):
        value = getattr(s, name)
        check(f"data.streaming.{name}", value is None or value >= 0, f"must be >= 0 or null, got {value}")
    for name in ("shuffle_block_size", "num_canonical_nodes"):
        value = getattr(s, name)
        check(f"data.streaming.{name}", value is None or value >= 1, f"must be >= 1 or null, got {value}")
    check("data.streaming.download_timeout", s.download_timeout > 0, f"must be > 0 seconds, got {s.download_timeout}")
    check("data.streaming.download_retry", s.download_retry >= 0, f"must be >= 0, got {s.download_retry}")
    if s.cache_limit is not None:
        try:
            ok = bytes_to_int(s.cache_limit) > 0
        except (ValueError, TypeError):
            ok = False
        check("data.streaming.cache_limit", ok, f"not a size: '{s.cache_limit}' (e.g. 100gb, or null for no limit)")
    if s.validate_hash is not None:
        hashes = sorted(get_hashes())
        check(
            "data.streaming.validate_hash",
            s.validate_hash in hashes,
            f"unknown hash '{s.validate_hash}' (one of {', '.join(hashes)}; the converter stores sha1)",
        )


def _check_time(key: str, value: str, fail: Any) -> None:
    try:
        Time.from_timestring(value)
    except (ValueError, TypeError):
        fail(key, f"not a Composer time string: '{value}' (e.g. 300ep, 1000ba, 1.0dur)")


def _check_timm_name(key: str, name: str, fail: Any) -> None:
    import timm

    base = name.split(".", 1)[0]  # allow pretrained tags: tresnet_v2_l.miil_in21k_ft_in1k
    if not timm.is_model(base):
        fail(key, f"unknown timm model '{name}'{_suggest(base, timm.list_models())}")
