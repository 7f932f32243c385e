"""``usi-cache-teacher YAML [key=value ...] --out URI``: the teacher's outputs for a training run, stored once.

    usi-cache-teacher yamls/demo.yaml --out runs/teacher-cache/demo
    usi-cache-teacher yamls/usi.yaml data.remote=s3://b/imagenet --out s3://b/cache/usi-300ep \\
        algorithms.distillation.cache_format=topk algorithms.distillation.cache_topk=10
    composer -n 8 -m usi_composer.cli.cache_teacher yamls/usi.yaml --out s3://b/cache/usi-300ep   # as trained

Runs the training run's own loop (``builders.build_trainer``: the same data, microbatching, device
transforms, MixUp/CutMix and teacher, in the same precision and compile setting) over
``trainer.max_duration`` with a :class:`~usi_composer.teacher_cache.NullStudent` in place of the
student and without EMA, evaluation, checkpoints or W&B, storing the teacher's outputs for every
microbatch, keyed by (epoch, batch, rank, microbatch). Launch it with the processes the training
runs will have (the world size is part of the cache's fingerprint). A training run then reads them
with ``algorithms.distillation.cache=URI``. Prints the bytes stored per sample per epoch.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Sequence

from usi_composer import redaction
from usi_composer.cli._common import config_parser, fail
from usi_composer.config import Config, ConfigError, load_config
from usi_composer.errors import UsiError

__all__ = ["main", "teacher_only"]


def teacher_only(cfg: Config, out: str) -> Config:
    """``cfg`` as the run that fills a cache at ``out``: ``cache_write`` set, and what does not shape
    the teacher's inputs (EMA, evaluation, checkpoints, resuming, W&B) turned off."""
    cfg = copy.deepcopy(cfg)
    kd = cfg.algorithms.distillation
    kd.cache, kd.cache_write = None, out
    cfg.algorithms.ema.enabled = False
    cfg.data.val_dir = None
    cfg.data.streaming.val_split = None
    t = cfg.trainer
    t.save_folder, t.autoresume, t.load_path = None, False, None
    cfg.loggers.wandb = None
    return cfg


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def main(argv: Sequence[str] | None = None) -> int:
    redaction.install()
    parser = config_parser("usi-cache-teacher", __doc__.splitlines()[0], overrides="the training run's overrides")
    parser.add_argument("--out", required=True, metavar="URI", help="the cache: a local folder or object-store URI")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.algorithms.distillation.enabled:
            raise ConfigError("", "algorithms.distillation.enabled", "is false: the run has no teacher to cache")
        cfg = teacher_only(cfg, args.out)
        from composer.utils import dist

        from usi_composer.builders import build_trainer
        from usi_composer.teacher_cache import NullStudent, TeacherCacheWriter

        trainer = build_trainer(cfg, student=NullStudent(cfg.data.num_classes))
        trainer.fit()
    except UsiError as e:
        return fail(e)
    writer = next(c for c in trainer.state.callbacks if isinstance(c, TeacherCacheWriter))
    trainer.close()
    if dist.get_global_rank() == 0 and writer.samples:
        m = writer.manifest
        what = f"top-{m.k} logits" if m.format == "topk" else "every logit"
        per_sample, epochs = writer.stored_bytes / writer.samples, writer.stored_batches / m.batches_per_epoch
        print(
            f"teacher cache {args.out}: {writer.stored_batches} batches ({epochs:g} epochs) x {m.world_size} "
            f"rank(s), {what} of {m.num_classes} classes; "
            f"{per_sample:.1f} bytes per sample per epoch ({writer.payload_bytes / writer.samples:.1f} of them the "
            f"outputs), {_size(writer.stored_bytes * m.world_size)} in all"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
