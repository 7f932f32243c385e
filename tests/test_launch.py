"""The cluster templates in launch/ start `train.py yamls/usi.yaml` on N=2 nodes.

Each template is rendered as its scheduler would run it: its own shell command is executed with
the environment that Slurm / the Kubeflow training operator / the MosaicML platform sets on each
node, and a stand-in `composer` on PATH records the arguments it was given. Those arguments must
pass Composer's own launcher parser (with its multi-node checks) and then `train.py ... --print-config`
(our config validation). The PyTorchJob is validated against the training operator's models
(kubeflow-training) and the mcli yaml against mosaicml-cli's RunConfig.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml

from helpers import REPO

LAUNCH = REPO / "launch"
NODES = 2  # N: every template is rendered for two nodes
GPUS_PER_NODE = 8

# Stand-ins for the scheduler's tools. `composer` records argv and cwd (one JSON line per node);
# `srun` runs its command once per node with that node's SLURM_NODEID; `scontrol` lists the hosts.
FAKE_COMPOSER = """#!/bin/sh
exec "$FAKE_PYTHON" -c 'import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd()}) + "\\n")
sys.exit(int(os.environ.get("FAKE_COMPOSER_EXIT", "0")))' "$@"
"""
FAKE_SRUN = """#!/bin/bash
while [[ "$1" == -* ]]; do echo "$1" >> "$SRUN_OPTIONS"; shift; done  # srun's own options
status=0
for ((i = 0; i < SLURM_NNODES; i++)); do
  SLURM_NODEID=$i SLURM_PROCID=$i "$@" || status=$?
done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") for ((i = 0; i < SLURM_NNODES; i++)); do echo "gpu-node-$i"; done ;;
  "requeue "*) echo "$2" >> "$REQUEUED" ;;
  *) exit 1 ;;
esac
"""


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in {"composer": FAKE_COMPOSER, "srun": FAKE_SRUN, "scontrol": FAKE_SCONTROL}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _run_rendered(
    argv: list[str], env: dict[str, str], tmp_path: Path, cwd: Path = REPO
) -> tuple[subprocess.CompletedProcess, list[dict[str, Any]]]:
    """Run a template's command with the scheduler's ``env``; return it and what `composer` was given."""
    record = tmp_path / "composer_calls.jsonl"
    record.unlink(missing_ok=True)
    full_env = {
        "PATH": f"{_fake_bin(tmp_path)}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "FAKE_PYTHON": sys.executable,
        "RECORD": str(record),
        "REQUEUED": str(tmp_path / "requeued"),
        "SRUN_OPTIONS": str(tmp_path / "srun_options"),
        **env,
    }
    done = subprocess.run(argv, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
    return done, calls


def _composer_args(argv: list[str], env: dict[str, str]):
    """Composer's own parsing of a `composer ...` command line, as it runs on a node with ``env``.

    Composer exposes no public parser; ``_parse_args`` is exactly what the `composer` entry point
    runs (argparse, then the env-var defaults and its multi-node checks) without starting anything.
    """
    from composer.cli import launcher

    with mock.patch.object(sys, "argv", ["composer", *argv]), mock.patch.dict(os.environ, env, clear=True):
        return launcher._parse_args()


def _dry_run(script: str, args: list[str], cwd: Path, capsys: pytest.CaptureFixture) -> dict[str, Any]:
    """Run ``script args --print-config`` (our train.py, in this process) and return the resolved config (the
    config and the run plan only: the cluster's data and weights are not here for ``--dry-run`` to check)."""
    capsys.readouterr()
    with mock.patch.object(sys, "argv", [script, *args, "--print-config"]), pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(cwd / script), run_name="__main__")
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, f"{script} {' '.join(args)} --print-config failed: {err}"
    return yaml.safe_load(out)


