"""Packaging: `algorithms/` ships as `usi_composer.algorithms` (editable and wheel), never as `algorithms`;
the algorithms import nothing from the recipe glue; pyproject.toml, ruff and the Makefile agree on the
supported Pythons, and `make` picks the newest that runs."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (a dev dependency there)
    import tomli as tomllib

SUPPORTED = ["3.10", "3.11", "3.12", "3.13"]


def test_algorithms_import_only_torch_composer_timm() -> None:
    allowed = {
        "torch",
        "composer",
        "timm",
        "__future__",
        "typing",
        "collections",
        "dataclasses",
        "math",
        "logging",
        "copy",
        "warnings",
        "types",
        "numpy",
    }
    for path in (REPO / "algorithms").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside the algorithms package
                    continue
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"


@pytest.mark.slow
def test_importable_as_usi_composer_algorithms_not_algorithms() -> None:
    code = (
        "import importlib.util, usi_composer.algorithms as a; "
        "from usi_composer.algorithms import KnowledgeDistillation, MixUpCutMix, kd_loss; "
        "assert importlib.util.find_spec('algorithms') is None, 'a top-level algorithms package leaked'; "
        "print(a.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).parent == REPO / "algorithms"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (built,) = out.glob("usi_composer-*.whl")
    return built


@pytest.mark.slow
def test_wheel_maps_algorithms_and_yamls_into_the_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "usi_composer/algorithms/__init__.py" in names
    assert "usi_composer/algorithms/knowledge_distillation.py" in names
    assert "usi_composer/algorithms/README.md" in names
    assert not any(n.startswith(("algorithms/", "yamls/")) for n in names)
    shipped = {n.removeprefix("usi_composer/yamls/") for n in names if n.startswith("usi_composer/yamls/")}
    in_repo = {str(p.relative_to(REPO / "yamls")) for p in (REPO / "yamls").rglob("*.yaml")}
    assert in_repo <= shipped and {"usi.yaml", "demo.yaml", "demo_teacher.yaml", "sweeps/temperature.yaml"} <= shipped


@pytest.mark.slow
def test_the_installed_wheel_runs_without_a_checkout(wheel: Path, tmp_path: Path) -> None:
    """The wheel installed non-editable into a fresh venv (which reuses this environment's packages,
    so torch is not installed again); from an empty directory: the console scripts, the packaged
    usi.yaml, and the demo for one batch."""
    import sysconfig

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next(venv.glob("lib/python*/site-packages"))
    # This environment's packages, as a plain path entry: its .pth files (our editable install) are not run.
    (site / "test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    bin_dir = venv / "bin"
    subprocess.run(
        [bin_dir / "python", "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*cmd: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [str(c) for c in cmd], cwd=empty, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done

    where = run(
        bin_dir / "python",
        "-c",
        "import usi_composer.config as c, usi_composer.algorithms as a; print(c.__file__, a.__file__)",
    )
    assert all(Path(f).is_relative_to(site) for f in where.stdout.split()), where.stdout  # the wheel's, not the repo's
    assert "--batches" in run(bin_dir / "usi-demo", "--help").stdout
    for name in ("usi.yaml", "yamls/usi.yaml"):
        dry = run(bin_dir / "usi-train", name, "model.name=resnet18", "--print-config")
        assert "teacher:\n  name: tresnet_v2_l.miil_in21k_ft_in1k" in dry.stdout and "\n# lr: 0.002\n" in dry.stdout
    demo = run(bin_dir / "usi-demo", "--workdir", empty / "demo", "--batches", "1", "--seeds", "0", timeout=600)
    assert "3/3 student + USI distillation, seed 0: 1 batch in" in demo.stdout, demo.stdout
    assert "KD gain (USI - baseline, paired by seed)" in demo.stdout
    assert sorted(p.name for p in empty.iterdir()) == ["demo"]  # nothing written outside the workdir


def test_supported_pythons_agree() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["requires-python"] == f">={SUPPORTED[0]},<3.{int(SUPPORTED[-1].split('.')[1]) + 1}"
    classified = [c.rsplit(" :: ", 1)[1] for c in project["project"]["classifiers"] if re.search(r":: 3\.\d+$", c)]
    assert classified == SUPPORTED
    assert project["tool"]["ruff"]["target-version"] == "py" + SUPPORTED[0].replace(".", "")
    assert project["project"]["license"] == "Apache-2.0"  # SPDX string, not the deprecated table
    (tried,) = re.findall(r"^PYTHONS := (.*)$", (REPO / "Makefile").read_text(), re.MULTILINE)
    assert tried.split() == [f"python{v}" for v in reversed(SUPPORTED)]  # newest first
    assert sys.version_info[:2] in {tuple(map(int, v.split("."))) for v in SUPPORTED}


def _stub(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _make(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`make` in the repo with tmp_path/bin (stub interpreters) first on PATH."""
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    env.pop("PYTHON", None)
    env.pop("MAKEFLAGS", None)
    return subprocess.run(["make", "--no-print-directory", *args], cwd=REPO, env=env, capture_output=True, text=True)


@pytest.mark.parametrize(
    ("runs", "chosen"),
    [({"3.10", "3.11", "3.12", "3.13"}, "python3.13"), ({"3.11", "3.12"}, "python3.12"), ({"3.10"}, "python3.10")],
)
def test_make_picks_the_newest_python_that_runs(tmp_path: Path, runs: set[str], chosen: str) -> None:
    (tmp_path / "bin").mkdir()
    for v in SUPPORTED:  # the others fail the way a pyenv shim of an unselected version does
        _stub(tmp_path / "bin" / f"python{v}", f'exec {sys.executable} "$@"' if v in runs else "exit 127")
    show = "show: ; @echo $(PYTHON)"
    assert _make(tmp_path, "--eval", show, "show").stdout.strip() == chosen
    assert _make(tmp_path, "--eval", show, "show", "PYTHON=/opt/py/bin/python3").stdout.strip() == "/opt/py/bin/python3"


def test_make_without_a_supported_python_says_so_and_creates_nothing(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    for v in SUPPORTED:
        _stub(tmp_path / "bin" / f"python{v}", "exit 127")
    out = _make(tmp_path, "setup", f"VENV={tmp_path / 'venv'}")
    assert out.returncode != 0
    assert "no Python 3.10-3.13 found on PATH" in out.stderr
    assert not (tmp_path / "venv").exists()


def test_make_refuses_a_python_other_than_the_venvs(tmp_path: Path) -> None:
    """`make test PYTHON=python3.13` on a 3.12 venv stops, rather than testing 3.12 under 3.13's name."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    _stub(tmp_path / "venv" / "bin" / "python", "echo 3.12")
    _stub(tmp_path / "bin" / "python3.13", "echo 3.13")
    out = _make(tmp_path, "setup", "PYTHON=python3.13", f"VENV={tmp_path / 'venv'}")
    assert out.returncode != 0
    assert "has Python 3.12, not python3.13" in out.stderr
    assert not (tmp_path / "venv" / ".installed").exists()
