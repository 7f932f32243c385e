"""``usi-cache-teacher YAML [key=value ...] --out URI``: the teacher's outputs for a training run, stored once.

    usi-cache-teacher yamls/demo.yaml --out runs/teacher-cache/demo
    usi-cache-teacher yamls/usi.yaml data.remote=s3://b/imagenet --out s3://b/cache/usi-300ep \\
        algorithms.distillation.cache_format=topk algorithms.distillation.cache_topk=10
    composer -n 8 -m usi_composer.cli.cache_teacher yamls/usi.yaml --out s3://b/cache/usi-300ep   # as trained

Runs the training run's own loop (``builders.build_trainer``: the same data, microbatching, device
transforms, MixUp/CutMix and teacher, in the same precision and compile setting) over
``trainer.max_duration`` with a null student (``teacher_cache/fill.py``) in place of the
student and without EMA, evaluation, checkpoints or W&B, storing the teacher's outputs for every
microbatch, keyed by (epoch, batch, rank, microbatch). Launch it with the processes the training
runs will have (the world size is part of the cache's fingerprint). A training run then reads them
with ``algorithms.distillation.cache=URI``. Prints the bytes stored per sample per epoch.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from usi_composer import redaction
from usi_composer.cli._common import config_parser, fail
from usi_composer.config import ConfigError, load_config
from usi_composer.errors import UsiError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    redaction.install()
    parser = config_parser("usi-cache-teacher", __doc__.splitlines()[0], overrides="the training run's overrides")
    parser.add_argument("--out", required=True, metavar="URI", help="the cache: a local folder or object-store URI")
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if not cfg.algorithms.distillation.enabled:
            raise ConfigError("algorithms.distillation.enabled", "is false: the run has no teacher to cache")
        from usi_composer.teacher_cache.fill import fill_cache  # heavy imports only when filling

        summary = fill_cache(cfg, args.out)
    except UsiError as e:
        return fail(e)
    if summary:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
