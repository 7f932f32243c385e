"""The recipe's typed configuration: YAML + ``key=value`` overrides -> validated dataclasses.

The schema declares what each key may hold, next to the key:

- its type, which omegaconf's structured merge enforces (an unknown key or a wrong type stops at
  the merge); a ``Literal`` lists the choices;
- a range (``bounded``, the algorithms' own ``Range`` objects where the key is an algorithm's
  hyper-parameter, so the constructor and the config say the same thing) or a check of the value
  alone (``checked``).

What spans keys is a short list of named rules (:data:`RULES`). Every problem becomes a
:class:`ConfigError` whose one-line message names the source (the yaml file or the override), the
key path and, where one exists, a suggestion. Nothing heavy (models, data, processes) is built
here; the outside knowledge consulted is timm's model registry (misspelled model names stop
before anything is downloaded), Composer's time strings and FSDP options, and streaming's
shuffle algorithms and hashes.
"""

from __future__ import annotations

import difflib
import os
import typing
from collections.abc import Callable, Iterator
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from composer.core import Time
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from PIL import Image

from usi_composer.algorithms import FusedEMA, KnowledgeDistillation, MixUpCutMix, Range
from usi_composer.errors import UsiError, first_line

__all__ = [
    "RULES",
    "Config",
    "ConfigError",
    "config_to_dict",
    "dump_config",
    "find_yaml",
    "load_config",
    "packaged_yamls",
]


