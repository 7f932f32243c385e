"""The recipe's configuration schema: every key, its type, its range or check, and its role.

omegaconf's structured merge enforces the types (an unknown key or a wrong type stops at the merge;
a ``Literal`` lists the choices). Each leaf field is declared with :func:`~.fields.math`,
:func:`~.fields.free` or :func:`~.fields.teacher_input` (its role), with a range (the algorithms' own
``Range`` objects where the key is an algorithm's hyper-parameter, so the constructor and the config
say the same thing) or a check of the value alone. What spans keys is in ``rules.py``. The outside
knowledge consulted here: timm's model registry (a misspelled model stops before anything is
downloaded), Composer's time strings, and streaming's shuffle algorithms, sizes and hashes.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from composer.core import Time
from omegaconf import MISSING
from PIL import Image

from usi_composer.algorithms import FusedEMA, KnowledgeDistillation, MixUpCutMix, Range
from usi_composer.config.fields import Check, free, math, teacher_input

__all__ = [
    "AlgorithmsConfig",
    "Config",
    "DataConfig",
    "DistillationConfig",
    "EMAConfig",
    "LoggersConfig",
    "MixUpCutMixConfig",
    "ModelConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "StreamingConfig",
    "TeacherConfig",
    "TrainerConfig",
    "WandBConfig",
    "suggest",
]


def suggest(word: str, candidates: list[str] | tuple[str, ...]) -> str:
    """`` (did you mean 'x'?)`` for the candidates close to ``word``, else ``''``."""
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


# --------------------------------------------------------------------------- checks of one value


def _timm_model(name: str) -> str | None:
    import timm

    base = name.split(".", 1)[0]  # allow pretrained tags: tresnet_v2_l.miil_in21k_ft_in1k
    return None if timm.is_model(base) else f"unknown timm model '{name}'{suggest(base, timm.list_models())}"


def _time_string(*units: str) -> Check:
    """A Composer time string with one of ``units`` (``300ep``, ``2000ba``): a bare number is refused,
    since Composer would read it as wall-clock seconds."""
    examples = {"ep": "300ep", "ba": "2000ba", "sp": "1281167sp", "dur": "0.05dur"}

    def check(value: str) -> str | None:
        try:
            unit = Time.from_timestring(value).unit.value
        except (ValueError, TypeError):
            unit = None
        if unit in units and re.fullmatch(rf"[0-9.eE+-]+{unit}", value.strip()):
            return None
        said = ", ".join(examples[u] for u in units)
        return f"must be a number with a unit ({said}), got '{value}'"

    return check


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
    return f"unknown shuffle algorithm '{name}'{suggest(name, known)} (one of {', '.join(known)})"


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


def _microbatch(value: int | str) -> str | None:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return None
    return f"must be a number of samples > 0, auto or null, got {value!r}"


def _split_name(name: str) -> str | None:
    return None if name else "must name the training split (e.g. train)"


PIXELS = Range.at_least(8)
POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = Range.above(0), Range.at_least(0), Range.at_least(1)
PROBABILITY = Range.closed(0, 1)
KD, MIX, EMA_SMOOTHING = KnowledgeDistillation.ranges, MixUpCutMix.ranges, FusedEMA.ranges["smoothing"]


# Where a field applies (``when``): a field that does not apply to a run is neither fingerprinted nor
# compared on resume.
def _streams(cfg: Any) -> bool:
    return bool(cfg.data.remote or cfg.data.local)


def _local_is_the_data(cfg: Any) -> bool:
    return not cfg.data.remote  # with data.remote, data.local is only the shards' cache


def _cpu_pipeline(cfg: Any) -> bool:
    return cfg.data.pipeline == "cpu"


def _gpu_pipeline(cfg: Any) -> bool:
    return cfg.data.pipeline == "gpu"


def _mixes(cfg: Any) -> bool:
    return bool(cfg.algorithms.mixup_cutmix.enabled)


# --------------------------------------------------------------------------- schema
# Defaults are USI's values (Ridnik et al., 2022, and the official Solving_ImageNet code);
# yamls/usi.yaml repeats them with their sources. Each field's role: usi_composer/config/fields.py.


@dataclass
class ModelConfig:
    name: str = math(MISSING, check=_timm_model)  # any timm model name, e.g. resnet50, deit_small_patch16_224
    checkpoint: str | None = math(None)  # initial weights: local path or object-store URI
    trust_checkpoint: bool = free(False)  # unpickle checkpoint in full (it may run code); false: read it as data
    pretrained: bool = math(False)  # timm's pretrained weights (needs network)
    drop_path_rate: float | None = math(None, Range(0, 1, high_included=False))  # None: the backbone's own
    # The size timm builds the model for (img_size=, where its constructor takes it: ViT, Swin,
    # LeViT, MLP-Mixer, ...); None: data.image_size. Its inputs are data.image_size regardless.
    img_size: int | None = math(None, PIXELS, "pixels")
    kwargs: dict[str, Any] = math(factory=dict)  # extra timm.create_model arguments


@dataclass
class TeacherConfig:
    # timm model name (a pretrained tag like '.miil_in21k_ft_in1k' is allowed)
    name: str | None = teacher_input(None, check=_timm_model)
    # The weights' identity (their sha256, or timm's source) is the run plan's: teacher_weights.
    checkpoint: str | None = math(None)  # weights: local path or object-store URI (s3://, gs://, ...)
    trust_checkpoint: bool = free(False)  # unpickle checkpoint in full (it may run code); false: read it as data
    pretrained: bool = math(False)  # timm's pretrained weights instead (needs network)
    # The size the teacher is built for (as model.img_size) and sees: the student's batch is
    # resized to it where they differ. None: data.image_size (resolved: the plan's teacher_img_size).
    img_size: int | None = math(None, PIXELS, "pixels")
    kwargs: dict[str, Any] = teacher_input(factory=dict)
    # the inputs the teacher was trained on; None: its timm pretrained_cfg (resolved: the plan's)
    mean: list[float] | None = math(None, check=_rgb(positive=False))
    std: list[float] | None = math(None, check=_rgb(positive=True))
    # A teacher of more classes than the data's (an ImageNet-1k teacher for a subset of ImageNet): which of its
    # outputs are the data's classes. imagenet: the data's class names are ImageNet-1k wnids; or a file with one
    # line per data class (in the data's class order) holding the teacher's output index. Resolved: the plan's.
    class_map: str | None = math(None, check=_named)
    fold_bn: bool = teacher_input(True)  # fold BatchNorm into the preceding conv where that is exact
    evaluate_first: bool = free(False)  # score the teacher on the validation split once, before step 1 (a sanity check)
    channels_last: bool = teacher_input(True)


@dataclass
class StreamingConfig:
    """mosaicml-streaming knobs for MDS data (``data.remote`` / ``data.local``); null = streaming's default."""

    # <remote or local>/<split>/index.json, as written by usi-convert-imagenet
    train_split: str = teacher_input("train", check=_split_name, when=_streams)
    val_split: str | None = free("val")  # None: no evaluation
    shuffle_algo: str = teacher_input("py1e", check=_shuffle_algo, when=_streams)
    shuffle_seed: int | None = math(None, NON_NEGATIVE)  # None: trainer.seed (resolved: the plan's)
    shuffle_block_size: int | None = teacher_input(None, AT_LEAST_ONE, when=_streams)
    # None: the first run's node count (checkpoints keep it); see usi.yaml
    num_canonical_nodes: int | None = teacher_input(None, AT_LEAST_ONE, when=_streams)
    predownload: int | None = free(None, NON_NEGATIVE)  # samples to download ahead per worker
    cache_limit: str | None = free(None, check=_size)  # e.g. 100gb: evict shards beyond this; None: keep all
    download_timeout: float = free(60.0, POSITIVE, "seconds")  # per shard
    download_retry: int = free(2, NON_NEGATIVE)
    # auto: sha1 for data.remote (the converter stores sha1 per shard), none for a local root; null: never
    validate_hash: str | None = free("auto", check=_hash)
    # reduced-size JPEG decode + one-call crop/resize (same views) for training crops, folders too;
    # evaluation always decodes at full size (timm's eval pixels)
    fast_decode: bool = teacher_input(True, when=_cpu_pipeline)


