"""wandb's override: :func:`wandb_logger_class`, Composer's ``WandBLogger`` as the recipe needs it
(wandb and Composer's loggers imported only when W&B is configured)."""

from __future__ import annotations

import sys
from typing import Any

from usi_composer.patches import WANDB_API, check_upstream

__all__ = ["wandb_logger_class"]


def wandb_logger_class() -> type:
    """Composer's ``WandBLogger`` (imported only when W&B is configured), as the recipe needs it:

    - wandb records the command line in its run metadata: the arguments it sees at ``wandb.init``
      are redacted like the config (a global ``sys.argv`` swap around Composer's ``init``);
    - Composer 0.32.1's ``init`` calls ``wandb.run.get_url()``, which newer wandb releases removed
      in favour of the ``Run.url`` property (same value): the old name is restored where missing.
    """
    from composer.loggers import WandBLogger as ComposerWandBLogger
    from wandb.sdk.wandb_run import Run

    from usi_composer.redaction import redact_argv

    check_upstream((WANDB_API,))
    if not hasattr(Run, "get_url"):
        Run.get_url = lambda self: self.url  # type: ignore[attr-defined]

    class WandBLogger(ComposerWandBLogger):
        def init(self, state: Any, logger: Any) -> None:
            argv = sys.argv
            sys.argv = [argv[0], *redact_argv(argv[1:])]
            try:
                super().init(state, logger)
            finally:
                sys.argv = argv

    return WandBLogger
