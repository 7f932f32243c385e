"""Nodes simulated on one machine: two Composer launchers (``--node_rank 0`` and ``1``, one process
each, gloo on the CPU) train the demo's digits from MDS shards on a local S3 server (moto).

* two nodes see every sample of an epoch exactly once, with the losses of one process that
  trains the same global batches;
* a run checkpointed mid-epoch resumes on another number of nodes (2 -> 1, 1 -> 2) without
  losing or repeating a sample, and a layout streaming cannot continue is refused before training;
* a killed node ends the job with an error from the survivor, never a hang, and autoresume
  then completes the run.

The runs are deterministic so that they can be compared: no random augmentation, MixUp/CutMix or
EMA (their random draws are per process, so 2 processes cannot draw what 1 draws), no
distillation (it would need a teacher, and adds nothing to what is tested here), and a student
without BatchNorm (``test_nfnet``): DDP keeps BatchNorm statistics per process, so a BN model's
loss legitimately differs between 1 x 16 and 2 x 8 samples. Labels are the sample indices
(tests/streaming_child.py), so every trained sample is identified; hence num_classes = N_SAMPLES.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import REPO, MotoServer, free_port
from usi_composer.data.mds import check_resumable
from usi_composer.errors import SetupError

pytestmark = pytest.mark.timeout(300)

N_SAMPLES, GLOBAL_BATCH, CHECKPOINT_AFTER = 80, 16, 2  # 5 global batches per epoch
RUN_S = 240  # generous limit of one training launch (a hang guard)
BOUND_S = 120  # a lost node must end the job within this (Composer's dist timeout is 300 s)


@pytest.fixture(scope="module")
def bucket(s3: MotoServer, s3_bucket, digits: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """N_SAMPLES of the demo's digits (8 per class) as MDS shards in s3://digits/mds."""
    subset = tmp_path_factory.mktemp("multinode")
    for folder in sorted((digits / "train").iterdir()):
        (subset / "train" / folder.name).mkdir(parents=True)
        for png in sorted(folder.glob("*.png"))[: N_SAMPLES // 10]:
            shutil.copyfile(png, subset / "train" / folder.name / png.name)
    url = s3_bucket(subset, "s3://digits/mds", shard_size="16kb")
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket="digits", Prefix="mds/train/")["Contents"]]
    assert len([k for k in keys if k.endswith(".mds")]) > 2, keys  # several shards to spread over nodes
    return url


@pytest.fixture
def shm_tag() -> Iterator[str]:
    """Prefix of the simulated nodes' shared memory; removed afterwards (killed runs leave it)."""
    tag = f"u{secrets.token_hex(3)}"
    yield tag
    for leftover in Path("/dev/shm").glob(f"{tag}*"):
        leftover.unlink(missing_ok=True)


def _overrides(bucket: str, cache: Path, save_folder: str, *extra: str) -> list[str]:
    return [
        str(REPO / "yamls" / "demo.yaml"),
        f"data.remote={bucket}",
        f"data.local={cache}",
        "data.streaming.val_split=null",
        f"data.num_classes={N_SAMPLES}",
        "model.name=test_nfnet",
        "data.image_size=16",
        "data.scale=[1.0,1.0]",
        "data.ratio=[1.0,1.0]",
        "data.hflip=0.0",
        "data.auto_augment=null",
        "data.pin_memory=false",
        "algorithms.distillation.enabled=false",
        "algorithms.mixup_cutmix.enabled=false",
        "algorithms.ema.enabled=false",
        "algorithms.channels_last=false",
        f"trainer.global_batch_size={GLOBAL_BATCH}",
        "trainer.max_duration=1ep",
        "trainer.progress_bar=false",
        f"trainer.save_folder={save_folder}",
        f"trainer.save_interval={CHECKPOINT_AFTER}ba",
        "trainer.run_name=multinode",
        "trainer.autoresume=true",
        *extra,
    ]