@dataclass
class DataConfig:
    train_dir: str | None = math(None)  # ImageNet layout: <train_dir>/<class>/<image> (unused when streaming)
    val_dir: str | None = free(None)  # same layout; None: no evaluation
    # MDS root (s3://bucket/imagenet, ...) from usi-convert-imagenet; set = streaming
    remote: str | None = math(None, check=_remote)
    local: str | None = math(None, when=_local_is_the_data)  # local cache of remote; without remote: a local MDS root
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    num_classes: int = teacher_input(1000, Range.at_least(2))
    image_size: int = teacher_input(224, PIXELS, "pixels")
    crop_pct: float = free(0.95, Range(0, 1, low_included=False))  # eval: resize to image_size/crop_pct, crop
    interpolation: Literal["bicubic", "bilinear", "nearest", "random"] = teacher_input("bicubic")
    # RandomResizedCrop's area range and aspect ratios
    scale: list[float] = teacher_input(check=_interval(1, "0 < min <= max <= 1"), factory=lambda: [0.08, 1.0])
    ratio: list[float] = teacher_input(check=_interval(None, "0 < min <= max"), factory=lambda: [3 / 4, 4 / 3])
    hflip: float = teacher_input(0.5, PROBABILITY)
    auto_augment: str | None = teacher_input("rand-m7-mstd0.5-inc1", check=_auto_augment)
    # None: the student backbone's own (resolved: the plan's student_mean/student_std)
    mean: list[float] | None = math(None, check=_rgb(positive=False))
    std: list[float] | None = math(None, check=_rgb(positive=True))
    # Larger images (width x height from the header) stop with one line naming them, undecoded.
    # Default: PIL's decompression-bomb threshold; null: no limit.
    max_image_pixels: int | None = free(Image.MAX_IMAGE_PIXELS, POSITIVE)
    num_workers: int = free(8, NON_NEGATIVE)
    pin_memory: bool = free(True)
    persistent_workers: bool = free(True)
    # cpu: workers decode and augment (timm's PIL transforms); gpu: workers read bytes and draw the
    # random choices, decode/crop/RandAugment/normalize run batched on the device (data/gpu_pipeline.py)
    pipeline: Literal["cpu", "gpu"] = teacher_input("cpu")
    # gpu pipeline: decode JPEGs on the device (nvJPEG); false: in the workers, reduced size
    gpu_decode: bool = teacher_input(True, when=_gpu_pipeline)


