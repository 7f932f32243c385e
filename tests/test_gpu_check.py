"""benchmarks/gpu_check.sh and ``make test-gpu`` where there is no GPU: the plan (--dry-run), the
summary of a run that cannot start, a rehearsal's, and every GPU test collected and skipped with its
reason; the wheels the GPU machine gets (gpu_wheels.py) and the rehearsal's parts (gpu_rehearsal.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from helpers import REPO, run

sys.path.insert(0, str(REPO / "benchmarks"))  # the scripts' folder: they import each other so
import gpu_rehearsal
import gpu_wheels

slow = pytest.mark.slow  # each starts pytest or the script in a subprocess

SCRIPT = "benchmarks/gpu_check.sh"
STEPS = ("setup", "tests", "train_step_profile", "train_step", "dataloader_gpu")
CUDA_STEPS = STEPS[2:]
BUDGET_S = 480  # at most 8 minutes on one H100/H200
SCALED = {"TIMEOUT_SCALE": str(gpu_rehearsal.TIMEOUT_SCALE)}  # the GPU machine's timeouts, on 2 shared cores


def _gpu_tests_in(*paths: str) -> list[str]:
    """The ids of the tests marked gpu that pytest collects from ``paths``."""
    pytest_args = ["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *paths]
    result = run([sys.executable, "-m", "pytest", *pytest_args])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


@slow
def test_dry_run_prints_the_plan_and_checks_what_needs_no_gpu(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run(["bash", SCRIPT, "--dry-run"], env={"PYTHON": sys.executable, "OUT": str(out)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    text = result.stdout
    plan = dict(re.findall(r"^  (\w+) +timeout +(\d+)s  ", text, re.M))
    assert tuple(plan) == STEPS
    assert sum(int(t) for t in plan.values()) == int(re.search(r"total of the timeouts: (\d+)s", text)[1]) <= BUDGET_S
    for command in (
        "test-gpu TEST_PYTHON=" if shutil.which("make") else "-m pytest -m gpu -rA",
        "benchmarks/train_step.py --profile --batch-size 32 --steps 3 --warmup 2 --set trainer.progress_bar=false",
        "benchmarks/train_step.py --runs 1 --steps 20 --warmup 8 --set trainer.progress_bar=false",
        "benchmarks/dataloader.py --pipeline gpu --src ",
    ):
        assert command in text, command
    assert "resnet50 / tresnet_v2_l, 224 px, batch 256" in text, "the sizes are stated"
    assert "ok: bash -n" in text and "FAILED" not in text and text.rstrip().endswith("dry run: ok")
    # what it collects is every GPU test of the suite: none lives outside the files make test-gpu names
    collected = re.search(r"^collect: (\d+)/\d+ tests collected", text, re.M)
    assert collected and int(collected[1]) == len(_gpu_tests_in("tests")) > 10
    assert not out.exists(), "a dry run writes nothing"


@slow
def test_dry_run_fails_without_the_sample(tmp_path: Path) -> None:
    env = {"PYTHON": sys.executable, "USI_IMAGENET_SAMPLE": str(tmp_path / "missing")}
    result = run(["bash", SCRIPT, "--dry-run"], env=env)
    assert result.returncode == 1
    assert "FAILED: the sample is there (0 images)" in result.stdout
    assert "dry run: FAILED" in result.stderr


@slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs everything (minutes)")
def test_a_run_without_cuda_stops_after_setup_with_a_summary(tmp_path: Path) -> None:
    env = {"PYTHON": sys.executable, "OUT": str(tmp_path), "WHEELS": str(tmp_path / "none"), **SCALED}
    result = run(["bash", SCRIPT], env=env)
    assert result.returncode == 1
    summary = (tmp_path / "summary.txt").read_text()
    assert summary.startswith("==== gpu_check summary on no CUDA device")
    assert re.search(r"^setup: failed \(exit 1\)", summary, re.M)
    assert all(f"{name}: skipped (setup failed)" in summary for name in STEPS[1:])
    assert "error: no CUDA device here" in (tmp_path / "setup.log").read_text()
    report = json.loads((tmp_path / "figures.json").read_text())
    assert report["device"] == "no CUDA device" and list(report["steps"]) == list(STEPS)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{name}.log" for name in STEPS] + ["summary.txt", "figures.json"]
    ), "what the device tool brings back: at most 8 files"


@slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU make test-gpu runs the GPU tests themselves")
def test_make_test_gpu_skips_every_gpu_test_with_its_reason_without_cuda() -> None:
    if shutil.which("make"):
        result = run(["make", "-s", "test-gpu", f"TEST_PYTHON={sys.executable}"])
    else:
        files = sorted(f"tests/{p.name}" for p in (REPO / "tests").glob("test_*gpu*.py"))  # as the Makefile
        result = run([sys.executable, "-m", "pytest", "-m", "gpu", "-rA", *files])
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    skipped = re.findall(r"^SKIPPED \[(\d+)\] (\S+): (.+)$", output, re.M)
    assert sum(int(n) for n, _, _ in skipped) == len(_gpu_tests_in("tests")) > 10
    assert all("CUDA" in reason for _, _, reason in skipped), skipped
    final = output.strip().splitlines()[-1]
    assert re.fullmatch(r"=+ \d+ skipped, \d+ deselected in [\d.]+s =+", final), final


@slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU --rehearse runs everything (minutes)")
def test_a_rehearsal_without_cuda_runs_what_needs_none_and_skips_the_rest(tmp_path: Path) -> None:
    # this venv's packages, not the GPU machine's wheels a developer may have in .whl/
    env = {"PYTHON": sys.executable, "OUT": str(tmp_path), "WHEELS": str(tmp_path / "none"), **SCALED}
    result = run(["bash", SCRIPT, "--rehearse"], env=env)
    summary = (tmp_path / "summary.txt").read_text()
    assert result.returncode == 0, summary + (tmp_path / "setup.log").read_text()[-2000:]
    assert re.search(r"^setup: passed in \d+s$", summary, re.M) and re.search(r"^tests: passed in \d+s$", summary, re.M)
    assert re.search(r"^  mds: 16 images written and read back unchanged with numpy ", summary, re.M)
    assert re.search(r"^  tests: \d+ skipped, \d+ deselected", summary, re.M), "the GPU tests ran, and skipped"
    for step in CUDA_STEPS:
        assert f"\n{step}: skipped: no CUDA\n" in summary
        assert (tmp_path / f"{step}.log").read_text() == "skipped: no CUDA\n", "and nothing else"
    assert "no figures" not in summary
    report = json.loads((tmp_path / "figures.json").read_text())
    assert report["figures"] == {} and report["steps"]["train_step"] == "skipped: no CUDA"


def test_the_machine_file_accounts_for_every_requirement_of_the_project() -> None:
    machine = gpu_wheels.parse_machine(gpu_wheels.MACHINE_FILE.read_text())
    assert re.fullmatch(r"20\d\d-\d\d-\d\d", machine.read) and machine.python.startswith("3.12.")
    assert machine.have["torch"].startswith("2.11.") and machine.have["numpy"].startswith("2.5.")
    for text in gpu_wheels.project_requirements():
        req = Requirement(text)
        name = gpu_wheels.canonical(req.name)
        assert name in {**machine.have, **machine.carry, **machine.skip}, f"{name}: not in {gpu_wheels.MACHINE_FILE}"
        if name in machine.carry:  # a pin our own bounds refuse would not be what the lanes test
            assert req.specifier.contains(machine.carry[name]), (name, machine.carry[name], text)
    # the carried packages the machine has too are those whose version the rehearsal assumes there
    assert machine.carry.keys() & machine.have.keys() == gpu_rehearsal.ASSUMED.keys()


def _machine(**sections: str) -> gpu_wheels.MachineFile:
    text = "# read: 2026-11-17\n" + "".join(f"[{name}]\n{body}\n" for name, body in sections.items())
    return gpu_wheels.parse_machine(text)


def test_the_walk_carries_what_the_machine_lacks_and_says_what_the_file_gets_wrong() -> None:
    machine = _machine(
        machine="python 3.12.3\nnumpy 2.5.2\ntorch 2.11.0+cu130\nrich ?",
        carry="app==1.0\nlib==2.0\nws==11.0\nunused==1.0",
        skip="cloud  # a remote we never read",
    )
    requires = {
        "app": ["lib>=2", "numpy<2.2", "cloud>=1", "gql-like; python_version < '3.11'", "rich"],
        "lib": ["torch>=2.7", "ws; extra == 'websockets'", "mystery>=1", "lib-dev; extra == 'dev'"],
        "ws": [],
    }
    calls: list[str] = []
    roots = ["app==1.0", "lib[websockets]>=2.1"]
    result = gpu_wheels.walk(machine, roots, lambda name: calls.append(name) or requires[name])
    assert result.carried == {"app": "1.0", "lib": "2.0", "ws": "11.0"}
    assert result.provided == {"numpy": "2.5.2", "torch": "2.11.0+cu130", "rich": None}
    assert result.skipped == {"cloud": "a remote we never read"}
    assert result.conflicts == ["app declares numpy<2.2; the machine has 2.5.2"]
    assert result.errors == [
        "pyproject.toml declares lib>=2.1, but [carry] pins lib==2.0",
        "mystery (lib declares mystery>=1) is neither on the machine, carried nor skipped: "
        "add it to [carry] pinned, or to [skip] saying why",
        "[carry] unused: nothing needs it any more",
    ]
    assert calls.count("lib") == 1, "a package's requirements are read once, with every extra asked of it"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[skip]\nwandb\n", "says nothing of why"),
        ("[machine]\npython 3.12.3\ntimm ?\n[carry]\ntimm==1.0.31\n", "say why it is carried"),
        ("[machine]\ntorch 2.11.0\n", "no 'python X.Y.Z'"),
        ("[carry]\ntimm>=1\n", "is not a [machine]"),
    ],
)
def test_the_machine_file_refuses_what_it_cannot_stand_behind(body: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        gpu_wheels.parse_machine("# read: 2026-11-17\n" + body)


def test_what_travels_is_what_git_would_keep_plus_the_carried_paths(tmp_path: Path) -> None:
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    files = {"kept.py": 10, "new.txt": 20, "ignored.log": 40, ".whl/a.whl": 300, ".gpu-data/s/1.JPEG": 5}
    for name, size in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    (tmp_path / ".gitignore").write_text("*.log\n.whl/\n.gpu-data/\n")
    git("add", "kept.py", ".gitignore")
    travelling = gpu_rehearsal.travelling_files(tmp_path)
    assert [str(p) for p in travelling] == [".gitignore", ".gpu-data/s/1.JPEG", ".whl/a.whl", "kept.py", "new.txt"]
    sizes = gpu_rehearsal.transfer_size(tmp_path, travelling)
    assert sizes == {"repository": 10 + 20 + len("*.log\n.whl/\n.gpu-data/\n"), ".whl": 300, ".gpu-data": 5}


def test_the_replica_installs_the_machines_versions_and_assumes_old_ones_for_what_we_carry() -> None:
    have = {"torch": "2.11.0+cu130", "scipy": None, "timm": None, "pytest": None, "pytest-timeout": None}
    result = gpu_wheels.Walk(
        carried={"timm": "1.0.31", "mosaicml": "0.32.1"}, provided={"torch": "2.11.0+cu130", "scipy": None}
    )
    assert gpu_rehearsal.replica_requirements(have, result) == [
        "pytest",
        "pytest-timeout",
        "scipy",
        f"timm=={gpu_rehearsal.ASSUMED['timm']}",
        "torch==2.11.0",
    ]
    with pytest.raises(SystemExit, match="ASSUMED"):
        gpu_rehearsal.replica_requirements({**have, "mosaicml": None}, result)