class Job:
    """``nodes`` Composer launchers on 127.0.0.1 (one process each, one node rank each), or a plain
    ``python`` process for one node, each node in its own working directory and process group (it
    is killed whole, as a lost machine). Checkpoints go to a folder the nodes share, as on a
    cluster's shared filesystem; autoresume finds the latest there from any node.
    """

    def __init__(
        self,
        nodes: int,
        work: Path,
        bucket: str,
        record: str,
        *extra: str,
        kill_after: int = 0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.record = work / record
        self.checkpoints = work / "ckpt"  # one run's, shared by its jobs
        (work / "tmp").mkdir(parents=True, exist_ok=True)  # streaming's file locks: gone with the test
        env = {"PYTHONUNBUFFERED": "1", "TMPDIR": str(work / "tmp"), **(env or {})}
        port = free_port()
        self.procs: list[subprocess.Popen] = []
        for node in range(nodes):
            home = work / f"node{node}"
            home.mkdir(exist_ok=True)
            child = [
                str(REPO / "tests" / "streaming_child.py"),
                str(self.record),
                str(kill_after),
                *_overrides(bucket, work / f"cache-node{node}", str(self.checkpoints), *extra),
            ]
            launcher = [
                "-m",
                "composer.cli.launcher",
                "-n",
                "1",
                "--world_size",
                str(nodes),
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
            ]
            with open(work / f"{record}-node{node}.log", "w") as log:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, *(launcher if nodes > 1 else []), *child],
                        cwd=home,
                        env={**os.environ, **env},
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,  # its own process group: killed whole, like a machine
                    )
                )
        self.work, self.name = work, record

    def wait_paused(self, ranks: list[int]) -> None:
        """Until ``ranks`` stopped after batch ``kill_after``, whose checkpoint rank 0 has written."""
        deadline = time.monotonic() + RUN_S
        while not (
            all((self.record / f"paused-rank{r}").exists() for r in ranks)
            and (self.checkpoints / "latest-rank0.pt").exists()
        ):
            assert time.monotonic() < deadline and all(p.poll() is None for p in self.procs), self.logs()
            time.sleep(0.5)

    def wait(self, timeout: float = RUN_S) -> list[int]:
        try:
            return [p.wait(timeout=max(1.0, timeout)) for p in self.procs]
        finally:
            self.kill()

    def kill(self, node: int | None = None) -> None:
        for i, p in enumerate(self.procs):
            if (node is None or i == node) and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=30)

    def logs(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text()[-2500:]}" for p in sorted(self.work.glob(f"{self.name}-*")))

    def batches(self) -> dict[int, list[dict]]:
        """Per global batch number, every rank's record ``{"batch", "loss", "ids"}``."""
        out: dict[int, list[dict]] = {}
        for f in sorted(self.record.glob("rank*.jsonl")):
            for line in f.read_text().splitlines():
                r = json.loads(line)
                out.setdefault(r["batch"], []).append(r)
        return out


def _ids(batches: dict[int, list[dict]]) -> list[int]:
    return [i for records in batches.values() for r in records for i in r["ids"]]


def _assert_ran(job: Job, codes: list[int]) -> None:
    assert codes == [0] * len(codes), job.logs()