class ConfigError(UsiError, ValueError):
    """A bad configuration, with a one-line message: ``<source>: <key.path>: <what is wrong>``."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source, self.key, self.message = source, key, message
        location = ": ".join(part for part in (source, key) if part)  # no source: found after loading
        super().__init__(f"{location}: {message}")


# --------------------------------------------------------------------------- per-key constraints

Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it, or None


def bounded(default: Any, allowed: Range, unit: str = "") -> Any:
    """A number field whose values (null aside) must lie in ``allowed``; ``unit`` follows the bound
    in the message (``must be >= 8 pixels, got 4``)."""
    return field(default=default, metadata={"range": allowed, "unit": unit})


def checked(check: Check, default: Any = NO_DEFAULT, factory: Any = NO_DEFAULT) -> Any:
    """A field whose value (null aside) ``check`` accepts (it returns None) or describes as wrong."""
    return field(default=default, default_factory=factory, metadata={"check": check})


def _timm_model(name: str) -> str | None:
    import timm

    base = name.split(".", 1)[0]  # allow pretrained tags: tresnet_v2_l.miil_in21k_ft_in1k
    return None if timm.is_model(base) else f"unknown timm model '{name}'{_suggest(base, timm.list_models())}"


def _time_string(value: str) -> str | None:
    try:
        Time.from_timestring(value)
    except (ValueError, TypeError):
        return f"not a Composer time string: '{value}' (e.g. 300ep, 1000ba, 1.0dur)"
    return None


def _interval(high: float | None, text: str) -> Check:
    """``[min, max]`` with ``0 < min <= max`` (``<= high`` where given); ``text`` states it."""

    def check(value: list[float]) -> str | None:
        ok = len(value) == 2 and 0 < value[0] <= value[1] and (high is None or value[1] <= high)
        return None if ok else f"must be [min, max] with {text}, got {list(value)}"

    return check


def _rgb(positive: bool) -> Check:
    def check(value: list[float]) -> str | None:
        if len(value) != 3:
            return f"must be 3 numbers (RGB) or null, got {list(value)}"
        return f"must be > 0, got {list(value)}" if positive and not all(v > 0 for v in value) else None

    return check


def _betas(value: list[float]) -> str | None:
    ok = len(value) == 2 and all(0 <= b < 1 for b in value)
    return None if ok else f"must be two numbers in [0, 1), got {list(value)}"


def _auto_augment(policy: str) -> str | None:
    policies = ("rand", "augmix", "original", "v0", "originalr", "v0r", "3a", "trivialaugment")  # timm's
    ok = policy.split("-")[0] in policies
    return None if ok else f"not a timm auto-augment policy: '{policy}' (e.g. rand-m7-mstd0.5-inc1)"


def _remote(uri: str) -> str | None:
    from streaming.base.storage.download import DOWNLOADER_MAPPINGS

    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme in DOWNLOADER_MAPPINGS or scheme == "dbfs":
        return None
    return (
        f"not a remote streaming can read: '{uri}' (e.g. s3://bucket/imagenet; for a local copy set data.local instead)"
    )


def _shuffle_algo(name: str) -> str | None:
    from streaming.base.shuffle import algos

    if name in algos:
        return None
    known = sorted(algos)
    return f"unknown shuffle algorithm '{name}'{_suggest(name, known)} (one of {', '.join(known)})"


def _size(text: str) -> str | None:
    from streaming.base.util import bytes_to_int

    try:
        ok = bytes_to_int(text) > 0
    except (ValueError, TypeError):
        ok = False
    return None if ok else f"not a size: '{text}' (e.g. 100gb, or null for no limit)"


def _hash(name: str) -> str | None:
    from streaming.base.hashing import get_hashes

    hashes = sorted(get_hashes())
    if name == "auto" or name in hashes:
        return None
    return f"unknown hash '{name}' (auto, null or one of {', '.join(hashes)}; the converter stores sha1)"


def _named(value: str) -> str | None:
    return None if value.strip() else "must be a non-empty string or null"


def _tags(tags: list[str]) -> str | None:
    ok = all(0 < len(tag) <= 64 for tag in tags)
    return None if ok else f"each tag must have 1 to 64 characters (W&B's limit), got {list(tags)}"


def _key_paths(keys: list[str]) -> str | None:
    ok = all(key.strip() for key in keys)
    return None if ok else f"must be key paths (e.g. [optimizer.lr]), got {list(keys)}"


PIXELS = Range.at_least(8)
POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = Range.above(0), Range.at_least(0), Range.at_least(1)
PROBABILITY = Range.closed(0, 1)
KD, MIX, EMA_SMOOTHING = KnowledgeDistillation.ranges, MixUpCutMix.ranges, FusedEMA.ranges["smoothing"]


# --------------------------------------------------------------------------- schema
# Defaults are USI's values (Ridnik et al., 2022, and the official Solving_ImageNet code);
# yamls/usi.yaml repeats them with their sources.


@dataclass
class ModelConfig:
    name: str = checked(_timm_model, MISSING)  # any timm model name, e.g. resnet50, deit_small_patch16_224
    checkpoint: str | None = None  # initial weights: local path or object-store URI
    trust_checkpoint: bool = False  # unpickle checkpoint in full (it may run code); false: read it as data
    pretrained: bool = False  # timm's pretrained weights (needs network)
    drop_path_rate: float | None = bounded(None, Range(0, 1, high_included=False))  # None: the backbone's own
    # The size timm builds the model for (img_size=, where its constructor takes it: ViT, Swin,
    # LeViT, MLP-Mixer, ...); None: data.image_size. Its inputs are data.image_size regardless.
    img_size: int | None = bounded(None, PIXELS, "pixels")
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra timm.create_model arguments


@dataclass
class TeacherConfig:
    # timm model name (a pretrained tag like '.miil_in21k_ft_in1k' is allowed)
    name: str | None = checked(_timm_model, None)
    checkpoint: str | None = None  # weights: local path or object-store URI (s3://, gs://, ...)
    trust_checkpoint: bool = False  # unpickle checkpoint in full (it may run code); false: read it as data
    pretrained: bool = False  # timm's pretrained weights instead (needs network)
    # The size the teacher is built for (as model.img_size) and sees: the student's batch is
    # resized to it where they differ. None: data.image_size.
    img_size: int | None = bounded(None, PIXELS, "pixels")
    kwargs: dict[str, Any] = field(default_factory=dict)
    # the inputs the teacher was trained on; None: its timm pretrained_cfg
    mean: list[float] | None = checked(_rgb(positive=False), None)
    std: list[float] | None = checked(_rgb(positive=True), None)
    fold_bn: bool = True  # fold BatchNorm into the preceding conv where that is exact
    channels_last: bool = True


@dataclass
class StreamingConfig:
    """mosaicml-streaming knobs for MDS data (``data.remote`` / ``data.local``); null = streaming's default."""

    # <remote or local>/<split>/index.json, as written by usi-convert-imagenet
    train_split: str = checked(lambda s: None if s else "must name the training split (e.g. train)", "train")
    val_split: str | None = "val"  # None: no evaluation
    shuffle_algo: str = checked(_shuffle_algo, "py1e")
    shuffle_seed: int | None = bounded(None, NON_NEGATIVE)  # None: trainer.seed
    shuffle_block_size: int | None = bounded(None, AT_LEAST_ONE)
    # None: the first run's node count (checkpoints keep it); see usi.yaml
    num_canonical_nodes: int | None = bounded(None, AT_LEAST_ONE)
    predownload: int | None = bounded(None, NON_NEGATIVE)  # samples to download ahead per worker
    cache_limit: str | None = checked(_size, None)  # e.g. 100gb: evict shards beyond this; None: keep all
    download_timeout: float = bounded(60.0, POSITIVE, "seconds")  # per shard
    download_retry: int = bounded(2, NON_NEGATIVE)
    # auto: sha1 for data.remote (the converter stores sha1 per shard), none for a local root; null: never
    validate_hash: str | None = checked(_hash, "auto")
    fast_decode: bool = True  # reduced-size JPEG decode + one-call crop/resize (same views); folders too


