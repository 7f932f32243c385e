"""A run resumed from a mid-epoch checkpoint is bit-identical to the uninterrupted run.

Run (a) trains 12 batches, checkpointing every 4; run (b) loads (a)'s batch-8 checkpoint and trains
to batch 12. Random-resized crop, flip, RandAugment and MixUp/CutMix are on, EMA too, with 2 loader
workers (persistent), and the 12 batches cross two epoch boundaries (5 batches per epoch). The
batch-12 checkpoints must be equal: weights, EMA weights, optimizer state (``torch.equal``).
MDS and folders with the CPU pipeline; MDS with ``data.pipeline=gpu`` (run on CPU tensors).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from resumption import differences

from helpers import USI_CPU, run, tiny_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]  # train.py runs in subprocesses

N_SAMPLES, BATCH = 40, 8  # 5 batches per epoch
RUN = [
    *tiny_run(**USI_CPU),
    "algorithms.mixup_cutmix.enabled=true",  # USI_CPU turns it off; its draws must resume too
    "algorithms.ema.enabled=true",
    "algorithms.ema.best_of_raw=false",
    f"data.num_classes={N_SAMPLES // 2}",  # the classes of the data below (checked before step 1)
    "data.num_workers=2",
    "data.persistent_workers=true",
    f"trainer.global_batch_size={BATCH}",
    "trainer.max_duration=12ba",
    "trainer.save_interval=4ba",
    "trainer.seed=11",
]


def _train(tmp_path: Path, name: str, data: list[str], load_path: Path | None = None) -> Path:
    folder = tmp_path / name
    extra = [f"trainer.load_path={load_path}"] if load_path else []
    args = [*RUN, *data, f"trainer.save_folder={folder}", f"trainer.run_name={name}", *extra]
    result = run([sys.executable, "train.py", "yamls/usi.yaml", *args], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder


def _checkpoint(folder: Path, batch: int) -> Path:
    (path,) = folder.glob(f"ep*-ba{batch}-rank0.pt")
    return path


@pytest.mark.parametrize(("source", "pipeline"), [("mds", "cpu"), ("folders", "cpu"), ("mds", "gpu")])
def test_resume_from_mid_epoch_checkpoint_is_bit_identical(
    image_folders, mds_dataset, tmp_path: Path, source: str, pipeline: str
) -> None:
    if source == "mds":
        data = [f"data.local={mds_dataset(N_SAMPLES // 2, 2, '256kb')}", "data.streaming.val_split=null"]
    else:
        data = [f"data.train_dir={image_folders(N_SAMPLES // 2, 2) / 'train'}", "data.val_dir=null"]
    data.append(f"data.pipeline={pipeline}")
    a = _train(tmp_path, "a", data)
    b = _train(tmp_path, "b", data, load_path=_checkpoint(a, 8))
    first, resumed = _checkpoint(a, 12), _checkpoint(b, 12)
    assert first.name.startswith("ep2-"), "the run crosses two epoch boundaries"
    diffs = differences(first, resumed)
    assert diffs == [], diffs
