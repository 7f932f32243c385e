"""The wheels the GPU machine lacks, into .whl/: ``make gpu-wheels [PY=3.12]``.

``benchmarks/gpu-machine.txt`` holds what the machine has (read on it, dated), the pinned wheels to
carry and the requirements to skip. This downloads the pinned wheels for the machine's Python (or
``--python``), then walks pyproject.toml's requirements (the project's and its build's: the project is
built there) through each carried wheel's own ``Requires-Dist``, and fails where the walk and the file
disagree: a requirement neither on the machine, carried nor skipped; a pin nothing needs; a pin outside
what a carried package declares. Bounds that the machine's own versions break (streaming's numpy<2.2
against numpy 2.5, ...) are printed, not enforced: the machine installs with ``--no-deps``, and
``make gpu-rehearsal`` checks that they work.

    python benchmarks/gpu_wheels.py [--dest .whl] [--python 3.12]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import Parser
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib
try:
    from packaging.requirements import Requirement
    from packaging.version import Version
except ImportError:  # pip's own copy, wherever pip runs
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
MACHINE_FILE = REPO / "benchmarks" / "gpu-machine.txt"
MIB = 1 << 20
# pip matches platform tags exactly: every manylinux the machine's glibc (2.39, Ubuntu 24.04's) runs
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)] + ["manylinux2014_x86_64", "manylinux1_x86_64"]


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class MachineFile:
    read: str  # the date the machine's list was read
    python: str  # its python3's version
    have: dict[str, str | None]  # canonical name -> version, None where not read
    carry: dict[str, str]  # canonical name -> pinned version
    skip: dict[str, str]  # canonical name -> why


def parse_machine(text: str) -> MachineFile:
    read = re.search(r"^# read: (\d{4}-\d{2}-\d{2})", text, re.M)
    if not read:
        raise ValueError("no '# read: YYYY-MM-DD' line: when was the machine's list read?")
    sections: dict[str, dict[str, tuple[str, str]]] = {"machine": {}, "carry": {}, "skip": {}}
    section = None
    for number, raw in enumerate(text.splitlines(), 1):
        line, _, why = raw.partition("#")
        line, why = line.strip(), why.strip()
        if not line:
            continue
        if re.fullmatch(r"\[\w+\]", line):
            section = line[1:-1]
            if section not in sections:
                raise ValueError(f"line {number}: unknown section {line}")
            continue
        parts = re.split(r"==|\s+", line)
        if section is None or len(parts) != (1 if section == "skip" else 2):
            raise ValueError(
                f"line {number}: {raw!r} is not a [machine] 'name version', [carry] 'name==version' "
                "or [skip] 'name  # why' line"
            )
        if section == "skip" and not why:
            raise ValueError(f"line {number}: [skip] {line} says nothing of why it is not needed")
        sections[section][canonical(parts[0])] = (parts[-1], why)
    machine = {name: None if version == "?" else version for name, (version, _) in sections["machine"].items()}
    python = machine.pop("python", None)
    if python is None:
        raise ValueError("[machine] names no 'python X.Y.Z'")
    for name, (_, why) in sections["carry"].items():
        if name in machine and not why:
            raise ValueError(f"[carry] {name}: the machine has it; say why it is carried all the same")
    carry = {name: version for name, (version, _) in sections["carry"].items()}
    return MachineFile(read[1], python, machine, carry, {name: why for name, (_, why) in sections["skip"].items()})


def marker_environment(python: str) -> dict[str, str]:
    """PEP 508's marker variables on the machine (CPython ``python`` on x86-64 Linux)."""
    return {
        "python_version": ".".join(python.split(".")[:2]),
        "python_full_version": python,
        "implementation_name": "cpython",
        "implementation_version": python,
        "platform_python_implementation": "CPython",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "sys_platform": "linux",
        "os_name": "posix",
    }


@dataclass
class Walk:
    carried: dict[str, str] = field(default_factory=dict)  # reached and carried
    provided: dict[str, str | None] = field(default_factory=dict)  # reached, on the machine
    skipped: dict[str, str] = field(default_factory=dict)  # reached, skipped: why
    conflicts: list[str] = field(default_factory=list)  # bounds the machine's versions break
    errors: list[str] = field(default_factory=list)


