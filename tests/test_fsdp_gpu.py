"""FSDP (Composer: GPUs only): the teacher is replicated, never sharded, never trained; the EMA
averages each rank's own shard, swaps it in for evaluation and checkpoints it as full tensors.

Runs only where CUDA is available (``make test-gpu``); elsewhere it is reported as skipped. On one
GPU torch's FSDP runs ``NO_SHARD`` whatever the config asks (a world of one has nothing to shard),
so each rank's "shard" is the whole tensor there; uneven shards, some of them empty, are checked on
the CPU with gloo by ``tests/fsdp_ema.py``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from usi_composer.algorithms import BestOfEMAAndRaw, FusedEMA, KnowledgeDistillation
from usi_composer.config import load_config
from usi_composer.data.layout import find_classes
from usi_composer.training import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="Composer's FSDP needs CUDA"),
]

# What composer.utils.dist.initialize_dist writes into os.environ for a single process.
_DIST_ENV = ("NODE_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "RANK", "LOCAL_RANK")


@pytest.fixture
def own_process_group() -> Iterator[None]:
    """Composer initializes a process group (NCCL) for FSDP even for one process and leaves it,
    with its environment variables, to the rest of the session: both are undone afterwards."""
    before = {k: os.environ.get(k) for k in _DIST_ENV}
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_fsdp_leaves_the_teacher_whole_and_frozen_and_averages_shards(
    imagenet_sample: Path, saved_teacher, own_process_group: None
) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    num_classes = len(find_classes(str(imagenet_sample)))  # the whole sample, or the part gpu_check.sh carries
    cfg = load_config(
        "yamls/usi.yaml",
        [
            f"data.train_dir={imagenet_sample}",
            f"data.val_dir={imagenet_sample}",
            f"data.num_classes={num_classes}",
            "data.image_size=64",
            "data.num_workers=0",
            "model.name=resnet18",
            "teacher.name=resnet10t",
            "teacher.pretrained=false",
            f"teacher.checkpoint={saved_teacher('resnet10t', num_classes)}",
            "trainer.global_batch_size=8",
            "trainer.max_duration=2ba",
            "trainer.eval_interval=2ba",  # one evaluation, at the end: the EMA's swap of its shards
            "trainer.eval_subset_num_batches=1",
            "trainer.device=gpu",
            "trainer.compile=false",  # compilation is tests/test_gpu.py's; this is about the storage
            "trainer.progress_bar=false",
            "trainer.fsdp={sharding_strategy: FULL_SHARD}",
        ],
    )
    trainer = train(cfg)
    kd = next(a for a in trainer.state.algorithms if isinstance(a, KnowledgeDistillation))
    wrapped = [m for m in trainer.state.model.modules() if isinstance(m, FullyShardedDataParallel)]
    assert wrapped, "the student is wrapped"
    world = torch.distributed.get_world_size()
    assert wrapped[0].sharding_strategy == (ShardingStrategy.FULL_SHARD if world > 1 else ShardingStrategy.NO_SHARD)
    assert not any(isinstance(m, FullyShardedDataParallel) for m in kd.teacher.modules())
    assert all(p.device.type == "cuda" and not p.requires_grad and p.grad is None for p in kd.teacher.parameters())
    student_params = {id(p) for p in trainer.state.model.parameters()}
    assert not student_params & {id(p) for p in kd.teacher.parameters()}
    assert int(trainer.state.timestamp.batch) == 2

    # Evaluation swapped the EMA's shards in and the raw ones back, and evaluated both
    best = next(c for c in trainer.state.callbacks if isinstance(c, BestOfEMAAndRaw))
    assert set(best.scores["eval"]) == {"ema", "raw"}

    # EMA: shard-local storage, averaged (not the raw weights), finite
    ema = next(a for a in trainer.state.algorithms if isinstance(a, FusedEMA))
    assert ema.ema_started and not ema.ema_weights_active
    live = {**dict(trainer.state.model.named_parameters()), **dict(trainer.state.model.named_buffers())}
    stored = {**ema.ema_model.named_parameters_dict, **ema.ema_model.named_buffers_dict}
    assert stored and stored.keys() <= live.keys()
    assert any("_fsdp_wrapped_module" in name for name in stored), "keyed by the wrapped model's names"
    for name, value in stored.items():
        assert value.shape == live[name].shape and value.device == live[name].device, name  # this rank's shard
        assert not value.is_floating_point() or torch.isfinite(value).all(), name
    floats = [n for n, v in ema.ema_model.named_parameters_dict.items() if v.numel()]
    assert any(not torch.equal(stored[n], live[n]) for n in floats), "the EMA weights differ from the raw ones"

    # checkpoint form: full tensors (gathered), and back to the same shards on load
    full = ema.state_dict()["ema_model"]["named_parameters_dict"]
    with FullyShardedDataParallel.summon_full_params(trainer.state.model, writeback=False):
        shapes = {n: p.shape for n, p in trainer.state.model.named_parameters() if n in full}
    assert {n: t.shape for n, t in full.items()} == shapes
    shards = {n: t.clone() for n, t in ema.ema_model.named_parameters_dict.items()}
    raw = {n: p.detach().clone() for n, p in trainer.state.model.named_parameters()}
    fresh = FusedEMA(half_life=None, smoothing=0.5)
    fresh.load_state_dict(ema.state_dict())
    fresh.ema_model.bind(trainer.state.model)  # scatters
    for name, shard in shards.items():
        assert torch.equal(fresh.ema_model.named_parameters_dict[name], shard), name
    for name, p in trainer.state.model.named_parameters():
        assert torch.equal(p.detach(), raw[name]), f"{name}: loading the EMA leaves the model's weights alone"
    trainer.close()