@dataclass
class DataConfig:
    train_dir: str | None = None  # ImageNet layout: <train_dir>/<class>/<image> (unused when streaming)
    val_dir: str | None = None  # same layout; None: no evaluation
    # MDS root (s3://bucket/imagenet, ...) from usi-convert-imagenet; set = streaming
    remote: str | None = checked(_remote, None)
    local: str | None = None  # local cache of remote; without remote: a local MDS root
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    num_classes: int = bounded(1000, Range.at_least(2))
    image_size: int = bounded(224, PIXELS, "pixels")
    crop_pct: float = bounded(0.95, Range(0, 1, low_included=False))  # eval: resize to image_size/crop_pct, crop
    interpolation: Literal["bicubic", "bilinear", "nearest", "random"] = "bicubic"
    # RandomResizedCrop's area range and aspect ratios
    scale: list[float] = checked(_interval(1, "0 < min <= max <= 1"), factory=lambda: [0.08, 1.0])
    ratio: list[float] = checked(_interval(None, "0 < min <= max"), factory=lambda: [3 / 4, 4 / 3])
    hflip: float = bounded(0.5, PROBABILITY)
    auto_augment: str | None = checked(_auto_augment, "rand-m7-mstd0.5-inc1")
    mean: list[float] | None = checked(_rgb(positive=False), None)  # None: the student backbone's own
    std: list[float] | None = checked(_rgb(positive=True), None)
    # Larger images (width x height from the header) stop with one line naming them, undecoded.
    # Default: PIL's decompression-bomb threshold; null: no limit.
    max_image_pixels: int | None = bounded(Image.MAX_IMAGE_PIXELS, POSITIVE)
    num_workers: int = bounded(8, NON_NEGATIVE)
    pin_memory: bool = True
    persistent_workers: bool = True
    # cpu: workers decode and augment (timm's PIL transforms); gpu: workers read bytes and draw the
    # random choices, decode/crop/RandAugment/normalize run batched on the device (data/gpu_pipeline.py)
    pipeline: Literal["cpu", "gpu"] = "cpu"
    gpu_decode: bool = True  # gpu pipeline: decode JPEGs on the device (nvJPEG); false: in the workers, reduced size


@dataclass
class DistillationConfig:
    enabled: bool = True
    alpha: float = bounded(5.0, KD["alpha"])
    temperature: float = bounded(1.0, KD["temperature"])
    ce_weight: float = bounded(1.0, KD["ce_weight"])
    # batches between reads of the ce/kd means and the non-finite check (one sync each)
    log_interval: int = bounded(100, KD["log_interval"])
    # The teacher's outputs, cached (usi_composer/teacher_cache.py): a local folder or object-store URI.
    cache: str | None = checked(_named, None)  # read the logits from here; the teacher is not built
    cache_write: str | None = checked(_named, None)  # store them here as the run trains (usi-cache-teacher too)
    cache_format: Literal["full", "topk"] = "full"  # what cache_write stores: every logit (exact) or the top k
    cache_topk: int | None = bounded(None, AT_LEAST_ONE)  # k, for cache_format=topk


