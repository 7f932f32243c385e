"""The checks before anything heavy is built: everything that can refuse a run without weights, a
network or a process group. ``train()`` and ``--dry-run`` both run :func:`preflight`, so a config that
passes ``--dry-run`` does not stop seconds into the real run for a reason it could have known.

What is checked, each refusal one line (a :class:`ConfigError`, exit 2) naming the key:
the data is where the config says (image folders, or a local MDS root's split index); the data's
classes against ``data.num_classes``; a pretrained teacher's classes; every ``*.checkpoint`` and
``trainer.load_path`` present (local) and fetched safely, and a local checkpoint shaped for its model;
``model.kwargs``/``teacher.kwargs`` accepted by the timm constructor and the size each model runs at
(a forward on PyTorch's meta device); a ``save_folder`` that already holds checkpoints without
autoresume or ``save_overwrite``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
import zipfile
from collections.abc import Iterator

from usi_composer import storage
from usi_composer.checkpoints import checkpoint_problem, refuse_plain_http
from usi_composer.config import Config, ConfigError
from usi_composer.errors import CheckpointError, InputSizeError, UnsafeCheckpointError
from usi_composer.plan import RunPlan, data_classes, kwargs_key

__all__ = ["check_classes", "check_model_sizes", "checkpoint_key", "preflight"]

log = logging.getLogger(__name__)


def preflight(cfg: Config, plan: RunPlan) -> list[str]:
    """Run every check; return the lines that say what each model is built for and runs at."""
    sizes = check_model_sizes(cfg, plan)  # also: the kwargs each constructor takes
    check_data(cfg, plan)
    check_classes(cfg, plan)
    check_teacher_classes(cfg, plan)
    check_checkpoints(cfg, plan)
    check_save_folder(cfg)
    return sizes


def check_data(cfg: Config, plan: RunPlan) -> None:
    """The training (and evaluation) data where the config says: image folders, or a local MDS root's
    split indexes. A remote root is streaming's to read (a network request is no pre-flight's)."""
    data = cfg.data
    if not plan.streams:
        for key, folder in (("data.train_dir", data.train_dir), ("data.val_dir", data.val_dir)):
            if folder is not None and not os.path.isdir(folder):
                raise ConfigError(key, f"no such folder: {folder} (the ImageNet layout: <folder>/<class>/<image>)")
        return
    if data.remote:
        return
    splits = [("data.streaming.train_split", data.streaming.train_split)]
    if data.streaming.val_split:
        splits.append(("data.streaming.val_split", data.streaming.val_split))
    for key, split in splits:
        index = os.path.join(str(data.local), split, "index.json")
        if not os.path.isfile(index):
            raise ConfigError(key, f"no MDS split at {index} (write one with usi-convert-imagenet)")


def check_model_sizes(cfg: Config, plan: RunPlan) -> list[str]:
    """The student (and the teacher, where one is built) run at the size they will see; one line each
    saying what it is built for. A model that cannot is a :class:`ConfigError` naming the size's key and
    the nearest sizes that run (``models.check_input_size``: a forward on the meta device, no weights);
    a kwarg its constructor does not take names ``<section>.kwargs.<name>``."""
    from usi_composer.models import check_input_size

    data = cfg.data
    roles = [("model", "student", cfg.model, data.image_size)]
    if plan.teacher_img_size is not None:
        roles.append(("teacher", "teacher", cfg.teacher, plan.teacher_img_size))
    lines = []
    for section, role, model, runs_at in roles:
        built_for = model.img_size or data.image_size
        key = f"{section}.img_size" if model.img_size else "data.image_size"
        extra = {"drop_path_rate": cfg.model.drop_path_rate} if section == "model" else {}
        try:
            with kwargs_key(section):
                took = check_input_size(str(model.name), runs_at, data.num_classes, built_for, **extra, **model.kwargs)
        except InputSizeError as e:
            hint = ""
            if section == "teacher" and not model.img_size:
                hint = " (or set teacher.img_size to one: the student's batch is resized for the teacher)"
            raise ConfigError(key, f"{e}{hint}") from None
        if took:
            lines.append(f"{role} {model.name}: built for {built_for} px (timm's img_size), runs at {runs_at} px")
        else:
            any_size = "no img_size in its timm constructor: any size it can"
            lines.append(f"{role} {model.name}: runs at {runs_at} px ({any_size})")
    return lines


def check_classes(cfg: Config, plan: RunPlan) -> None:
    """The data's classes against ``data.num_classes``: the MDS root's ``classes.json`` (usi-convert-imagenet
    writes it) or the training folder's class folders. Labels are also checked per sample as they are read
    (``LabelError``), since a label out of range is an opaque assert on a GPU."""
    data = cfg.data
    wnids, where = data_classes(cfg)
    if wnids is None:
        log.warning("no %s beside the shards: labels are checked sample by sample only", where)
        return
    found = (
        f"{where} lists {len(wnids)} classes" if plan.streams else f"{data.train_dir} has {len(wnids)} class folders"
    )
    if len(wnids) != data.num_classes:
        raise ConfigError("data.num_classes", f"is {data.num_classes}, but {found}: set data.num_classes={len(wnids)}")


def check_teacher_classes(cfg: Config, plan: RunPlan) -> None:
    """A pretrained teacher must have been trained on the data's classes (before anything is downloaded).

    ``timm.create_model(pretrained=True, num_classes=N)`` with weights for another number of classes
    drops their classifier and builds a random one without a word (timm 1.0.31 ``_builder.py:
    load_pretrained``); distilling from it teaches nothing. The plan's ``teacher_classes`` is what timm's
    pretrained cfg (with ``pretrained_cfg_overlay``) says the weights classify. The student may start
    from weights of another class count: that is ordinary fine-tuning.
    """
    teacher, n = cfg.teacher, cfg.data.num_classes
    if not plan.builds_teacher or not teacher.pretrained or plan.teacher_classes == n or plan.teacher_outputs:
        return  # a class map picks the data's classes among the teacher's
    overlay = dict(teacher.kwargs.get("pretrained_cfg_overlay") or {})
    source = next((k for k in ("num_classes", "file", "url", "hf_hub_id") if overlay.get(k) is not None), None)
    key = f"teacher.kwargs.pretrained_cfg_overlay.{source}" if source else "teacher.pretrained"
    raise ConfigError(
        key,
        f"the pretrained weights of teacher {teacher.name} classify {plan.teacher_classes} classes, data.num_classes "
        f"is {n}: timm would give the teacher a new, untrained classifier, which knows nothing of these classes; "
        "fine-tune a teacher on this data as yamls/demo_teacher.yaml does, then set teacher.checkpoint=PATH "
        "and teacher.pretrained=false (or, for a subset of its classes, teacher.class_map)",
    )


@contextlib.contextmanager
def checkpoint_key(key: str, trust_key: str) -> Iterator[None]:
    """Weights that cannot be loaded are a config error (exit 2) naming the key that points at them;
    a refused unpickling also names ``trust_key``, the opt-in that loads the file in full."""
    try:
        yield
    except UnsafeCheckpointError as e:
        raise ConfigError(key, f"{e}; if you trust this file, set {trust_key}=true") from None
    except CheckpointError as e:
        raise ConfigError(key, str(e)) from None


def check_checkpoints(cfg: Config, plan: RunPlan) -> None:
    """Every checkpoint the config names: fetched safely (no plain http://, no untrusted tar), present
    where it is local, and shaped for its model (read as data and mapped, loaded into the model made on
    the meta device: no memory, no compute)."""
    from composer.utils import is_tar

    model, teacher, trainer = cfg.model, cfg.teacher, cfg.trainer
    classes = cfg.data.num_classes
    weights = [("model", model, data_size := cfg.data.image_size, classes)]
    if plan.builds_teacher:
        weights.append(("teacher", teacher, plan.teacher_img_size or data_size, plan.teacher_classes or classes))
    for section, part, img_size, num_classes in weights:
        if part.checkpoint:
            with checkpoint_key(f"{section}.checkpoint", f"{section}.trust_checkpoint"):
                _check_fits(str(part.name), part.checkpoint, num_classes, img_size, part)
    if trainer.load_path:
        with checkpoint_key("trainer.load_path", "trainer.trust_checkpoints"):
            refuse_plain_http(trainer.load_path)
            if is_tar(trainer.load_path) and not trainer.trust_checkpoints:  # Composer 0.32.1: download_checkpoint
                what = "extract a tar archive (Composer extracts it unfiltered: a member can write any file)"
                raise UnsafeCheckpointError(trainer.load_path, what)
            if not storage.is_remote(trainer.load_path):
                _check_local_checkpoint(trainer.load_path)


def _check_local_checkpoint(path: str) -> None:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if zipfile.is_zipfile(path) and (problem := checkpoint_problem(path)):
        raise CheckpointError(f"{path}: {problem}")


def _check_fits(name: str, checkpoint: str, num_classes: int, img_size: int, part: object) -> None:
    import torch

    from usi_composer.models import create_model_for_size, load_weights

    refuse_plain_http(checkpoint)
    if storage.is_remote(checkpoint):
        return  # fetched when the model is built: a download is no pre-flight's
    if not os.path.isfile(checkpoint):
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    kwargs = {k: v for k, v in getattr(part, "kwargs", {}).items() if v is not None}
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: copying into a meta tensor is a no-op (that is the point)
        module, _ = create_model_for_size(name, img_size, num_classes=num_classes, **kwargs)
        load_weights(module, checkpoint, name, trust=bool(getattr(part, "trust_checkpoint", False)), say=False)


def check_save_folder(cfg: Config) -> None:
    """A local ``save_folder`` that already holds a run's checkpoints is resumed or replaced only when the
    config says which (Composer would stop after the whole build with its own ``FileExistsError``)."""
    trainer = cfg.trainer
    if (
        not trainer.save_folder
        or trainer.autoresume
        or trainer.save_overwrite
        or storage.is_remote(trainer.save_folder)
    ):
        return
    if "{run_name}" in trainer.save_folder and not trainer.run_name:
        return  # a new run name each run (Composer's): a new folder
    from composer.utils import format_name_with_dist

    folder = format_name_with_dist(trainer.save_folder, trainer.run_name or "")
    if os.path.isdir(folder) and any(name.endswith(".pt") for name in os.listdir(folder)):
        raise ConfigError(
            "trainer.save_folder",
            f"{folder} already holds checkpoints: set trainer.autoresume=true (with a fixed trainer.run_name) to "
            "continue that run, or trainer.save_overwrite=true to replace them, or name another folder",
        )
