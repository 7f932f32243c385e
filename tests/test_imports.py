"""What importing a module pulls in: the data layer takes streaming's patch alone, not the trainer stack."""

from __future__ import annotations

import json
import subprocess
import sys

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