@dataclass
class MixUpCutMixConfig:
    enabled: bool = True
    mixup_alpha: float = bounded(0.8, MIX["mixup_alpha"])
    cutmix_alpha: float = bounded(1.0, MIX["cutmix_alpha"])
    switch_prob: float = bounded(0.5, MIX["switch_prob"])
    prob: float = bounded(1.0, MIX["prob"])
    label_smoothing: float = bounded(0.0, MIX["label_smoothing"])


@dataclass
class EMAConfig:
    enabled: bool = True
    # per optimizer step at reference_batch_size; rescaled to keep the half-life in samples
    decay: float = bounded(0.99996, EMA_SMOOTHING)
    reference_batch_size: int = bounded(1024, POSITIVE)
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
    lr: float = bounded(2e-3, POSITIVE)  # at reference_batch_size; scaled linearly with the global batch
    reference_batch_size: int = bounded(1024, POSITIVE)
    weight_decay: float = bounded(2e-2, NON_NEGATIVE)  # not on biases and norm parameters
    betas: list[float] = checked(_betas, factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class SchedulerConfig:
    warmup: str = checked(_time_string, "5ep")
    warmup_lr: float = bounded(1e-4, NON_NEGATIVE)  # warm-up starts here ...
    min_lr: float = bounded(1e-6, NON_NEGATIVE)  # ... and the cosine ends here (absolute learning rates)


@dataclass
class TrainerConfig:
    global_batch_size: int = bounded(1024, POSITIVE)  # summed over all processes
    eval_batch_size: int | None = bounded(None, POSITIVE)  # per process; None: the training batch per process
    microbatch_size: int | None = None  # per process; None: the whole per-process batch
    max_duration: str = checked(_time_string, "300ep")
    eval_interval: str = checked(_time_string, "1ep")
    precision: Literal["fp32", "amp_fp16", "amp_bf16", "amp_fp8"] | None = "amp_bf16"  # None: fp32 CPU, bf16 GPU
    device: Literal["cpu", "gpu", "mps"] | None = None  # None: gpu if available
    compile: Literal["auto", True, False] = "auto"  # torch.compile student and teacher; auto: on GPUs only
    seed: int = 0
    run_name: str | None = None
    save_folder: str | None = None  # local path or object-store URI; None: no checkpoints
    save_interval: str = checked(_time_string, "1ep")
    # local copies (-1: all); None: all for a local save_folder, 1 for a remote one
    save_num_checkpoints_to_keep: int | None = bounded(None, Range.at_least(-1))
    save_overwrite: bool = False
    autoresume: bool = False  # needs run_name and save_folder
    # keys whose change to the training math may resume (autoresume refuses any other)
    autoresume_accept: list[str] = checked(_key_paths, factory=list)
    load_path: str | None = None
    trust_checkpoints: bool = False  # resume (load_path, autoresume) unpickling in full; false: read as data
    progress_bar: bool = True
    log_to_console: bool = False
    console_log_interval: str = checked(_time_string, "1ep")
    train_subset_num_batches: int = -1
    eval_subset_num_batches: int = -1
    fsdp: dict[str, Any] | None = None  # Composer FSDP (v1) options, e.g. {sharding_strategy: FULL_SHARD}; GPUs only


@dataclass
class WandBConfig:
    """Composer's ``WandBLogger``; the mode (online/offline) follows ``WANDB_MODE`` unless set here."""

    project: str | None = checked(_named, None)  # None: W&B's default (WANDB_PROJECT, else 'uncategorized')
    entity: str | None = checked(_named, None)  # None: your default entity
    group: str | None = checked(_named, None)  # e.g. one ablation's name, to compare its runs side by side
    tags: list[str] = checked(_tags, factory=list)
    name: str | None = checked(_named, None)  # run name; None: Composer's run name (trainer.run_name)
    notes: str | None = None
    mode: Literal["online", "offline", "disabled"] | None = None  # None: WANDB_MODE, else online
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


# --------------------------------------------------------------------------- rules that span keys
# Each returns (key, message) for the first problem it finds, or None.

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
    t = cfg.teacher
    if t.name is None:
        return "teacher.name", (
            "distillation is enabled but no teacher is set (set teacher.name, or algorithms.distillation.enabled=false)"
        )
    if not (t.checkpoint or t.pretrained) and not cfg.algorithms.distillation.cache:  # a cache needs no weights
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


def batch_splits_over_processes(cfg: Config) -> Problem:
    """The global batch over the processes (``WORLD_SIZE``, set by Composer's launcher), each process's
    batch into microbatches, and MixUp/CutMix's even microbatches."""
    t = cfg.trainer
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if t.global_batch_size % world_size:
        return "trainer.global_batch_size", f"{t.global_batch_size} does not divide by the world size {world_size}"
    per_process = t.global_batch_size // world_size
    micro = t.microbatch_size or per_process
    if not 0 < micro <= per_process:
        return "trainer.microbatch_size", (
            f"must be in [1, {per_process}] (the per-process batch), got {t.microbatch_size}"
        )
    if cfg.algorithms.mixup_cutmix.enabled and micro % 2:
        key = "trainer.microbatch_size" if t.microbatch_size else "trainer.global_batch_size"
        return (
            key,
            f"MixUp/CutMix mixes each microbatch with its reverse and needs an even size per process, got {micro}",
        )
    return None


def fsdp_on_gpus(cfg: Config) -> Problem:
    t = cfg.trainer
    if t.fsdp is None:
        return None
    from composer.utils.parallelism import FSDPConfig

    known = [f.name for f in fields(FSDPConfig) if not f.name.startswith("_")]
    unknown = sorted(set(t.fsdp) - set(known))
    if unknown:
        return f"trainer.fsdp.{unknown[0]}", f"not a Composer FSDP option{_suggest(unknown[0], known)}"
    if t.device == "cpu":
        return "trainer.fsdp", "FSDP runs on GPUs only (Composer); use DDP on CPUs"
    return None


def autoresume_has_a_run(cfg: Config) -> Problem:
    t = cfg.trainer
    if t.autoresume and not t.run_name:
        return "trainer.run_name", "autoresume needs a fixed run_name"
    if t.autoresume and not t.save_folder:
        return "trainer.save_folder", "autoresume needs a save_folder"
    return None


def sharded_checkpoints_are_trusted(cfg: Config) -> Problem:
    t = cfg.trainer
    sharded = (t.fsdp or {}).get("state_dict_type") == "sharded"
    if not sharded or not (t.autoresume or t.load_path) or t.trust_checkpoints:
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
    batch_splits_over_processes,
    fsdp_on_gpus,
    autoresume_has_a_run,
    sharded_checkpoints_are_trusted,
)


