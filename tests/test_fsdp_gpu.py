"""FSDP (Composer: GPUs only): the teacher is replicated, never sharded, never trained.

Runs only where CUDA is available; CI machines have none, so it is reported as skipped there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from usi_composer.algorithms import KnowledgeDistillation
from usi_composer.cli.train import train
from usi_composer.config import load_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="Composer's FSDP needs CUDA"),
]


def test_fsdp_leaves_the_teacher_whole_and_frozen(imagenet_sample: Path, saved_teacher) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    cfg = load_config(
        "yamls/usi.yaml",
        [
            f"data.train_dir={imagenet_sample}",
            "data.val_dir=null",
            "data.image_size=64",
            "data.num_workers=0",
            "model.name=resnet18",
            "teacher.name=resnet10t",
            "teacher.pretrained=false",
            f"teacher.checkpoint={saved_teacher()}",
            "trainer.global_batch_size=8",
            "trainer.max_duration=2ba",
            "trainer.device=gpu",
            "trainer.progress_bar=false",
            "trainer.fsdp={sharding_strategy: FULL_SHARD}",
            "algorithms.ema.enabled=false",  # FSDP + EMA: see algorithms/README.md's supported matrix
        ],
    )
    trainer = train(cfg)
    kd = next(a for a in trainer.state.algorithms if isinstance(a, KnowledgeDistillation))
    assert any(isinstance(m, FullyShardedDataParallel) for m in trainer.state.model.modules()), "the student is sharded"
    assert not any(isinstance(m, FullyShardedDataParallel) for m in kd.teacher.modules())
    assert all(p.device.type == "cuda" and not p.requires_grad and p.grad is None for p in kd.teacher.parameters())
    student_params = {id(p) for p in trainer.state.model.parameters()}
    assert not student_params & {id(p) for p in kd.teacher.parameters()}
    assert int(trainer.state.timestamp.batch) == 2
