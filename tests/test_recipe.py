"""yamls/usi.yaml end to end, shrunk by overrides only: four backbone families, and DDP over gloo."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from composer.loggers import InMemoryLogger

from helpers import launch
from usi_composer.config import load_config
from usi_composer.training import train


def shrink(data: Path, teacher: Path, *extra: str) -> list[str]:
    """Overrides that turn the ImageNet recipe into a seconds-long CPU run on the real JPEG sample."""
    return [
        f"data.train_dir={data}",
        "data.val_dir=null",
        "data.image_size=32",
        "data.num_workers=0",
        "teacher.name=resnet10t",
        "teacher.pretrained=false",
        f"teacher.checkpoint={teacher}",
        "trainer.global_batch_size=4",
        "trainer.max_duration=2ba",
        "trainer.progress_bar=false",
        *extra,
    ]


FAMILIES = {
    "cnn": ["model.name=resnet18"],
    "vision-transformer": ["model.name=deit_tiny_patch16_224"],  # built for data.image_size (32)
    "mobile": ["model.name=mobilenetv3_small_050"],
    "mlp-only": ["model.name=mixer_s16_224"],
}


@pytest.mark.parametrize("family", FAMILIES)
def test_usi_yaml_trains_every_backbone_family(family: str, imagenet_sample: Path, saved_teacher) -> None:
    cfg = load_config("yamls/usi.yaml", shrink(imagenet_sample, saved_teacher(), *FAMILIES[family]))
    logger = InMemoryLogger()
    trainer = train(cfg, loggers=[logger])
    assert int(trainer.state.timestamp.batch) == 2
    names = [type(a).__name__ for a in trainer.state.algorithms]
    assert names == ["MixUpCutMix", "KnowledgeDistillation", "FusedEMA", "ChannelsLast"]
    totals = [float(v) for _, v in logger.data["loss/train/total"]]  # Composer's, every batch
    assert len(totals) == 2 and all(math.isfinite(v) for v in totals)
    # KnowledgeDistillation's means over the batches since its last read (here: the 2 batches)
    (ce,), (kd,) = ([float(v) for _, v in logger.data[f"loss/train/{k}"]] for k in ("ce", "kd"))
    assert sum(totals) / 2 == pytest.approx(ce + 5.0 * kd, rel=1e-4)
    trainer.close()


@pytest.mark.slow
def test_composer_launcher_ddp_on_cpu(imagenet_sample: Path, saved_teacher, tmp_path: Path) -> None:
    save = tmp_path / "ckpt"
    overrides = shrink(
        imagenet_sample,
        saved_teacher(),
        "model.name=resnet10t",
        f"trainer.save_folder={save}",
        "trainer.save_interval=2ba",
        "trainer.run_name=ddp",
    )
    result, logs = launch(2, tmp_path, "train.py", "yamls/usi.yaml", *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + logs
    checkpoint = torch.load(save / "ep0-ba2-rank0.pt", map_location="cpu", weights_only=False)
    timestamp = checkpoint["state"]["timestamp"]["Timestamp"]
    assert (timestamp["batch"], timestamp["sample"]) == (2, 8), "2 batches of 2 samples on each of 2 ranks"
    assert len(checkpoint["rng"]) == 2, "both ranks took part"
    kd_state = dict(checkpoint["state"]["algorithms"])["KnowledgeDistillation"]
    assert kd_state == {
        "repr": "KnowledgeDistillation(teacher=teacher, alpha=5.0, temperature=1.0, ce_weight=1.0, log_interval=100)",
        **{"alpha": 5.0, "temperature": 1.0, "ce_weight": 1.0, "log_interval": 100},
    }, "the hyper-parameters as values, not the teacher"
