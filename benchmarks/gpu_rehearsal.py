"""``make gpu-rehearsal``: benchmarks/gpu_check.sh run as the GPU machine runs it, on this machine.

1. the wheels (``make gpu-wheels``) and the packed sample (``gpu_check.sh --pack-sample``);
2. a venv like the machine's python3: its Python (3.12), and gpu-machine.txt's versions of every
   package the checks use from the machine (the registry's newest where the version was not read);
3. the repository copied as the device tool sends it: tracked and untracked-not-ignored files, plus
   the carried ignored paths (``CARRY``); its size is printed and must stay under 64 MiB;
4. in the copy, with the network off (a new network namespace, as well as gpu_check.sh's own
   ``pip --no-index`` and ``HF_HUB_OFFLINE=1``) and none of this machine's settings (no pip config,
   an empty HOME): ``bash benchmarks/gpu_check.sh --rehearse``. Without CUDA each step that needs it
   reports "skipped: no CUDA"; everything else runs for real.

Prints the transfer size and the wall times; exits with gpu_check.sh's status. The logs and
figures land in gpu-check/rehearsal/.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gpu_wheels import MIB, REPO, Walk, plan  # the neighbour: scripts' folder is on sys.path

CARRY = (".whl", ".gpu-data")  # the device tool's `carry`: the git-ignored paths that must travel
LIMIT = 64 * MIB  # what the device tool sends at most
VENV = REPO / ".venv-gpu-rehearsal"
# Packages the machine has but whose versions were not read, and that we carry: the replica takes
# versions that would fail the checks if the carried wheels were not the ones used.
ASSUMED = {
    "timm": "1.0.22",  # the newest without timm.task
    "setuptools": "68.1.2",  # Ubuntu 24.04's; too old to build our pyproject.toml (SPDX license: >= 77)
}
TEST_RUNNER = ("pytest", "pytest-timeout")  # on the machine; the GPU tests need them
# gpu_check.sh's step timeouts are the GPU machine's (16 cores); this project's machines have 2, shared:
# its setup step (imports, an MDS round trip) took 20-50 s here against 35 s planned there
TIMEOUT_SCALE = 4


def find_python(version: str) -> str:
    """A working ``python<version>``: $REHEARSAL_PYTHON, on PATH, or one of pyenv's."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [os.environ.get("REHEARSAL_PYTHON"), f"python{version}"]
    candidates += sorted(glob.glob(f"{pyenv}/versions/{version}.*/bin/python{version}"), reverse=True)
    for candidate in filter(None, candidates):
        try:
            if subprocess.run([candidate, "-c", ""], capture_output=True).returncode == 0:
                return candidate
        except OSError:
            continue
    raise SystemExit(
        f"error: no working Python {version} (the GPU machine's): install one "
        f"(pyenv install {version}) or set REHEARSAL_PYTHON=/path/to/python{version}"
    )


def replica_requirements(machine_have: dict[str, str | None], result: Walk) -> list[str]:
    """What the replica venv installs: each package the walk uses from the machine, at the machine's
    version where it was read, and the carried ones the machine has too, at ``ASSUMED`` versions."""
    have = {name: machine_have[name] for name in result.provided}
    for name in result.carried.keys() & machine_have.keys():
        if name not in ASSUMED:
            raise SystemExit(
                f"error: the machine has {name} and we carry it: add the version the rehearsal "
                "assumes there to ASSUMED in benchmarks/gpu_rehearsal.py"
            )
        have[name] = ASSUMED[name]
    for name in TEST_RUNNER:
        have[name] = machine_have.get(name)
    # a local version label (torch's +cu130) is not on the registry: the public version is
    return sorted(f"{name}=={version.split('+')[0]}" if version else name for name, version in have.items())


def build_venv(python: str, requirements: list[str]) -> Path:
    """The replica venv, (re)installed only when its requirements changed."""
    stamp = VENV / ".rehearsal-requirements"
    wanted = "\n".join(requirements) + "\n"
    if stamp.is_file() and stamp.read_text() == wanted:
        print(f"replica venv {VENV.name}: up to date")
        return VENV / "bin" / "python"
    if not (VENV / "bin" / "python").exists():
        subprocess.run([python, "-m", "venv", str(VENV)], check=True)
    print(f"replica venv {VENV.name}: installing {len(requirements)} packages (torch is a few GB the first time)")
    pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    if subprocess.run([*pip, *requirements]).returncode:
        raise SystemExit("error: the replica venv could not be installed (above)")
    stamp.write_text(wanted)
    return VENV / "bin" / "python"


