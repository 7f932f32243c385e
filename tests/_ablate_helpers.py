"""Shared helpers for the W&B, ablation and Pareto tests: a tiny image folder and the overrides
that make yamls/demo.yaml train for two batches in seconds (the teacher's weights come from
conftest's ``saved_teacher``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from conftest import REPO

DEMO_YAML = REPO / "yamls" / "demo.yaml"
STUDENT = "mobilenetv3_small_050"  # tiny timm models, fixed here so the tests do not follow demo tuning
TEACHER = "resnet10t"
NUM_CLASSES = 4


def tiny_image_folder(root: Path, per_class: int = 4, size: int = 16, seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png``: NUM_CLASSES classes of noise."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for c in range(NUM_CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def tiny_overrides(data_root: Path, teacher: Path) -> list[str]:
    """yamls/demo.yaml's recipe on the tiny folder: two batches of 8, one eval batch, no workers."""
    return [
        f"model.name={STUDENT}",
        f"teacher.name={TEACHER}",
        f"teacher.checkpoint={teacher}",
        "data.local=null",  # demo.yaml streams MDS; these tests use a folder
        f"data.train_dir={data_root / 'train'}",
        f"data.val_dir={data_root / 'val'}",
        f"data.num_classes={NUM_CLASSES}",
        "data.image_size=16",
        "data.num_workers=0",
        "data.persistent_workers=false",
        "trainer.global_batch_size=8",
        "trainer.eval_batch_size=16",
        "trainer.max_duration=2ba",
        "trainer.eval_interval=2ba",
        "trainer.progress_bar=false",
        "trainer.device=cpu",
        "trainer.precision=fp32",
    ]
