"""Getting a process ready for a run: the plan, the pre-flight, and every process-global side effect in
one place (:func:`setup_process`): upstream patches, warning filters, seeds, cuDNN's autotuner, the
job's process group and the save folder's hygiene."""

from __future__ import annotations

import logging
import warnings

from usi_composer import storage
from usi_composer.config import Config
from usi_composer.plan import RunPlan, resolve
from usi_composer.preflight import preflight

__all__ = ["prepare", "setup_process"]

log = logging.getLogger(__name__)


def prepare(cfg: Config, plan: RunPlan | None = None) -> RunPlan:
    """The run plan of ``cfg`` (resolved here where not given), checked (:func:`~.preflight.preflight`),
    with the process set up (:func:`setup_process`); what the plan changed is said once."""
    plan = plan or resolve(cfg)
    for line in preflight(cfg, plan):
        log.info(line)
    for note in plan.notes:
        log.warning(note)
    setup_process(cfg, plan)
    return plan


def setup_process(cfg: Config, plan: RunPlan) -> None:
    """The side effects a run has on its process, before anything is built."""
    import torch
    from composer.utils import dist, format_name_with_dist, reproducibility

    from usi_composer.checkpoints import set_aside_partial_checkpoints
    from usi_composer.patches.trainer import apply_patches, separate_node_signal_files

    apply_patches()  # first: a Composer its overrides do not fit stops here, before anything is built
    # Composer warns on every batch about things that are expected here: MixUp/CutMix targets
    # sum to 1 only up to float rounding, and the last eval batch is smaller than the others.
    warnings.filterwarnings("ignore", message="Some targets have less than 1 total probability")
    warnings.filterwarnings("ignore", message="Cannot split tensor of length")
    reproducibility.seed_all(cfg.trainer.seed)
    if plan.device == "gpu":  # one input size throughout: let cuDNN pick the fastest kernels (as timm's train.py)
        torch.backends.cudnn.benchmark = True
    if plan.world_size > 1 and not dist.is_initialized():
        # One rendezvous for the run, before the data: a StreamingDataset built before it makes
        # its own process group and destroys it, and the Trainer's rendezvous on the same port
        # then races with that store's teardown (a node fails with "failed to recv, got 0 bytes").
        dist.initialize_dist(plan.device)
        if plan.num_nodes > 1:
            separate_node_signal_files()
    trainer = cfg.trainer
    if trainer.autoresume and not storage.is_remote(
        str(trainer.save_folder)
    ):  # a local folder, where a write may have failed
        if dist.get_global_rank() == 0:
            set_aside_partial_checkpoints(format_name_with_dist(str(trainer.save_folder), trainer.run_name))
        dist.barrier()