def _check_nodes(calls: list[dict[str, Any]], node_envs: list[dict[str, str]], capsys: pytest.CaptureFixture) -> list:
    """One composer launcher per node, all agreeing on the rendezvous; each node's training command
    passes `train.py --print-config`. Returns Composer's parsed arguments, node by node."""
    assert len(calls) == NODES, calls
    parsed = [_composer_args(call["argv"], env) for call, env in zip(calls, node_envs, strict=True)]
    for node_rank, (call, args) in enumerate(zip(calls, parsed, strict=True)):
        assert args.nproc == GPUS_PER_NODE
        assert args.world_size == NODES * GPUS_PER_NODE
        assert args.node_rank == node_rank
        assert args.base_rank == node_rank * GPUS_PER_NODE
        assert (args.master_addr, args.master_port) == (parsed[0].master_addr, parsed[0].master_port)
        assert not args.module_mode and not args.command_mode
        assert args.training_script == "train.py"
        assert args.training_script_args[0] == "yamls/usi.yaml"
        cfg = _dry_run(args.training_script, args.training_script_args, Path(call["cwd"]), capsys)
        # What every template promises: streaming across nodes, checkpoints in an object store, autoresume.
        assert cfg["data"]["remote"].startswith("s3://")
        assert cfg["data"]["local"]
        assert cfg["data"]["streaming"]["num_canonical_nodes"] == 8
        assert cfg["trainer"]["save_folder"].startswith("s3://")
        assert cfg["trainer"]["autoresume"] is True
        assert cfg["trainer"]["run_name"] == "usi-resnet50"
    return parsed


# -- Slurm ---------------------------------------------------------------------------------------


def _slurm_env(**extra: str) -> dict[str, str]:
    # What sbatch sets from the #SBATCH lines, for N nodes.
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-node-[0-1]", "SLURM_NNODES": str(NODES)}
    return env | {"SLURM_CPUS_PER_TASK": "64", **extra}