def validate(cfg: Config) -> Problem:
    """The first problem of ``cfg``: each key against its declared constraint, then :data:`RULES`."""
    return next(_field_problems(cfg), None) or next((p for rule in RULES if (p := rule(cfg))), None)


def _field_problems(node: Any, prefix: str = "") -> Iterator[tuple[str, str]]:
    for f in fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if is_dataclass(value):
            yield from _field_problems(value, f"{key}.")
        elif value is None:
            continue
        elif "range" in f.metadata and value not in f.metadata["range"]:
            unit = f" {f.metadata['unit']}" if f.metadata["unit"] else ""
            yield key, f"must be {f.metadata['range']}{unit}, got {value}"
        elif "check" in f.metadata and (message := f.metadata["check"](value)) is not None:
            yield key, message


# --------------------------------------------------------------------------- loading


PACKAGED_YAMLS = "usi_composer.yamls"  # the repo's yamls/, shipped in the wheel as package data


def packaged_yamls() -> Path:
    """The folder of the recipe's own yamls (``usi.yaml``, ``demo.yaml``, ``sweeps/``, ...), installed
    with the package (the repo's ``yamls/`` in a checkout or an editable install)."""
    return Path(str(resources.files(PACKAGED_YAMLS)))


def find_yaml(path: str | os.PathLike) -> Path:
    """``path`` where it is a file (a user's own yaml always wins); else the recipe's yaml of that
    name shipped with the package, so ``yamls/usi.yaml`` (the name the docs and sweep files use),
    ``usi.yaml`` and ``sweeps/temperature.yaml`` work from any directory, without a checkout."""
    given = Path(path)
    if given.is_file() or given.is_absolute():
        return given
    parts = given.parts[1:] if given.parts[:1] == ("yamls",) else given.parts
    packaged = packaged_yamls().joinpath(*parts)
    return packaged if parts and packaged.is_file() else given


