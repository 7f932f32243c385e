"""Packaging: `algorithms/` ships as `usi_composer.algorithms` (editable and wheel), never as `algorithms`;
the algorithms import nothing from the recipe glue."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO


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


def test_importable_as_usi_composer_algorithms_not_algorithms() -> None:
    code = (
        "import importlib.util, usi_composer.algorithms as a; "
        "from usi_composer.algorithms import KnowledgeDistillation, MixUpCutMix, kd_loss; "
        "assert importlib.util.find_spec('algorithms') is None, 'a top-level algorithms package leaked'; "
        "print(a.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()).parent == REPO / "algorithms"


def test_wheel_maps_algorithms_into_the_package(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("usi_composer-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "usi_composer/algorithms/__init__.py" in names
    assert "usi_composer/algorithms/knowledge_distillation.py" in names
    assert "usi_composer/algorithms/README.md" in names
    assert not any(n.startswith("algorithms/") for n in names)