@dataclass
class DistillationConfig:
    """``KnowledgeDistillation``'s hyper-parameters (by their names in its signature) and the teacher cache."""

    enabled: bool = math(True)
    alpha: float = math(5.0, KD["alpha"])
    temperature: float = math(1.0, KD["temperature"])
    ce_weight: float = math(1.0, KD["ce_weight"])
    # batches between reads of the ce/kd means and the non-finite check (one sync each)
    log_interval: int = free(100, KD["log_interval"])
    # The teacher's outputs, cached (usi_composer/teacher_cache/). Reading an exact (full) cache is the
    # online teacher (its fingerprint is checked), so `cache` is free; the format is math.
    cache: str | None = free(None, check=_named)  # read the logits from here; the teacher is not built
    cache_write: str | None = free(None, check=_named)  # store them here as the run trains (usi-cache-teacher too)
    cache_format: Literal["full", "topk"] = math("full")  # the cache's: every logit (exact) or the top k
    cache_topk: int | None = math(None, AT_LEAST_ONE)  # k, for cache_format=topk
    # image folders: a cache knows the data by each file's path, size and modification time; true: also by
    # the sha256 of every image's bytes (read once at the start, by the writer and by a reader)
    cache_verify_data: bool = free(False)


@dataclass
class MixUpCutMixConfig:
    """``MixUpCutMix``'s hyper-parameters, by their names in its signature."""

    enabled: bool = teacher_input(True)
    mixup_alpha: float = teacher_input(0.8, MIX["mixup_alpha"], when=_mixes)
    cutmix_alpha: float = teacher_input(1.0, MIX["cutmix_alpha"], when=_mixes)
    switch_prob: float = teacher_input(0.5, MIX["switch_prob"], when=_mixes)
    prob: float = teacher_input(1.0, MIX["prob"], when=_mixes)
    label_smoothing: float = math(0.0, MIX["label_smoothing"])  # the targets, not the images


@dataclass
class EMAConfig:
    enabled: bool = math(True)
    # per optimizer step at reference_batch_size; rescaled to keep the half-life in samples (the plan's ema_smoothing)
    decay: float = math(0.99996, EMA_SMOOTHING)
    reference_batch_size: int = math(1024, POSITIVE)
    best_of_raw: bool = free(True)  # also validate the raw weights; keep the better (official USI)


