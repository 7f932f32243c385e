"""``composer train.py YAML [key=value ...]``: train a timm backbone with the USI scheme.

Also ``python train.py ...`` (one process) and the ``usi-train`` console script.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from usi_composer import redaction
from usi_composer.config import Config, ConfigError, dump_config, load_config
from usi_composer.errors import LostPeerError, UsiError, error_line

__all__ = ["final_metrics", "final_top1", "lost_peer", "main", "train"]


def train(cfg: Config, **build_kwargs: object):  # -> composer.Trainer
    """Build the trainer for ``cfg``, fit it, return it (metrics are in ``trainer.state.eval_metrics``)."""
    from usi_composer.builders import build_trainer  # heavy imports only when training
    from usi_composer.compilation import compile_failure

    trainer = build_trainer(cfg, **build_kwargs)  # type: ignore[arg-type]
    try:
        trainer.fit()
    except Exception as e:  # a compile failure or a lost node becomes one line that says what to do
        failure = compile_failure(e, cfg.model.name, _teacher(trainer, cfg)) or lost_peer(e, cfg)
        if failure is None:
            raise
        raise failure from None
    return trainer


# What the process-group backends say when a peer process is gone: gloo raises a plain
# RuntimeError ("Connection closed by peer"); NCCL a DistBackendError naming the remote process.
_LOST_PEER = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


def lost_peer(error: BaseException, cfg: Config) -> LostPeerError | None:
    """A one-line :class:`LostPeerError` if ``error`` says another process of the job is gone."""
    from composer.utils import dist

    text = str(error).strip()
    # torch.distributed's DistError (NCCL's DistBackendError) is a RuntimeError too
    if not isinstance(error, RuntimeError) or dist.get_world_size() < 2 or not any(s in text for s in _LOST_PEER):
        return None
    resume = (
        "relaunch the same command on every node to continue from the last checkpoint"
        if cfg.trainer.autoresume
        else "relaunch with trainer.autoresume=true (a fixed trainer.run_name and trainer.save_folder) "
        "to continue from the last checkpoint"
    )
    return LostPeerError(
        f"rank {dist.get_global_rank()} lost another process of the job ({text.splitlines()[0][-120:]}): "
        f"a node or process died or was stopped; {resume}"
    )


def _teacher(trainer: Any, cfg: Config) -> tuple[str, Any] | None:
    from usi_composer.algorithms import KnowledgeDistillation

    kd = next((a for a in trainer.state.algorithms if isinstance(a, KnowledgeDistillation)), None)
    return (str(cfg.teacher.name), kd.teacher) if kd is not None else None


def final_top1(trainer, label: str = "eval") -> float:  # trainer: composer.Trainer
    """Top-1 of the last evaluation: of the better of EMA and raw weights where both were validated."""
    from usi_composer.algorithms import BestOfEMAAndRaw

    best = next((c for c in trainer.state.callbacks if isinstance(c, BestOfEMAAndRaw)), None)
    if best is not None and label in best.scores:
        return max(best.scores[label].values())
    return float(trainer.state.eval_metrics[label]["top1"].compute())


def final_metrics(trainer: Any) -> dict[str, Any]:
    """The last evaluation's metrics under their logged names (``metrics/eval/top1``, ...; the
    EMA weights' where EMA ran), ``metrics/eval_best/top1`` (:func:`final_top1`) and
    ``wandb_run_dir`` where a W&B run was written."""
    from composer.loggers import WandBLogger

    result: dict[str, Any] = {
        f"metrics/{label}/{name}": float(metric.compute())
        for label, metrics in trainer.state.eval_metrics.items()
        for name, metric in metrics.items()
    }
    for label in trainer.state.eval_metrics:  # USI's number: the better of the EMA and raw weights
        result[f"metrics/{label}_best/top1"] = final_top1(trainer, label)
    wandb = next((d for d in trainer.logger.destinations if isinstance(d, WandBLogger)), None)
    if wandb is not None and wandb.run_dir:
        result["wandb_run_dir"] = str(Path(wandb.run_dir).parent)  # run_dir is the run's files/ folder
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train any timm backbone with the USI scheme (knowledge distillation, EMA, "
        "MixUp/CutMix). Overrides use dot paths, e.g. model.name=resnet50 trainer.max_duration=100ep.",
    )
    parser.add_argument("config", help="YAML config, e.g. yamls/usi.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, applied in order")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the config, print it resolved as YAML and exit; on stderr, the size each model "
        "is built for (checked by one forward on PyTorch's meta device: no weights, no data, no training)",
    )
    parser.add_argument(
        "--metrics-out",
        type=Path,
        metavar="JSON",
        help="after training, write the final eval metrics (metrics/eval/top1, ...) to this JSON file",
    )
    return parser.parse_intermixed_args(argv)  # options may sit among the key=value overrides


def main(argv: Sequence[str] | None = None) -> int:
    redaction.install()
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except UsiError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    if args.dry_run:
        from usi_composer.builders import check_model_sizes

        try:
            sizes = check_model_sizes(cfg)
        except ConfigError as e:
            print(error_line(e), file=sys.stderr)
            return 2
        print(dump_config(cfg, redacted=True), end="")
        print("\n".join(sizes), file=sys.stderr)
        return 0
    try:
        trainer = train(cfg)
    except ConfigError as e:  # found while building, before training: a model that cannot run at its size, ...
        print(error_line(e), file=sys.stderr)
        return 2
    except UsiError as e:
        print(error_line(e), file=sys.stderr)
        return 1
    metrics = final_metrics(trainer)
    trainer.close()  # finishes the W&B run (its summary and files) before we report success
    if args.metrics_out is not None:
        args.metrics_out.parent.mkdir(parents=True, exist_ok=True)
        args.metrics_out.write_text(json.dumps(metrics, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
