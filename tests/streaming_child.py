"""Training run used by the streaming tests: ``python tests/streaming_child.py RECORD_DIR KILL_AFTER YAML [k=v ...]``.

Labels are replaced by the sample index (so every trained sample is identified), each rank
appends the indices of every trained batch to ``RECORD_DIR/rank<r>.txt``, and with
``KILL_AFTER`` > 0 the process dies (``os._exit``, no cleanup, like a killed job) right after
batch ``KILL_AFTER`` has been trained and checkpointed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

from usi_composer.builders import build_trainer
from usi_composer.config import load_config
from usi_composer.data.mds import ImageNetMDS

_getitem = ImageNetMDS.__getitem__


def _getitem_with_index(self: ImageNetMDS, idx: int):
    image, _ = _getitem(self, idx)
    return image, int(idx)


ImageNetMDS.__getitem__ = _getitem_with_index  # type: ignore[method-assign]


class RecordAndKill(Callback):
    def __init__(self, record_dir: Path, kill_after: int) -> None:
        self.record_dir, self.kill_after = record_dir, kill_after

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_END:
            ids = state.batch[1].tolist()
            with open(self.record_dir / f"rank{dist.get_global_rank()}.txt", "a") as f:
                f.write(" ".join(map(str, ids)) + "\n")
        if event == Event.AFTER_DATALOADER and self.kill_after and int(state.timestamp.batch) == self.kill_after:
            os._exit(3)  # batch kill_after was trained and checkpointed; the next one was fetched


if __name__ == "__main__":
    record_dir, kill_after, yaml_path, *overrides = sys.argv[1:]
    Path(record_dir).mkdir(parents=True, exist_ok=True)
    cfg = load_config(yaml_path, overrides)
    trainer = build_trainer(cfg, callbacks=[RecordAndKill(Path(record_dir), int(kill_after))])
    trainer.fit()
    trainer.close()
