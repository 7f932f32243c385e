"""What importing a module pulls in: the data layer takes streaming's patch alone, not the trainer stack."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from helpers import REPO


def _loaded_after(module: str, names: list[str]) -> list[str]:
    """Which of ``names`` are in ``sys.modules`` once a fresh interpreter has imported ``module``."""
    code = f"import json, sys; import {module}; print(json.dumps([n for n in {names!r} if n in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_mds_reader_imports_streamings_patch_alone() -> None:
    stack = ["usi_composer.checkpoints", "usi_composer.config", "usi_composer.patches.trainer"]
    assert _loaded_after("usi_composer.data.mds", [*stack, "usi_composer.patches.streaming_dataset"]) == [
        "usi_composer.patches.streaming_dataset"
    ]


def test_the_registry_imports_no_patched_library_and_no_patch() -> None:
    """``usi_composer.patches`` (PRIVATE_APIS, check_upstream) reads the libraries only when checking them."""
    patches = [f"usi_composer.patches.{m}" for m in ("trainer", "streaming_dataset", "torch_compile", "wandb_logger")]
    assert _loaded_after("usi_composer.patches", ["composer", "streaming", "torch", "wandb", *patches]) == []


def _module_imports() -> dict[str, set[str]]:
    """Each module of usi_composer (algorithms/ as usi_composer.algorithms) -> the modules of it that it
    imports anywhere, functions included, with the packages a submodule's import runs."""
    modules: dict[str, Path] = {}
    for folder, package in (("usi_composer", "usi_composer"), ("algorithms", "usi_composer.algorithms")):
        for path in (REPO / folder).rglob("*.py"):
            parts = [package, *path.relative_to(REPO / folder).with_suffix("").parts]
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                found = [".".join(parts[:i]) for i in range(len(parts), 1, -1) if ".".join(parts[:i]) in modules]
                # the module itself, and the packages above it that are not this module's own
                edges[name].update(m for m in found if m != name and not name.startswith(f"{m}."))
    return edges


def test_no_import_cycle_counting_imports_inside_functions() -> None:
    edges = _module_imports()
    assert "usi_composer.plan" in edges["usi_composer.builders"], "the walk sees imports"
    cycles, done, path = [], set(), []

    def visit(name: str) -> None:
        if name in path:
            cycles.append(" -> ".join([*path[path.index(name) :], name]))
            return
        if name in done:
            return
        path.append(name)
        for target in sorted(edges[name]):
            visit(target)
        path.pop()
        done.add(name)

    for name in sorted(edges):
        visit(name)
    assert cycles == []