def walk(machine: MachineFile, roots: list[str], requires: Callable[[str], list[str]]) -> Walk:
    """Follow ``roots`` (requirement strings) through ``requires(carried name)``, its Requires-Dist."""
    env = marker_environment(machine.python)
    result = Walk()
    walked_extras: dict[str, set[str]] = {}
    queue: list[tuple[str, str, frozenset[str]]] = [(root, "pyproject.toml", frozenset()) for root in roots]
    while queue:
        text, by, by_extras = queue.pop(0)
        req = Requirement(text)
        if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in {"", *by_extras}):
            continue
        name, declared = canonical(req.name), f"{by} declares {req.name}{req.specifier}"
        if name in machine.carry:
            version = machine.carry[name]
            if not req.specifier.contains(version, prereleases=True):
                result.errors.append(f"{declared}, but [carry] pins {name}=={version}")
            new_extras = set(req.extras) - walked_extras.get(name, set())
            if name not in result.carried or new_extras:
                walked_extras.setdefault(name, set()).update(req.extras)
                extras = frozenset(walked_extras[name])
                queue += [(dependency, name, extras) for dependency in requires(name)]
            result.carried[name] = version
        elif name in machine.have:
            version = machine.have[name]
            result.provided[name] = version
            if version and not req.specifier.contains(Version(version), prereleases=True):
                result.conflicts.append(f"{declared}; the machine has {version}")
        elif name in machine.skip:
            result.skipped[name] = machine.skip[name]
        else:
            result.errors.append(
                f"{name} ({declared}) is neither on the machine, carried nor skipped: "
                "add it to [carry] pinned, or to [skip] saying why"
            )
    for name in sorted(machine.carry.keys() - result.carried.keys()):
        result.errors.append(f"[carry] {name}: nothing needs it any more")
    for name in sorted(machine.skip.keys() - result.skipped.keys()):
        result.errors.append(f"[skip] {name}: nothing requires it any more")
    return result


def project_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The project's runtime requirements and its build's (it is built on the machine)."""
    data = tomllib.loads(pyproject.read_text())
    return [*data["project"]["dependencies"], *data["build-system"]["requires"]]


def wheel_key(path: Path) -> tuple[str, Version]:
    name, version = path.name.split("-")[:2]
    return canonical(name), Version(version)


def requires_dist(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        metadata = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        return Parser().parsestr(z.read(metadata).decode()).get_all("Requires-Dist") or []


def download(machine: MachineFile, dest: Path, python: str) -> dict[str, Path]:
    """The pinned wheels in ``dest`` (downloaded where missing; no network when all are there);
    wheels of other versions or packages are removed: two versions of one stop the machine's install."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {(name, Version(version)) for name, version in machine.carry.items()}
    for wheel in sorted(dest.glob("*.whl")):
        if wheel_key(wheel) not in wanted:
            print(f"removing {wheel.name}: not in [carry] of {MACHINE_FILE.name}")
            wheel.unlink()
    present = {wheel_key(wheel) for wheel in dest.glob("*.whl")}
    missing = [
        f"{name}=={version}" for name, version in machine.carry.items() if (name, Version(version)) not in present
    ]
    if missing:
        print(f"downloading {len(missing)} wheel(s) for CPython {python} into {dest}")
        platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
        command += ["--python-version", python, "--implementation", "cp", *platforms, "-d", str(dest), *missing]
        if subprocess.run(command).returncode:
            raise SystemExit(
                f"error: pip could not download {' '.join(missing)} (above): fix the pins in {MACHINE_FILE}"
            )
    return {wheel_key(wheel)[0]: wheel for wheel in dest.glob("*.whl")}


def plan(dest: Path, python: str | None = None, machine_file: Path = MACHINE_FILE) -> tuple[MachineFile, Walk]:
    """Download the wheels and walk the requirements: what is carried, what the machine provides."""
    machine = parse_machine(machine_file.read_text())
    wheels = download(machine, dest, python or ".".join(machine.python.split(".")[:2]))
    return machine, walk(machine, project_requirements(), lambda name: requires_dist(wheels[name]))


def report(machine: MachineFile, result: Walk, dest: Path) -> int:
    print(f"the GPU machine as read on {machine.read}: Python {machine.python}, {len(machine.have)} packages")
    sizes = {wheel_key(wheel)[0]: wheel.stat().st_size for wheel in dest.glob("*.whl")}
    for name, version in sorted(result.carried.items()):
        print(f"  carry {name}=={version}  {sizes.get(name, 0) / MIB:.2f} MiB")
    print(f"{len(result.carried)} wheels in {dest}: {sum(sizes.values()) / MIB:.1f} MiB")
    print(f"used from the machine: {', '.join(sorted(result.provided))}")
    for name, why in sorted(result.skipped.items()):
        print(f"  skip {name}: {why}")
    for conflict in result.conflicts:
        print(f"  declared, not enforced (--no-deps): {conflict}")
    for error in result.errors:
        print(f"error: {error}", file=sys.stderr)
    return 1 if result.errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=REPO / ".whl", help="where the wheels go (default: .whl)")
    parser.add_argument("--python", default=None, help="the machine's Python X.Y (default: gpu-machine.txt's)")
    args = parser.parse_args(argv)
    machine, result = plan(args.dest, args.python)
    return report(machine, result, args.dest)


if __name__ == "__main__":
    sys.exit(main())
