"""What the recipe's commands share (this module is no command): their parser (program name,
``--version``, help that shows defaults), the config and checkpoint arguments, and how a user-facing
error becomes one line and an exit code.

Imports nothing heavy: every command's ``--help`` and ``--version`` answer before torch, timm,
Composer or omegaconf are imported (``tests/test_commands.py`` counts them)."""

from __future__ import annotations

import argparse
import os
import re
import sys

from usi_composer.errors import UnsafeCheckpointError, UsiError, error_line

__all__ = [
    "PRECISIONS",
    "add_checkpoint_options",
    "add_no_progress",
    "config_parser",
    "fail",
    "new_parser",
    "plain",
    "program",
    "seed_list",
    "version",
]

DISTRIBUTION = "usi-composer"
# trainer.precision's values that a command measuring speed takes too (--precision)
PRECISIONS = ("fp32", "amp_fp16", "amp_bf16")


def version() -> str:
    """The installed distribution's version (a checkout that is not installed says so)."""
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def program(entry: str, script: str | None = None) -> str:
    """The name a command's usage line shows: ``script`` (e.g. ``train.py``) where it was run as that
    file (``python train.py``, ``composer train.py``), else its console script's name ``entry``."""
    return script if script is not None and os.path.basename(sys.argv[0]) == script else entry


def plain(text: str) -> str:
    """Help text from a docstring: reStructuredText's ``literal`` and :role:`target` as plain words."""
    text = re.sub(r"``([^`]+)``", r"\1", text)
    return re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)


class HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its default, unless the help says it already or there is no value
    worth showing (None, an empty list, a flag that is off): such an option's help says it in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == []
        if "default" in text or not action.option_strings or nothing or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def new_parser(
    entry: str, description: str, *, epilog: str | None = None, script: str | None = None
) -> argparse.ArgumentParser:
    """Every command's parser: its program name (:func:`program`), ``--version``, help without
    reStructuredText and with each option's default."""
    parser = argparse.ArgumentParser(
        prog=program(entry, script),
        description=plain(description),
        epilog=plain(epilog) if epilog else None,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    return parser


def add_no_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar on a terminal: plain lines, as in a log file"
    )


def seed_list(text: str) -> list[int]:
    """``--seeds 0,1,2`` (``usi-ablate``, ``usi-demo``): comma-separated trainer.seed values."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def config_parser(
    entry: str,
    description: str,
    overrides: str = "config overrides, applied in order",
    script: str | None = None,
) -> argparse.ArgumentParser:
    """A parser taking ``CONFIG [key=value ...]``, as ``train.py`` does (options may sit among the overrides:
    parse with ``parse_intermixed_args``)."""
    parser = new_parser(entry, description, script=script)
    parser.add_argument("config", help="the run's YAML config, e.g. yamls/usi.yaml (the recipe's own from anywhere)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides)
    return parser


def add_checkpoint_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--checkpoint PATH_OR_URI`` (``what`` it may be) and ``--trust-checkpoint``."""
    parser.add_argument(
        "--checkpoint",
        metavar="PATH_OR_URI",
        help=f"{what} (default: the run's latest checkpoint in trainer.save_folder)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle the checkpoint in full (it may run code); by default it is read as data "
        "(in a config: model.trust_checkpoint, teacher.trust_checkpoint, trainer.trust_checkpoints)",
    )


def fail(error: UsiError) -> int:
    """Print ``error`` as one line (secrets redacted) and return the exit code, for every console script:
    2 for a refusal a retry cannot fix (the config, data paths, classes, weights that do not fit, an
    unsafe or corrupt file), 1 where a retry may succeed (``error.retryable``: the network, a lost node).
    Launch templates requeue on 1, never on 2."""
    hint = "; if you trust this file, pass --trust-checkpoint" if isinstance(error, UnsafeCheckpointError) else ""
    print(error_line(error) + hint, file=sys.stderr)
    return 1 if error.retryable else 2
