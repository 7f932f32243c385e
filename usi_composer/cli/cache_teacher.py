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

A cache at URI that holds this run's outputs for the whole duration already is skipped ("done
before, skipped"); ``--overwrite`` writes it again (locally, its own files are deleted first: no
other file in the folder is touched). Its files follow the umask, as every file the recipe writes.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from usi_composer import redaction
from usi_composer.cli._common import add_no_progress, config_parser, fail
from usi_composer.errors import UsiError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = config_parser("usi-cache-teacher", __doc__.splitlines()[0], overrides="the training run's overrides")
    parser.add_argument("--out", required=True, metavar="URI", help="the cache: a local folder or object-store URI")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="write the cache again even where it is complete (locally its own files are deleted first)",
    )
    add_no_progress(parser)  # = trainer.progress_bar=false
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    redaction.install()
    args = build_parser().parse_intermixed_args(argv)
    from usi_composer.config import ConfigError, load_config  # heavy imports after --help

    overrides = [*args.overrides, *(["trainer.progress_bar=false"] if args.no_progress else [])]
    try:
        cfg = load_config(args.config, overrides)
        if not cfg.algorithms.distillation.enabled:
            raise ConfigError("algorithms.distillation.enabled", "is false: the run has no teacher to cache")
        from usi_composer.console import show_library_logs
        from usi_composer.plan import Env
        from usi_composer.teacher_cache.fill import complete_cache, fill_cache, remove_cache

        show_library_logs()  # which teacher weights were loaded, one line (stdout)
        env = Env.current()
        world_size = env.world_size
        if args.overwrite:
            if world_size > 1:  # another process could read the old manifest while it goes
                raise UsiError(
                    f"--overwrite runs in one process, this launch has {world_size}: delete the cache's files "
                    f"(cache.json and rank*/ in {args.out}) and launch again without --overwrite"
                )
            remove_cache(args.out)
        elif complete_cache(cfg, args.out):
            if env.global_rank == 0:
                print(f"teacher cache {args.out}: done before, skipped (it holds this run; --overwrite rewrites it)")
            return 0
        summary = fill_cache(cfg, args.out)
    except UsiError as e:
        return fail(e)
    if summary:
        print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
