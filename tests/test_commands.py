"""The commands themselves: --help without the heavy libraries, --version, program names, help texts
that show defaults and no reStructuredText, and one vocabulary across the commands, the config and
the README's table."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

from helpers import REPO, make_imagenet
from usi_composer.cli import _common

SCRIPTS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
# What a --help must not import: the libraries that took 12-18 s to import on a loaded machine.
HEAVY = ["torch", "timm", "composer", "streaming", "omegaconf", "PIL", "numpy", "matplotlib", "wandb", "tqdm"]
# A fresh interpreter with argparse and usi_composer's light modules loads about 160 modules; torch alone
# brings hundreds. The bound catches a heavy import that HEAVY does not name.
MAX_MODULES = 300

CHILD = """
import json, sys
sys.argv[0] = {argv0!r}
{load}
for argv in (["--help"], ["--version"]):
    try:
        main(argv)
    except SystemExit:
        pass
print(json.dumps(sorted(sys.modules)))
"""


def _loaded(load: str, argv0: str = "-c") -> tuple[str, list[str]]:
    """The help and version a fresh interpreter prints, and the modules it has loaded by then."""
    code = CHILD.format(argv0=argv0, load=load)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    *text, modules = result.stdout.rstrip("\n").split("\n")
    return "\n".join(text), json.loads(modules)


def _heavy(modules: list[str]) -> list[str]:
    return [m for m in HEAVY if m in modules]


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_and_version_import_no_heavy_library(script: str) -> None:
    module, function = SCRIPTS[script].split(":")
    text, modules = _loaded(f"from {module} import {function} as main")
    assert _heavy(modules) == [] and len(modules) < MAX_MODULES, (_heavy(modules), len(modules))
    assert text.startswith(f"usage: {script} ") and "--version" in text
    assert text.endswith(f"\n{script} {metadata.version('usi-composer')}")


def test_train_py_says_train_py() -> None:
    load = "import runpy\ndef main(argv):\n    sys.argv[1:] = argv\n    runpy.run_path('train.py', run_name='__main__')"
    text, modules = _loaded(load, argv0="train.py")
    assert _heavy(modules) == [] and len(modules) < MAX_MODULES, (_heavy(modules), len(modules))
    assert text.startswith("usage: train.py ") and text.endswith(f"\ntrain.py {metadata.version('usi-composer')}")


def test_the_program_name_follows_how_it_was_run(monkeypatch: pytest.MonkeyPatch) -> None:
    from usi_composer.cli import train

    for argv0, prog in [
        ("/venv/bin/usi-train", "usi-train"),
        ("train.py", "train.py"),
        ("/x/cli/train.py", "train.py"),
    ]:
        monkeypatch.setattr(sys, "argv", [argv0])
        assert train.build_parser().prog == prog


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Each console script's parser (its module's build_parser)."""
    return {name: importlib.import_module(target.split(":")[0]).build_parser() for name, target in SCRIPTS.items()}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions if a.option_strings and a.help is not argparse.SUPPRESS]


def test_help_texts_have_no_restructuredtext_and_every_option_its_help_and_default() -> None:
    assert _common.plain("``usi-demo`` and :func:`~x.y` and :mod:`z`") == "usi-demo and x.y and z"
    missing = []
    for name, parser in _parsers().items():
        text = parser.format_help()
        assert "``" not in text and not re.search(r":[a-z]+:`", text), name
        formatter = parser.formatter_class(parser.prog)
        for action in _options(parser):
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            shown = formatter._get_help_string(action)
            takes_value = action.nargs != 0
            said = action.required or "default" in shown or "(required)" in shown
            if not action.help or (takes_value and not said):
                missing.append(f"{name} {action.option_strings[0]}")
    assert missing == []


# the same thing, one name: option -> the commands that must have it
VOCABULARY = {
    "--out": ["usi-convert-imagenet", "usi-export", "usi-cache-teacher", "usi-ablate", "usi-benchmark-backbones"],
    "--overwrite": ["usi-convert-imagenet", "usi-export", "usi-cache-teacher"],
    "--precision": ["usi-benchmark-backbones"],
    "--workdir": ["usi-demo", "usi-ablate"],
    "--trust-checkpoint": ["usi-export", "usi-eval"],
    "--no-progress": ["usi-train", "usi-eval", "usi-cache-teacher", "usi-demo", "usi-convert-imagenet"],
    "--metrics-out": ["usi-train", "usi-eval"],
    "--config": ["usi-benchmark-backbones"],
    "--seeds": ["usi-demo", "usi-ablate"],
}
# their other spellings, in no command
RETIRED = ["--amp", "--demo-workdir", "--output", "--output-dir", "--force", "--trust", "--no-progress-bar"]


def test_one_name_for_one_thing_in_every_command_and_the_readme() -> None:
    options = {name: {s for a in _options(p) for s in a.option_strings} for name, p in _parsers().items()}
    for option, commands in VOCABULARY.items():
        assert [c for c in commands if option not in options[c]] == [], option
    assert [(c, o) for c, found in options.items() for o in RETIRED if o in found] == []
    (precision,) = [a for a in _options(_parsers()["usi-benchmark-backbones"]) if "--precision" in a.option_strings]
    assert tuple(precision.choices) == _common.PRECISIONS
    readme = (REPO / "README.md").read_text()
    table = readme.split("### Command-line options", 1)[1].split("\n### ", 1)[0]
    rows = {line.split("|")[1].strip().split()[0].strip("`"): line for line in table.splitlines() if "| `--" in line}
    assert sorted(rows) == sorted(VOCABULARY)
    for option, commands in VOCABULARY.items():
        assert all(f"`{c}`" in rows[option] for c in commands), option


def test_the_precisions_are_the_configs() -> None:
    from usi_composer.config import ConfigError, load_config
    from usi_composer.pareto import DEFAULT_METRICS, PRECISION_DTYPES

    assert tuple(PRECISION_DTYPES) == _common.PRECISIONS
    for precision in _common.PRECISIONS:
        assert load_config("yamls/demo.yaml", [f"trainer.precision={precision}"]).trainer.precision == precision
    with pytest.raises(ConfigError):
        load_config("yamls/demo.yaml", ["trainer.precision=bf16"])
    from usi_composer.cli import benchmark

    assert " then ".join(DEFAULT_METRICS) == benchmark.METRICS_HELP


def test_the_converters_output_is_out_and_the_old_positional_says_it_is_deprecated(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from usi_composer.cli.convert import main

    src = make_imagenet(tmp_path / "src", n_classes=2)
    assert main([str(src), "--out", str(tmp_path / "a"), "--no-progress", "--workers", "1"]) == 0
    assert capsys.readouterr().err == ""
    assert main([str(src), str(tmp_path / "b"), "--no-progress", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [err.strip()] and "deprecated" in err and f"--out {tmp_path / 'b'}" in err
    assert (tmp_path / "b" / "train" / "index.json").is_file()
    for argv in ([str(src)], [str(src), str(tmp_path / "c"), "--out", str(tmp_path / "d")]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