@pytest.mark.slow
def test_two_nodes_see_each_sample_once_with_the_losses_of_one_process(
    bucket: str, tmp_path: Path, shm_tag: str
) -> None:
    # num_canonical_nodes=2 for both: the default is the first run's node count (2 vs 1), and
    # it fixes which samples make up each global batch.
    same = ["data.streaming.num_canonical_nodes=2", "trainer.autoresume=false", "trainer.save_folder=null"]
    env = {"CHILD_SHM_TAG": shm_tag}
    two = Job(2, tmp_path / "two", bucket, "rec", *same, env=env)
    _assert_ran(two, two.wait())
    one = Job(1, tmp_path / "one", bucket, "rec", *same, env=env)
    _assert_ran(one, one.wait())

    per_node, single = two.batches(), one.batches()
    assert sorted(per_node) == sorted(single) == list(range(1, N_SAMPLES // GLOBAL_BATCH + 1))
    assert sorted(_ids(per_node)) == list(range(N_SAMPLES)), "a sample was repeated or missed across the nodes"
    for batch, records in per_node.items():
        assert len(records) == 2 and all(len(r["ids"]) == GLOBAL_BATCH // 2 for r in records)
        assert sorted(records[0]["ids"] + records[1]["ids"]) == sorted(single[batch][0]["ids"]), batch
        # DDP averages the gradients of the two halves: the same step as one process on the whole
        # batch, up to the order of the float reductions.
        two_loss = (records[0]["loss"] + records[1]["loss"]) / 2
        assert two_loss == pytest.approx(single[batch][0]["loss"], rel=1e-5, abs=1e-6), batch


@pytest.mark.slow
@pytest.mark.parametrize(("first", "then"), [(2, 1), (1, 2)])
def test_resume_mid_epoch_on_another_number_of_nodes(
    bucket: str, tmp_path: Path, shm_tag: str, first: int, then: int
) -> None:
    env = {"CHILD_SHM_TAG": shm_tag}
    stopped = Job(first, tmp_path, bucket, "first", kill_after=CHECKPOINT_AFTER, env={**env, "CHILD_PAUSE": "1"})
    try:
        stopped.wait_paused(list(range(first)))
    finally:
        stopped.kill()
    before = stopped.batches()
    assert sorted(before) == list(range(1, CHECKPOINT_AFTER + 1)), stopped.logs()
    resumed = Job(then, tmp_path, bucket, "then", env=env)
    _assert_ran(resumed, resumed.wait())
    after = resumed.batches()
    # the run ends where a run on one layout ends: the same batches, the same number of samples
    assert sorted(after) == list(range(CHECKPOINT_AFTER + 1, N_SAMPLES // GLOBAL_BATCH + 1)), resumed.logs()
    assert all(len(records) == then for records in after.values())
    assert sorted(_ids(before) + _ids(after)) == list(range(N_SAMPLES)), "a sample was lost or repeated"


@pytest.mark.parametrize(
    ("ncn", "initial", "nodes", "per_node", "batch"),
    [
        (2, 2, 1, 1, 16),  # 2 -> 1 nodes: direct
        (1, 1, 2, 1, 8),  # 1 -> 2 nodes: direct
        (4, 4, 3, 1, 4),  # 3 does not divide 4: re-sliced from the first layout (12 divides by 4 x 1)
        (4, 4, 3, 2, 2),  # re-slicing needs 12 to divide by 4 x 2: refused
        (3, 3, 2, 3, 2),  # re-slicing needs 12 to divide by 3 x 3: refused
        (4, 4, 3, 2, 1),  # 6 by 4 x 2: refused
        (4, None, 3, 1, 4),  # a state without the first run's node count cannot be re-sliced
    ],
)
def test_refuses_exactly_the_resumes_streaming_cannot_lay_out(
    ncn: int, initial: int | None, nodes: int, per_node: int, batch: int
) -> None:
    from streaming.base.partition import get_partitions

    state = {"epoch": 0, "sample_in_epoch": 2 * nodes * per_node * batch, "num_canonical_nodes": ncn}
    if initial is not None:
        state["initial_physical_nodes"] = initial
    try:  # streaming's own partitioner, as its loader would call it once iteration starts
        get_partitions("relaxed", 96, ncn, nodes, per_node, 1, batch, state["sample_in_epoch"], initial)
        streaming_can = True
    except ValueError:
        streaming_can = False
    if streaming_can:
        check_resumable(state, nodes, per_node, batch)
    else:
        with pytest.raises(SetupError, match=r"set data\.streaming\.num_canonical_nodes") as e:
            check_resumable(state, nodes, per_node, batch)
        assert "\n" not in str(e.value) and f"on {nodes} nodes x {per_node} processes" in str(e.value)


@pytest.mark.slow
def test_the_dataset_refuses_such_a_checkpoint_before_training(bucket: str, tmp_path: Path) -> None:
    from streaming.base.world import World

    from usi_composer.data.mds import streaming_dataloader

    loader = streaming_dataloader(
        remote=bucket,
        local=str(tmp_path / "cache"),
        split="train",
        transform=bytes,
        batch_size=2,
        shuffle=True,
        drop_last=True,
        num_workers=0,
        pin_memory=False,
    )
    dataset = loader.dataset
    state = {"epoch": 0, "sample_in_epoch": 12, "num_canonical_nodes": 3, "shuffle_seed": 0}
    dataset.load_state_dict({**state, "initial_physical_nodes": 3})  # here: 1 node, which divides 3
    # as Composer loads it on 2 nodes x 3 processes: 3 nodes' layout, a global batch of 12 (not by 3 x 3)
    dataset._parallel_rank_world = World(num_nodes=2, ranks_per_node=3, workers_per_rank=1, worker=0)
    with pytest.raises(SetupError, match=r"^cannot resume this checkpoint on 2 nodes x 3 processes: .*=3 over 3 nodes"):
        dataset.load_state_dict({**state, "initial_physical_nodes": 3})


@pytest.mark.slow
def test_lost_node_ends_the_job_then_autoresume_completes_it(bucket: str, tmp_path: Path, shm_tag: str) -> None:
    env = {"CHILD_SHM_TAG": shm_tag}
    # node 1 stops after the checkpoint; node 0 goes on into the next step and waits for it there
    pause_node1 = {**env, "CHILD_PAUSE": "1", "CHILD_PAUSE_RANK": "1"}
    job = Job(2, tmp_path, bucket, "lost", kill_after=CHECKPOINT_AFTER, env=pause_node1)
    try:
        job.wait_paused([1])
        job.kill(node=1)  # SIGKILL of node 1's launcher and its process: a lost machine
        killed_at = time.monotonic()
        code = job.procs[0].wait(timeout=BOUND_S)
        waited = time.monotonic() - killed_at
    finally:
        job.kill()
    print(f"node 0 ended {waited:.1f} s after node 1 was killed")
    assert code != 0 and waited < BOUND_S, job.logs()
    survivor = (tmp_path / "lost-node0.log").read_text()  # its launcher prints the rank's error
    assert "Global rank 0 (PID" in survivor and "exited with code 1" in survivor, survivor[-3000:]
    assert "error: rank 0 lost another process of the job (" in survivor, survivor[-3000:]
    assert "relaunch the same command on every node" in survivor, survivor[-3000:]
    before = job.batches()

    resumed = Job(2, tmp_path, bucket, "again", env=env)
    _assert_ran(resumed, resumed.wait())
    after = resumed.batches()
    # resumed after the checkpoint of batch CHECKPOINT_AFTER; later work of the lost run is redone
    assert sorted(after) == list(range(CHECKPOINT_AFTER + 1, N_SAMPLES // GLOBAL_BATCH + 1)), resumed.logs()
    kept = {b: r for b, r in before.items() if b <= CHECKPOINT_AFTER}
    assert sorted(kept) == list(range(1, CHECKPOINT_AFTER + 1)), job.logs()
    assert sorted(_ids(kept) + _ids(after)) == list(range(N_SAMPLES)), "a sample was lost or repeated"


@pytest.mark.parametrize(
    ("world_size", "error", "expected"),
    [
        (2, RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1967"), True),
        (2, RuntimeError("NCCL error: remote process exited or there was a network error"), True),
        (2, RuntimeError("CUDA out of memory"), False),
        (2, ValueError("Connection closed by peer"), False),  # not a process-group error
        (1, RuntimeError("Connection closed by peer"), False),  # one process has no peer to lose
    ],
)
def test_a_lost_peer_becomes_one_line_saying_how_to_resume(
    monkeypatch: pytest.MonkeyPatch, world_size: int, error: Exception, expected: bool
) -> None:
    from composer.utils import dist

    from usi_composer.config import load_config
    from usi_composer.training import lost_peer

    monkeypatch.setattr(dist, "get_world_size", lambda: world_size)
    cfg = load_config(REPO / "yamls" / "demo.yaml")
    failure = lost_peer(error, cfg)
    assert (failure is not None) == expected
    if expected:
        message = str(failure)
        assert "\n" not in message and message.startswith("rank 0 lost another process of the job (")
        assert "trainer.autoresume=true" in message
