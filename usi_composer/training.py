"""The recipe's ``train()``: a config in, a fitted Composer ``Trainer`` out, and what a finished run
reports (``final_metrics``, ``final_top1``). ``train.py``, ``usi-train``, the demo and the sweeps
all train through it; failures a user can act on become one-line errors here.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from composer.loggers import WandBLogger
from composer.utils import dist

from usi_composer.algorithms import BestOfEMAAndRaw, KnowledgeDistillation
from usi_composer.builders import build_trainer
from usi_composer.compilation import compile_failure
from usi_composer.config import Config
from usi_composer.errors import LostPeerError, first_line

if TYPE_CHECKING:
    from composer import Trainer

__all__ = ["final_metrics", "final_top1", "lost_peer", "run_summary", "train"]


def train(cfg: Config, **build_kwargs: Any) -> Trainer:
    """Resolve ``cfg``'s run plan, check it before anything is built, set up the process, build the
    trainer, fit it and return it (``builders.build_trainer``; metrics are in ``trainer.state.eval_metrics``)."""
    trainer = build_trainer(cfg, **build_kwargs)
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
        f"rank {dist.get_global_rank()} lost another process of the job ({first_line(error)[-120:]}): "
        f"a node or process died or was stopped; {resume}"
    )


def _teacher(trainer: Any, cfg: Config) -> tuple[str, Any] | None:
    kd = next((a for a in trainer.state.algorithms if isinstance(a, KnowledgeDistillation)), None)
    return (str(cfg.teacher.name), kd.teacher) if kd is not None and kd.teacher is not None else None


def final_top1(trainer: Trainer, label: str = "eval") -> float:
    """Top-1 of the last evaluation: of the better of EMA and raw weights where both were validated."""
    best = next((c for c in trainer.state.callbacks if isinstance(c, BestOfEMAAndRaw)), None)
    if best is not None and label in best.scores:
        return max(best.scores[label].values())
    return float(trainer.state.eval_metrics[label]["top1"].compute())


def final_metrics(trainer: Trainer) -> dict[str, Any]:
    """The last evaluation's metrics under their logged names (``metrics/eval/top1``, ...; the
    EMA weights' where EMA ran), ``metrics/eval_best/top1`` (:func:`final_top1`) and
    ``wandb_run_dir`` where a W&B run was written."""
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


def run_summary(trainer: Trainer, cfg: Config, command: str) -> list[str]:
    """What a finished run tells its user, one fact a line: the best top-1 and which weights were kept,
    the last checkpoint, how to export it, and the W&B run. ``command``: how the run was started (its
    yaml and overrides), for the export command's line."""
    from composer.callbacks import CheckpointSaver

    metrics, lines = final_metrics(trainer), []
    best = next((c for c in trainer.state.callbacks if isinstance(c, BestOfEMAAndRaw)), None)
    if "metrics/eval_best/top1" in metrics:
        which = {"ema": "the EMA weights", "raw": "the raw weights"}.get(best.best if best else "", "the weights")
        kept = f"{which}, kept in the final checkpoint" if cfg.trainer.save_folder else which
        lines.append(f"best top-1 {metrics['metrics/eval_best/top1']:.2%} ({kept})")
    saver = next((c for c in trainer.state.callbacks if isinstance(c, CheckpointSaver)), None)
    if saver is not None and saver.saved_checkpoints:
        lines.append(f"checkpoint: {saver.saved_checkpoints[-1]}")
        lines.append(f"export it: usi-export {command} --out runs/export/{trainer.state.run_name}")
    if "wandb_run_dir" in metrics:
        lines.append(f"W&B run: {metrics['wandb_run_dir']}")
    return lines