@dataclass
class AlgorithmsConfig:
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    mixup_cutmix: MixUpCutMixConfig = field(default_factory=MixUpCutMixConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    channels_last: bool = teacher_input(True)  # the batch's memory format
    progressive_resizing: bool = teacher_input(False)  # deliberately off in USI, see yamls/usi.yaml


@dataclass
class OptimizerConfig:
    lr: float = math(2e-3, POSITIVE)  # at reference_batch_size; scaled linearly with the global batch (the plan's)
    reference_batch_size: int = math(1024, POSITIVE)
    weight_decay: float = math(2e-2, NON_NEGATIVE)  # not on biases and norm parameters
    betas: list[float] = math(check=_betas, factory=lambda: [0.9, 0.999])
    eps: float = math(1e-8)


@dataclass
class SchedulerConfig:
    warmup: str = math("5ep", check=_time_string("ep", "ba", "sp", "dur"))
    warmup_lr: float = math(1e-4, NON_NEGATIVE)  # warm-up starts here ...
    min_lr: float = math(1e-6, NON_NEGATIVE)  # ... and the cosine ends here (absolute learning rates)


@dataclass
class TrainerConfig:
    global_batch_size: int = teacher_input(1024, POSITIVE)  # summed over all processes
    eval_batch_size: int | None = free(None, POSITIVE)  # per process; None: the training batch per process
    # per process; None: the whole batch; auto: Composer's automatic microbatching (CUDA: the largest that fits)
    microbatch_size: int | str | None = math(None, check=_microbatch)
    max_duration: str = math("300ep", check=_time_string("ep", "ba", "sp"))
    eval_interval: str = free("1ep", check=_time_string("ep", "ba", "sp", "dur"))
    # None: fp32 CPU, bf16 GPU (resolved: the plan's precision)
    precision: Literal["fp32", "amp_fp16", "amp_bf16", "amp_fp8"] | None = math("amp_bf16")
    device: Literal["cpu", "gpu", "mps"] | None = free(None)  # None: gpu if available (resolved: the plan's)
    compile: Literal["auto", True, False] = free("auto")  # torch.compile student and teacher; auto: GPUs only
    seed: int = teacher_input(0)
    run_name: str | None = free(None)
    save_folder: str | None = free(None)  # local path or object-store URI; None: no checkpoints
    save_interval: str = free("1ep", check=_time_string("ep", "ba", "sp", "dur"))
    # local copies (-1: all); None: all for a local save_folder, 1 for a remote one
    save_num_checkpoints_to_keep: int | None = free(None, Range.at_least(-1))
    save_overwrite: bool = free(False)
    autoresume: bool = free(False)  # needs run_name and save_folder
    # keys whose change to the training math may resume (autoresume refuses any other)
    autoresume_accept: list[str] = free(check=_key_paths, factory=list)
    load_path: str | None = free(None)
    trust_checkpoints: bool = free(False)  # resume (load_path, autoresume) unpickling in full; false: read as data
    progress_bar: bool = free(True)  # on a terminal, one bar for the run; false (or in a log file): plain lines
    # a plain line (epoch/batch, loss, LR, img/s, ETA) this often, and at each epoch's end (usi_composer/console.py)
    log_interval: str = free("100ba", check=_time_string("ep", "ba", "sp", "dur"))
    speed_window: int = free(50, AT_LEAST_ONE)  # batches Composer's SpeedMonitor averages throughput over
    train_subset_num_batches: int = teacher_input(-1)
    eval_subset_num_batches: int = free(-1)
    fsdp: dict[str, Any] | None = free(None)  # Composer FSDP (v1) options, e.g. {sharding_strategy: FULL_SHARD}; GPUs


@dataclass
class WandBConfig:
    """Composer's ``WandBLogger``; the mode (online/offline) follows ``WANDB_MODE`` unless set here."""

    project: str | None = free(None, check=_named)  # None: W&B's default (WANDB_PROJECT, else 'uncategorized')
    entity: str | None = free(None, check=_named)  # None: your default entity
    group: str | None = free(None, check=_named)  # e.g. one ablation's name, to compare its runs side by side
    tags: list[str] = free(check=_tags, factory=list)
    name: str | None = free(None, check=_named)  # run name; None: Composer's run name (trainer.run_name)
    notes: str | None = free(None)
    mode: Literal["online", "offline", "disabled"] | None = free(None)  # None: WANDB_MODE, else online
    dir: str | None = free(None)  # parent of the wandb/ run directories; None: WANDB_DIR, else the working directory
    log_artifacts: bool = free(False)  # upload checkpoints as W&B artifacts
    # a few images of a training batch as the student sees it (mixed, normalized) this often; null: none
    log_images: str | None = free(None, check=_time_string("ep", "ba"))


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
