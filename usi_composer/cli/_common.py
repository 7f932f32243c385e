"""What the recipe's commands share (this module is no command): the config and checkpoint
arguments, and how a user-facing error becomes one line and an exit code."""

from __future__ import annotations

import argparse
import sys

from usi_composer.errors import UnsafeCheckpointError, UsiError, error_line

__all__ = ["add_checkpoint_options", "config_parser", "fail"]


def config_parser(
    prog: str, description: str, overrides: str = "config overrides, applied in order"
) -> argparse.ArgumentParser:
    """A parser taking ``CONFIG [key=value ...]``, as ``train.py`` does (options may sit among the overrides:
    parse with ``parse_intermixed_args``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("config", help="the run's YAML config, e.g. yamls/usi.yaml (the recipe's own from anywhere)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=overrides)
    return parser


def add_checkpoint_options(parser: argparse.ArgumentParser, what: str) -> None:
    """``--checkpoint PATH_OR_URI`` (``what`` it may be) and ``--trust-checkpoint``."""
    parser.add_argument(
        "--checkpoint",
        metavar="PATH_OR_URI",
        help=f"{what}; default: the run's latest checkpoint in trainer.save_folder",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle the checkpoint in full (it may run code); by default it is read as data",
    )


def fail(error: UsiError) -> int:
    """Print ``error`` as one line (secrets redacted) and return the exit code, for every console script:
    2 for a refusal a retry cannot fix (the config, data paths, classes, weights that do not fit, an
    unsafe or corrupt file), 1 where a retry may succeed (``error.retryable``: the network, a lost node).
    Launch templates requeue on 1, never on 2."""
    hint = "; if you trust this file, pass --trust-checkpoint" if isinstance(error, UnsafeCheckpointError) else ""
    print(error_line(error) + hint, file=sys.stderr)
    return 1 if error.retryable else 2
