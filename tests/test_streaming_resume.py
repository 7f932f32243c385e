"""Mid-epoch checkpoint + autoresume continue at the exact sample: one full pass, no sample twice."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from helpers import USI_CPU, free_port, run, tiny_run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]  # killed and relaunched training processes

N_SAMPLES, GLOBAL_BATCH, KILL_AFTER = 48, 8, 2  # 6 batches per epoch, killed after 2


@pytest.fixture(scope="module")
def mds(mds_dataset) -> Path:
    return mds_dataset(N_SAMPLES // 2, per_class=2, shard_size="512kb")


def _seen(record_dir: Path) -> list[int]:
    ids: list[int] = []
    for f in sorted(record_dir.glob("rank*.txt")):
        ids += [int(x) for line in f.read_text().split("\n") for x in line.split()]
    return ids


@pytest.mark.parametrize("world_size", [1, 2])
def test_kill_and_autoresume_sees_every_sample_exactly_once(mds: Path, tmp_path: Path, world_size: int) -> None:
    launcher = [sys.executable, "-m", "composer.cli.launcher", "-n", str(world_size), "--master_port", str(free_port())]
    prefix = launcher if world_size > 1 else [sys.executable]
    overrides = [
        f"data.local={mds}",
        "data.streaming.val_split=null",
        "data.num_workers=1",
        "data.persistent_workers=false",
        f"trainer.global_batch_size={GLOBAL_BATCH}",
        "trainer.max_duration=1ep",
        f"trainer.save_folder={tmp_path / 'ckpt'}",
        f"trainer.save_interval={KILL_AFTER}ba",
        "trainer.run_name=resume-test",
        "trainer.autoresume=true",
        "algorithms.ema.enabled=false",
        *tiny_run(**USI_CPU),
    ]
    child = ["tests/streaming_child.py"]
    first = run([*prefix, *child, str(tmp_path / "first"), str(KILL_AFTER), "yamls/usi.yaml", *overrides], timeout=150)
    assert first.returncode != 0, "the first run should have been killed"
    seen_first = _seen(tmp_path / "first")
    assert len(seen_first) == KILL_AFTER * GLOBAL_BATCH, first.stderr[-2000:]
    second = run([*prefix, *child, str(tmp_path / "second"), "0", "yamls/usi.yaml", *overrides], timeout=150)
    assert second.returncode == 0, second.stderr[-3000:]
    seen_second = _seen(tmp_path / "second")
    assert len(seen_second) == N_SAMPLES - KILL_AFTER * GLOBAL_BATCH
    union = seen_first + seen_second
    assert sorted(union) == list(range(N_SAMPLES)), "a sample was repeated or missed across the restart"
