"""Trained weights out of the recipe, in timm's Hugging Face layout (``usi-export``).

:func:`export_for_timm` writes the trained backbone of a checkpoint (the EMA weights where EMA ran;
``models.trained_weights`` says which) with timm's own ``save_for_hf``: ``model.safetensors`` and
``config.json``, whose ``pretrained_cfg`` holds the input size, interpolation, crop_pct and mean/std
the recipe evaluated with, so timm's ``resolve_data_config`` + ``create_transform`` rebuild the
recipe's eval transform, and ``label_names`` (the classes in label order) with ``label_descriptions``
(their human names, where known), timm's convention. Beside them, ``README.md``: a short model card
(:func:`model_card`: recipe, student, teacher, data, top-1, the timm command that evaluates it). timm
loads the folder with ``timm.create_model("local-dir:FOLDER", pretrained=True)``; pushed to the hub
(:func:`push_to_hub`, timm's ``push_to_hf_hub``), with ``timm.create_model("hf-hub:REPO_ID", pretrained=True)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from composer.utils import format_name_with_dist, get_file
from torch import nn

from usi_composer import redaction, storage
from usi_composer.checkpoints import LATEST_CHECKPOINT, read_checkpoint
from usi_composer.config import Config, ConfigError
from usi_composer.data import TransformSpec
from usi_composer.data.layout import find_classes
from usi_composer.errors import CheckpointError, SetupError, UnreachableError, first_line
from usi_composer.models import create_model_for_size, load_weights
from usi_composer.plan import resolve

__all__ = [
    "EXPORT_FILES",
    "Export",
    "Labels",
    "TrainedBackbone",
    "class_labels",
    "eval_data_config",
    "export_for_timm",
    "measured_top1",
    "model_card",
    "push_to_hub",
    "resolve_checkpoint",
    "trained_backbone",
]

WEIGHTS_FILE = "model.safetensors"  # timm's HF_SAFE_WEIGHTS_NAME
CARD_FILE = "README.md"  # the Hugging Face hub's model card
# what save_for_hf(safe_serialization=True) writes, and the card
EXPORT_FILES = (WEIGHTS_FILE, "config.json", CARD_FILE)

# timm.create_model's own options: not the architecture's, so not the export's model_args.
_FACTORY_OPTIONS = {"pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir"}
# pretrained_cfg entries that describe timm's published weights for the architecture (their tag,
# licence, paper, labels, test-time size, custom loader), not weights this recipe trained.
_SOURCE_WEIGHTS = {
    "tag",
    "license",
    "description",
    "origin_url",
    "paper_name",
    "paper_ids",
    "notes",
    "label_offset",
    "label_names",
    "label_descriptions",
    "test_input_size",
    "test_crop_pct",
    "test_pool_size",
}


def resolve_checkpoint(cfg: Config, checkpoint: str | None) -> str:
    """The weights to read: ``checkpoint`` (a file or URI; a local folder: the ``model.safetensors`` of an
    export, else the save folder's ``latest-rank0.pt``), or, where None, the newest checkpoint of the run
    in ``trainer.save_folder`` (local or object store: Composer's ``get_file`` follows its ``.symlink``)."""
    if checkpoint is not None:
        if not os.path.isdir(checkpoint):
            return checkpoint
        for name in (WEIGHTS_FILE, LATEST_CHECKPOINT):
            if os.path.isfile(os.path.join(checkpoint, name)):
                return os.path.join(checkpoint, name)
        raise CheckpointError(
            f"{checkpoint}: a folder with neither {WEIGHTS_FILE} (an export) nor {LATEST_CHECKPOINT} (a save folder)"
        )
    trainer = cfg.trainer
    if not trainer.save_folder:
        raise ConfigError("trainer.save_folder", "is unset: pass --checkpoint, or the run's save_folder")
    if "{run_name}" in trainer.save_folder and not trainer.run_name:
        raise ConfigError(
            "trainer.run_name",
            f"is unset, and trainer.save_folder ({trainer.save_folder}) names the run: set the run's",
        )
    return f"{format_name_with_dist(trainer.save_folder, trainer.run_name or '').rstrip('/')}/{LATEST_CHECKPOINT}"


@dataclass
class TrainedBackbone:
    """The student backbone of a config with trained weights in it, in eval mode."""

    module: nn.Module
    weights: str  # which weights of the checkpoint (models.trained_weights' description)
    model_args: dict[str, Any]  # its constructor's arguments beyond name and num_classes (img_size, model.kwargs)


def trained_backbone(cfg: Config, checkpoint: str, trust: bool = False) -> TrainedBackbone:
    """``cfg.model`` built as training built it (``img_size``, ``model.kwargs``), with the trained weights of
    ``checkpoint`` (``models.load_weights``: read as data unless ``trust``) instead of ``model.checkpoint``."""
    m, d = cfg.model, cfg.data
    kwargs = {k: v for k, v in m.kwargs.items() if v is not None}
    img_size = m.img_size or d.image_size
    module, took_img_size = create_model_for_size(m.name, img_size, num_classes=d.num_classes, **kwargs)
    weights = load_weights(module, checkpoint, m.name, trust=trust)
    model_args = {k: v for k, v in kwargs.items() if k not in _FACTORY_OPTIONS}
    if took_img_size:
        model_args["img_size"] = img_size
    return TrainedBackbone(module.eval(), weights, model_args)


def eval_data_config(cfg: Config) -> dict[str, Any]:
    """The recipe's eval transform (``TransformSpec``, as ``build_dataloaders`` makes it) in timm's data
    config keys: what ``timm.data.create_transform(**config)`` needs to rebuild it."""
    plan = resolve(cfg)
    spec = TransformSpec.from_data(cfg.data, mean=plan.student_mean, std=plan.student_std)
    return {
        "input_size": (3, spec.image_size, spec.image_size),
        "interpolation": spec.fixed_interpolation,
        "crop_pct": spec.crop_pct,
        "crop_mode": "center",
        "mean": spec.mean,
        "std": spec.std,
    }


@dataclass
class Labels:
    """The classes of the model's outputs, in label order, as timm's ``pretrained_cfg`` holds them."""

    names: list[str] | None  # label_names: the wnids (class folder names); None where unknown
    descriptions: dict[str, str]  # label_descriptions: name -> human name, where known
    source: str  # where they came from, or why there are none


def class_labels(cfg: Config) -> Labels:
    """The run's classes: the MDS root's ``classes.json`` (``wnids`` and ``names``, usi-convert-imagenet's)
    or the training folder's class folders (their names only), the orders training labelled them in."""
    d = cfg.data
    if d.remote or d.local:
        where = storage.join((d.remote or d.local or "").rstrip("/"), "classes.json")
        doc = storage.read_json(where)
        if doc is None:
            return Labels(None, {}, f"no {where}")
        wnids, names = doc.get("wnids"), doc.get("names") or []
        if not isinstance(wnids, list) or not isinstance(names, list):
            raise SetupError(f"{where}: not a classes.json of usi-convert-imagenet (no list of wnids)")
        wnids = [str(w) for w in wnids]
        descriptions = {w: str(n) for w, n in zip(wnids, names, strict=False) if str(n) != w}
    elif d.train_dir and os.path.isdir(d.train_dir):
        where, wnids, descriptions = d.train_dir, find_classes(d.train_dir), {}
    else:
        return Labels(None, {}, f"data.train_dir ({d.train_dir}) is not here")
    if len(wnids) != d.num_classes:  # not the data this model was trained on
        return Labels(None, {}, f"{where} lists {len(wnids)} classes, the model has {d.num_classes}")
    return Labels(wnids, descriptions, where)


def measured_top1(checkpoint: str, weights: str, trust: bool = False) -> float | None:
    """Top-1 of the exported weights at the run's last evaluation, as ``BestOfEMAAndRaw`` stored it in a
    Composer checkpoint; None for other files (a weights file, an export) or where it did not run.
    ``weights``: which weights of the checkpoint were taken (``models.trained_weights``' description)."""
    kept = "raw" if weights.startswith("the raw training") else "ema" if weights.startswith("the EMA") else None
    if kept is None or checkpoint.endswith(".safetensors"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = checkpoint
        if "://" in checkpoint:  # read a second time (load_weights keeps no copy): an export is done once
            local = os.path.join(tmp, "checkpoint")
            get_file(checkpoint, local, progress_bar=False)
        state = read_checkpoint(local, trust=trust, name=checkpoint, mmap=True).get("state")
    best = ((state or {}).get("callbacks") or {}).get("BestOfEMAAndRaw") or {}
    scores = (best.get("scores") or {}).get("eval")  # training's evaluator (metrics/eval/...)
    if best.get("metric", "top1") != "top1" or not isinstance(scores, dict) or kept not in scores:
        return None
    return float(scores[kept])


@dataclass
class Export:
    """What :func:`export_for_timm` wrote."""

    folder: Path
    checkpoint: str  # the file the weights came from
    weights: str  # which weights of it
    config: dict[str, Any]  # config.json as written
    backbone: TrainedBackbone = field(repr=False)  # for push_to_hub
    labels: Labels  # the label names written, or why there are none
    top1: float | None  # the run's top-1 of these weights (measured_top1), in the model card


def export_for_timm(
    cfg: Config,
    folder: str | os.PathLike,
    checkpoint: str | None = None,
    trust: bool = False,
    overwrite: bool = False,
) -> Export:
    """Write the trained backbone of ``checkpoint`` (:func:`resolve_checkpoint`; None: the run's latest
    checkpoint) to ``folder`` in timm's Hugging Face layout (:data:`EXPORT_FILES`), with timm's ``save_for_hf``.

    The model's ``pretrained_cfg`` becomes the recipe's: the eval transform (:func:`eval_data_config`),
    ``num_classes``, ``custom_load=False`` (native weights); entries that describe timm's published
    weights are dropped; ``label_names``/``label_descriptions`` are the run's (:func:`class_labels`). (timm
    1.0.31's ``save_for_hf`` also takes ``data_config``; the ``pretrained_cfg`` is what every timm this recipe
    allows reads.) ``README.md`` is the model card (:func:`model_card`, top-1 from :func:`measured_top1`).

    The files are written beside ``folder`` first and moved in once complete: a failed or killed export
    leaves ``folder`` as it was. A ``folder`` that holds any of them already is refused unless ``overwrite``
    (then those three files are replaced, other files kept).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SetupError(f"{folder}: exists and is not a folder")
    existing = [name for name in EXPORT_FILES if (folder / name).exists()]
    if existing and not overwrite:
        raise SetupError(f"{folder}: holds {' and '.join(existing)} already; pass --overwrite to replace them")
    checkpoint = resolve_checkpoint(cfg, checkpoint)
    trained = trained_backbone(cfg, checkpoint, trust)
    labels, top1 = class_labels(cfg), measured_top1(checkpoint, trained.weights, trust)
    module = trained.module
    module.pretrained_cfg = {
        **{k: v for k, v in module.pretrained_cfg.items() if k not in _SOURCE_WEIGHTS},
        **eval_data_config(cfg),
        "num_classes": cfg.data.num_classes,
        "custom_load": False,
        "pool_size": None,  # the source weights' feature map size; ours follow input_size
        **({"label_names": labels.names} if labels.names else {}),
        **({"label_descriptions": labels.descriptions} if labels.names and labels.descriptions else {}),
    }
    card = model_card(cfg, module, folder, f"{trained.weights}, from {checkpoint}", labels, top1)
    _write_atomically(folder, module, trained.model_args, card)
    config = json.loads((folder / "config.json").read_text())
    return Export(folder, checkpoint, trained.weights, config, trained, labels, top1)


def _write_atomically(folder: Path, module: nn.Module, model_args: dict[str, Any], card: str) -> None:
    """timm's ``save_for_hf`` files and the card, written beside ``folder`` and moved in once complete."""
    from timm.models import save_for_hf

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.parent / f"{storage.TEMP_PREFIX}{uuid.uuid4().hex[:12]}-{folder.name}"  # same file system
    staging.mkdir()
    try:
        save_for_hf(module, str(staging), model_args=model_args, safe_serialization=True)
        (staging / CARD_FILE).write_text(card)
        # safetensors creates its file 0600 whatever the umask: the export gets config.json's (the umask's)
        shutil.copymode(staging / "config.json", staging / WEIGHTS_FILE)
        for name in EXPORT_FILES:
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        if folder.exists():
            for name in EXPORT_FILES:
                os.replace(staging / name, folder / name)
        else:
            os.rename(staging, folder)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)


def model_card(cfg: Config, module: nn.Module, folder: Path, weights: str, labels: Labels, top1: float | None) -> str:
    """The export's ``README.md``: what was trained how, on what, how well, and the timm command that checks it."""
    d, a, name = cfg.data, cfg.algorithms, cfg.model.name
    kd = a.distillation
    teacher = "none (distillation off)"
    if kd.enabled:
        weights_of = cfg.teacher.checkpoint or ("timm's pretrained weights" if cfg.teacher.pretrained else "random")
        teacher = f"`{cfg.teacher.name}` ({weights_of}; alpha {kd.alpha}, temperature {kd.temperature})"
        teacher += f"; its outputs read from the cache {kd.cache}" if kd.cache else ""
    streams = bool(d.remote or d.local)
    root = (d.remote or d.local or "").rstrip("/")
    train, val = (
        (f"{root}/{d.streaming.train_split}", f"{root}/{d.streaming.val_split}")
        if streams
        else (d.train_dir, d.val_dir)
    )
    named = f"label names from {labels.source}" if labels.names else f"no label names: {labels.source}"
    measured = "not measured (`usi-eval` measures it)"
    if top1 is not None:
        measured = f"{top1:.4f} on {val} (the run's last evaluation of these weights)"
    val_dir = "VAL_DIR" if streams or not d.val_dir else d.val_dir
    params = sum(p.numel() for p in module.parameters()) / 1e6
    return redaction.redact_text(f"""# {name}, trained with USI

A `{name}` image classifier ({params:.1f}M parameters) trained with usi-composer's USI recipe
(Ridnik et al., "Solving ImageNet", 2022): MixUp/CutMix {"on" if a.mixup_cutmix.enabled else "off"}, EMA of
the weights {"on" if a.ema.enabled else "off"}, distillation as below.

- student: `{name}`, {d.image_size} px
- teacher: {teacher}
- data: train {train}, validation {val}; {d.num_classes} classes ({named})
- weights: {weights}
- top-1: {measured}

## Evaluate it with timm

timm's `validate.py` (github.com/huggingface/pytorch-image-models), on a `<class>/<image>` folder whose
class folders sort in the order of `pretrained_cfg["label_names"]`:

    python validate.py {val_dir} --model local-dir:{folder} --pretrained

In Python: `model = timm.create_model("local-dir:{folder}", pretrained=True)` and
`timm.data.create_transform(**timm.data.resolve_data_config(model=model))`, its eval transform.
""")  # a public file, maybe: no credentials of a URI


def push_to_hub(export: Export, repo_id: str, private: bool = False) -> str:
    """Upload ``export`` to the Hugging Face hub as ``repo_id`` with timm's ``push_to_hf_hub`` (the same
    ``save_for_hf`` files, and timm's model card where the repository has no README); returns its URL.

    Needs network and a token (``HF_TOKEN`` or ``huggingface-cli login``); any failure of the hub
    client (offline, no token, no permission) raises :class:`SetupError`, one line.
    """
    from timm.models import push_to_hf_hub

    trained = export.backbone
    try:
        commit = push_to_hf_hub(
            trained.module,
            repo_id,
            private=private,
            model_args=trained.model_args,
            safe_serialization=True,
            commit_message="Add USI-trained weights (usi-export)",
        )
    except Exception as e:  # huggingface_hub raises its own HTTP, offline and token errors, and requests'
        response = getattr(e, "response", None)  # the hub answered: 401, 403, ... (HfHubHTTPError)
        offline = response is None and isinstance(e, OSError)  # no answer: offline (HF_HUB_OFFLINE too), DNS, timeout
        if offline:
            reason = f"no connection to the hub, offline? {type(e).__name__}"
        else:
            reason = f"{type(e).__name__}: {first_line(e, 200)}"
        kind = UnreachableError if offline or getattr(response, "status_code", 0) >= 500 else SetupError  # retry?
        raise kind(
            f"could not push {export.folder} to the Hugging Face hub as {repo_id} ({reason}); the export is "
            "complete there (to push it, run the same usi-export with --overwrite where huggingface.co is reachable)"
        ) from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")