def test_slurm_script_is_valid_bash() -> None:
    done = subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_slurm_starts_one_composer_launcher_per_node(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = (LAUNCH / "slurm.sbatch").read_text()
    lines = text.splitlines()
    assert f"#SBATCH --gpus-per-node={GPUS_PER_NODE}" in lines and f"GPUS_PER_NODE={GPUS_PER_NODE}" in lines
    assert "#SBATCH --requeue" in lines
    done, calls = _run_rendered(["bash", str(LAUNCH / "slurm.sbatch")], _slurm_env(), tmp_path)
    assert done.returncode == 0, done.stderr
    node_envs = [_slurm_env(SLURM_NODEID=str(i)) for i in range(NODES)]
    parsed = _check_nodes(calls, node_envs, capsys)
    assert parsed[0].master_addr == "gpu-node-0"  # the allocation's first host
    # One task per node, with the job's CPUs; one failed node ends every node's task.
    srun_options = (tmp_path / "srun_options").read_text().split()
    assert {"--ntasks-per-node=1", "--cpus-per-task=64", "--kill-on-bad-exit=1"} <= set(srun_options)
    # Each node caches shards in its own folder (safe on a shared filesystem).
    locals_ = {a for call in calls for a in call["argv"] if a.startswith("data.local=")}
    assert locals_ == {f"data.local=/tmp/usi-imagenet/node{i}" for i in range(NODES)}
    assert not (tmp_path / "requeued").exists()


@pytest.mark.parametrize(
    ("exit_code", "restarts", "requeued"), [("1", "0", True), ("1", "3", False), ("2", "0", False)]
)
def test_slurm_requeues_a_failed_run_but_not_a_config_error(
    tmp_path: Path, exit_code: str, restarts: str, requeued: bool
) -> None:
    """A failed run (e.g. a lost node) is requeued, to autoresume, until MAX_RESTARTS (3) is spent;
    a config error (exit 2) would fail the same way again and is not."""
    env = _slurm_env(FAKE_COMPOSER_EXIT=exit_code, SLURM_RESTART_COUNT=restarts)
    done, calls = _run_rendered(["bash", str(LAUNCH / "slurm.sbatch")], env, tmp_path)
    assert len(calls) == NODES  # the script got as far as launching on every node
    assert done.returncode == int(exit_code)  # the job itself still reports the failure
    assert (tmp_path / "requeued").exists() == requeued
    if requeued:
        assert (tmp_path / "requeued").read_text().split() == ["4242"]
    if exit_code == "2":
        assert "a refusal no retry fixes (exit 2" in done.stdout and "not requeued" in done.stdout


# Extra overrides as a user writes them: one with spaces, one with a glob character. Each must reach
# train.py as one argument, unchanged.
EXTRA = ["loggers.wandb.notes=two words *", "trainer.eval_interval=2ep"]


def _assert_extra_args_arrive_whole(calls: list[dict[str, Any]]) -> None:
    for call in calls:
        assert call["argv"][-len(EXTRA) :] == EXTRA, call["argv"]


def test_slurm_passes_extra_args_as_an_array(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = (LAUNCH / "slurm.sbatch").read_text()
    assert "\nEXTRA_ARGS=()\n" in text
    edited = tmp_path / "slurm.sbatch"
    edited.write_text(text.replace("\nEXTRA_ARGS=()\n", f"\nEXTRA_ARGS=({' '.join(map(repr, EXTRA))})\n"))
    done, calls = _run_rendered(["bash", str(edited)], _slurm_env(), tmp_path)
    assert done.returncode == 0, done.stderr
    _assert_extra_args_arrive_whole(calls)
    cfg = _dry_run("train.py", _composer_args(calls[0]["argv"], {}).training_script_args, REPO, capsys)
    assert cfg["loggers"]["wandb"]["notes"] == "two words *"


# -- Kubernetes: the Kubeflow training operator's PyTorchJob ---------------------------------------


def _pytorchjob(nodes: int = NODES) -> dict[str, Any]:
    job = yaml.safe_load((LAUNCH / "pytorchjob.yaml").read_text())
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = nodes - 1  # render for N nodes
    return job


def _key_paths(obj: Any, prefix: str = "") -> set[str]:
    if isinstance(obj, dict):
        return {p for k, v in obj.items() for p in {f"{prefix}.{k}"} | _key_paths(v, f"{prefix}.{k}")}
    if isinstance(obj, list):
        return {p for i, v in enumerate(obj) for p in _key_paths(v, f"{prefix}[{i}]")}
    return set()


def test_pytorchjob_matches_the_training_operator_schema() -> None:
    """Deserialized into kubeflow-training's PyTorchJob models (required fields and enums are checked
    there); a field the models do not know is dropped, so a round trip that loses a key is an error."""
    from kubeflow.training.api_client import ApiClient
    from kubeflow.training.utils.utils import FakeResponse

    manifest = _pytorchjob()
    client = ApiClient()
    job = client.deserialize(FakeResponse(manifest), "KubeflowOrgV1PyTorchJob")
    assert (job.api_version, job.kind) == ("kubeflow.org/v1", "PyTorchJob")
    unknown = _key_paths(manifest) - _key_paths(client.sanitize_for_serialization(job))
    assert not unknown, f"fields the PyTorchJob schema does not have: {sorted(unknown)}"
    specs = job.spec.pytorch_replica_specs
    assert set(specs) == {"Master", "Worker"} and specs["Master"].replicas == 1
    for spec in specs.values():
        (container,) = spec.template.spec.containers
        assert container.name == "pytorch"  # the operator only configures this container
        assert any(p.name == "pytorchjob-port" for p in container.ports)
        env = {e.name: e.value for e in container.env}
        assert str(container.resources.limits["nvidia.com/gpu"]) == env["GPUS_PER_NODE"] == str(GPUS_PER_NODE)
        assert any(m.mount_path == "/dev/shm" for m in container.volume_mounts)
    assert job.spec.run_policy.backoff_limit >= 1


def test_pytorchjob_starts_one_composer_launcher_per_pod(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    job = _pytorchjob()
    specs = job["spec"]["pytorchReplicaSpecs"]
    pods = [("master", i) for i in range(specs["Master"]["replicas"])]
    pods += [("worker", i) for i in range(specs["Worker"]["replicas"])]
    calls, node_envs = [], []
    for rtype, index in pods:
        (container,) = specs[rtype.capitalize()]["template"]["spec"]["containers"]
        (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == "pytorchjob-port"]
        # What the operator sets (pkg/controller.v1/pytorch/envvar.go, master.go): WORLD_SIZE counts
        # pods, RANK is the pod's index with the Master first.
        env = {e["name"]: e["value"] for e in container["env"]}
        env |= {
            "MASTER_ADDR": f"{job['metadata']['name']}-master-0",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(len(pods)),
            "RANK": str(index + (rtype == "worker")),
            "PYTHONUNBUFFERED": "0",
        }
        done, pod_calls = _run_rendered([*container["command"], *container["args"]], env, tmp_path)
        assert done.returncode == 0, done.stderr
        calls += pod_calls
        node_envs.append(env)
    parsed = _check_nodes(calls, node_envs, capsys)
    assert parsed[0].master_addr == "usi-resnet50-master-0"


def _master_container(job: dict[str, Any]) -> dict[str, Any]:
    (container,) = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"]
    return container


def _pod_env(container: dict[str, Any]) -> dict[str, str]:
    env = {e["name"]: e["value"] for e in container["env"]}
    return env | {"MASTER_ADDR": "m", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "0"}


def test_pytorchjob_passes_extra_args_as_a_list(tmp_path: Path) -> None:
    container = _master_container(_pytorchjob())
    assert container["args"] == []
    done, calls = _run_rendered([*container["command"], *EXTRA], _pod_env(container), tmp_path)
    assert done.returncode == 0, done.stderr
    _assert_extra_args_arrive_whole(calls)


@pytest.mark.parametrize(("exit_code", "pod_exit"), [("0", 0), ("2", 2), ("1", 129), ("137", 137)])
def test_pytorchjob_restarts_a_pod_unless_the_config_is_wrong(tmp_path: Path, exit_code: str, pod_exit: int) -> None:
    """restartPolicy ExitCode: the operator restarts a pod for exit codes >= 128 only. A config error
    (2) stays final; any other failure becomes retryable (>= 128), so the pod restarts and autoresumes."""
    job = _pytorchjob()
    assert {s["restartPolicy"] for s in job["spec"]["pytorchReplicaSpecs"].values()} == {"ExitCode"}
    container = _master_container(job)
    env = _pod_env(container) | {"FAKE_COMPOSER_EXIT": exit_code}
    done, _ = _run_rendered(container["command"], env, tmp_path)
    assert done.returncode == pod_exit


# -- MosaicML platform (mcli) ----------------------------------------------------------------------


def _mcli_config(nodes: int = NODES) -> dict[str, Any]:
    config = yaml.safe_load((LAUNCH / "mcli.yaml").read_text())
    config["compute"]["gpus"] = nodes * GPUS_PER_NODE  # render for N nodes
    return config


def test_mcli_yaml_is_a_valid_run_config(tmp_path: Path) -> None:
    """mosaicml-cli's own RunConfig: unknown fields (top level, compute, scheduling) warn, so they fail
    here; finalizing checks the image; the API input translates integrations and scheduling."""
    from mcli import RunConfig
    from mcli.models.run_config import FinalRunConfig

    rendered = tmp_path / "mcli.yaml"
    rendered.write_text(yaml.safe_dump(_mcli_config()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = RunConfig.from_file(rendered)
        final = FinalRunConfig.finalize_config(config)
        run_input = final.to_create_run_api_input()["runInput"]
    assert run_input["compute"]["gpus"] == NODES * GPUS_PER_NODE
    assert run_input["scheduling"]["retryOnSystemFailure"] is True
    assert run_input["scheduling"]["maxRetries"] >= 1
    (repo,) = final.integrations
    assert repo["integration_type"] == "git_repo"


def test_mcli_starts_one_composer_launcher_per_node(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = _mcli_config()
    (repo,) = config["integrations"]
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / repo["git_repo"].rsplit("/", 1)[-1]).symlink_to(REPO)  # where the git_repo integration clones
    gpus = config["compute"]["gpus"]
    calls, node_envs = [], []
    for node_rank in range(gpus // GPUS_PER_NODE):
        # What the platform sets on each node.
        env = {k: str(v) for k, v in config["env_variables"].items()}
        env |= {
            "WORLD_SIZE": str(gpus),
            "LOCAL_WORLD_SIZE": str(GPUS_PER_NODE),
            "NUM_NODES": str(gpus // GPUS_PER_NODE),
            "NODE_RANK": str(node_rank),
            "MASTER_ADDR": "usi-resnet50-abc123-0",
            "MASTER_PORT": "7501",
            "RUN_NAME": "usi-resnet50-abc123",
            "MOSAICML_PLATFORM": "true",
        }
        done, node_calls = _run_rendered(["bash", "-c", config["command"]], env, tmp_path, cwd=workdir)
        assert done.returncode == 0, done.stderr
        calls += node_calls
        node_envs.append(env)
    _check_nodes(calls, node_envs, capsys)


def test_mcli_passes_extra_args_as_an_array(tmp_path: Path) -> None:
    config = _mcli_config()
    assert config["command"].startswith("EXTRA_ARGS=()\n")
    command = config["command"].replace("EXTRA_ARGS=()", f"EXTRA_ARGS=({' '.join(map(repr, EXTRA))})", 1)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "usi-composer").symlink_to(REPO)
    env = {k: str(v) for k, v in config["env_variables"].items()}
    env |= {"WORLD_SIZE": "16", "LOCAL_WORLD_SIZE": "8", "NODE_RANK": "0", "MASTER_ADDR": "m", "MASTER_PORT": "7501"}
    done, calls = _run_rendered(["bash", "-c", command], env, tmp_path, cwd=workdir)
    assert done.returncode == 0, done.stderr
    _assert_extra_args_arrive_whole(calls)