def load_config(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read ``path`` (:func:`find_yaml`), apply ``key=value`` ``overrides`` in order, validate, return a
    :class:`Config`."""
    source = str(path)
    path = find_yaml(path)
    if not path.is_file():
        raise ConfigError(source, "", "no such config file")
    try:
        file_cfg = OmegaConf.load(path)
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(source, "", f"not valid YAML: {first_line(e)}") from None
    merged = _merge(OmegaConf.structured(Config), file_cfg, source)

    origin: dict[str, str] = {}  # key path -> the override that set it, for error messages
    for override in overrides:
        key, sep, _ = override.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{override}'", "", "expected key=value (e.g. trainer.max_duration=2ep)")
        try:
            dot = OmegaConf.from_dotlist([override])
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{override}'", key, first_line(e)) from None
        merged = _merge(merged, dot, f"override '{override}'")
        origin[key.strip()] = f"override '{override}'"

    for key in sorted(OmegaConf.missing_keys(merged)):
        raise ConfigError(
            origin.get(key, source), key, f"missing required value (set it in the yaml or pass {key}=...)"
        )
    cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    problem = validate(cfg)
    if problem is not None:
        key, message = problem
        raise ConfigError(_source_of(key, origin, source), key, message)
    return cfg


def dump_config(cfg: Config, redacted: bool = False) -> str:
    """The resolved config as YAML; ``load_config`` on it gives back an equal ``Config`` (``redacted``:
    with secrets replaced, for printing: ``usi_composer.redaction.redact``)."""
    if redacted:
        from usi_composer.redaction import redact

        return OmegaConf.to_yaml(OmegaConf.create(redact(config_to_dict(cfg))))
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of the config (for loggers)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _merge(base: Any, other: Any, source: str) -> Any:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        owner, name = getattr(e, "object_type", None), key.rsplit(".", 1)[-1]
        message = first_line(e)
        choices = _choices(owner, name)
        if type(e).__name__ == "ConfigKeyError":
            message = f"unknown key '{name}'"
            message += _suggest(name, _field_names(owner)) or f" (valid keys: {', '.join(_field_names(owner))})"
        elif choices is not None:  # omegaconf's "Invalid value 'x', expected one of [...]", in our words
            message = f"must be {_one_of(choices)}, got '{getattr(e, 'value', '')}'"
        raise ConfigError(source, key, message) from None


def _choices(owner: Any, name: str) -> tuple[Any, ...] | None:
    """The values a ``Literal`` field accepts (null aside), else None."""
    if owner is None or not is_dataclass(owner):
        return None
    hint = typing.get_type_hints(owner).get(name)
    literal = next((a for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) is Literal), None)
    return typing.get_args(literal) if literal is not None else None


def _one_of(choices: tuple[Any, ...]) -> str:
    words = [str(c).lower() if isinstance(c, bool) else str(c) for c in choices]  # YAML spells bools lowercase
    return f"{', '.join(words[:-1])} or {words[-1]}" if len(words) > 1 else words[0]


def _field_names(obj_type: Any) -> list[str]:
    return [f.name for f in fields(obj_type)] if obj_type is not None and is_dataclass(obj_type) else []


def _suggest(word: str, candidates: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def _source_of(key: str, origin: dict[str, str], default: str) -> str:
    # The override that set this key or one of its parents, else the file.
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in origin:
            return origin[prefix]
    return default