def travelling_files(repo: Path, carry: tuple[str, ...] = CARRY) -> list[Path]:
    """What the device tool sends, relative to ``repo``: git's tracked and untracked-not-ignored
    files that exist, and every file under the ``carry`` paths."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\0")
    files = {Path(p) for p in listed if p and (repo / p).is_file()}
    for path in carry:
        files |= {p.relative_to(repo) for p in (repo / path).rglob("*") if p.is_file() or p.is_symlink()}
    return sorted(files)


def transfer_size(repo: Path, files: list[Path], carry: tuple[str, ...] = CARRY) -> dict[str, int]:
    """Bytes per part: ``repository`` (git's files) and each carried path."""
    sizes = dict.fromkeys(["repository", *carry], 0)
    for f in files:
        part = next((c for c in carry if f.parts[0] == c), "repository")
        sizes[part] += (repo / f).lstat().st_size
    return sizes


def offline() -> list[str]:
    """A command prefix that runs without network, as on the GPU machine: a new network namespace
    with only the loopback. Where one cannot be made, the run relies on gpu_check.sh's own settings."""
    if subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0:
        print("network: off (a network namespace of its own, loopback only)")
        return ["unshare", "--net", "sh", "-c", 'ip link set lo up 2>/dev/null; exec "$@"', "sh"]
    print(
        "warning: no network namespace (unshare --net failed): only pip --no-index and HF_HUB_OFFLINE=1 "
        "keep the run off the network"
    )
    return []


def rehearse(copy: Path, venv_python: Path, out: Path, work: Path) -> int:
    home = work / "home"
    home.mkdir()
    env = {
        "PATH": f"{venv_python.parent}:/usr/local/bin:/usr/bin:/bin",  # python3 is the replica's, as there
        "HOME": str(home),
        "OUT": str(out),
        "LANG": "C.UTF-8",
        "PIP_CONFIG_FILE": os.devnull,  # none of this machine's pip settings (index, find-links, constraints)
        "HF_HOME": str(home / "hf"),  # an empty hub cache, as there
        "TIMEOUT_SCALE": str(TIMEOUT_SCALE),
        **{k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")},  # this CPU's OpenBLAS fix
    }
    command = [*offline(), "bash", "benchmarks/gpu_check.sh", "--rehearse"]
    return subprocess.run(command, cwd=copy, env=env).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "gpu-check" / "rehearsal", help="logs and figures")
    parser.add_argument("--python", default=None, help="the machine's Python X.Y (default: gpu-machine.txt's)")
    args = parser.parse_args(argv)
    started = time.monotonic()

    machine, result = plan(REPO / ".whl", args.python)
    if result.errors:
        raise SystemExit("error: " + "\n".join(result.errors) + "\n(make gpu-wheels says more)")
    if not (REPO / ".gpu-data").is_dir():
        subprocess.run(["bash", "benchmarks/gpu_check.sh", "--pack-sample"], cwd=REPO, check=True)
    python = find_python(args.python or ".".join(machine.python.split(".")[:2]))
    venv_python = build_venv(python, replica_requirements(machine.have, result))

    files = travelling_files(REPO)
    sizes = transfer_size(REPO, files)
    total = sum(sizes.values())
    parts = ", ".join(f"{name} {size / MIB:.1f}" for name, size in sizes.items())
    print(f"transfer: {len(files)} files, {total / MIB:.1f} MiB of {LIMIT // MIB} ({parts}); carry: {list(CARRY)}")
    if total >= LIMIT:
        raise SystemExit(f"error: the transfer is {total / MIB:.1f} MiB, over the device tool's {LIMIT // MIB} MiB")

    tag = hashlib.sha1(str(REPO).encode()).hexdigest()[:8]  # one per checkout: others may rehearse at once
    with tempfile.TemporaryDirectory(prefix=f"usi-gpu-rehearsal-{tag}-") as tmp:
        work = Path(tmp)
        for f in files:
            (work / "repo" / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, work / "repo" / f, follow_symlinks=False)
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        print(f"rehearsing in {work / 'repo'}, python3 = {venv_python}, network off")
        run_started = time.monotonic()
        rc = rehearse(work / "repo", venv_python, args.out, work)
        run_s = time.monotonic() - run_started
    print(
        f"rehearsal: gpu_check.sh --rehearse exited {rc} after {run_s:.0f} s (on the GPU machine: at most 480 s); "
        f"whole rehearsal {time.monotonic() - started:.0f} s; transfer {total / MIB:.1f} MiB; logs in {args.out}"
    )
    return rc


if __name__ == "__main__":
    sys.exit(main())
