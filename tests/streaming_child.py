"""Training run used by the streaming tests: ``python tests/streaming_child.py RECORD_DIR KILL_AFTER YAML [k=v ...]``.

Labels are replaced by the sample index (so every trained sample is identified), each rank
appends the indices of every trained batch to ``RECORD_DIR/rank<r>.txt`` and
``{"batch", "loss", "ids"}`` to ``RECORD_DIR/rank<r>.jsonl``. With ``KILL_AFTER`` > 0 the
process dies (``os._exit``, no cleanup, like a killed job) right after batch ``KILL_AFTER``
has been trained and checkpointed; with ``CHILD_PAUSE=1`` it hangs there instead (writes
``RECORD_DIR/paused-rank<r>`` and sleeps), for a test to kill it from outside, and with
``CHILD_PAUSE_RANK=r`` only rank r stops.

Several "nodes" on one machine (``WORLD_SIZE`` > ``LOCAL_WORLD_SIZE``): each node gets its own
namespace for streaming's shared memory, as separate machines have (otherwise the two nodes'
local leaders register the same name and the second fails with FileExistsError).
``CHILD_SHM_TAG`` prefixes those names so the test can remove what killed runs leave behind.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

if "CHILD_SHM_TAG" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > int(
    os.environ.get("LOCAL_WORLD_SIZE", "1")
):
    import streaming.base.dataset
    import streaming.base.shared
    import streaming.base.shared.prefix
    import streaming.base.util

    _get_path = streaming.base.shared.prefix._get_path
    _node = f"{os.environ.get('CHILD_SHM_TAG', '')}n{os.environ.get('NODE_RANK', '0')}_"

    def _get_node_path(prefix_int: int, name: str) -> str:
        return _node + _get_path(prefix_int, name)

    for _module in (streaming.base.shared.prefix, streaming.base.shared, streaming.base.dataset, streaming.base.util):
        _module._get_path = _get_node_path  # type: ignore[attr-defined]

from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist

import usi_composer.preflight
from usi_composer.config import load_config
from usi_composer.data.mds import ImageNetMDS
from usi_composer.errors import UsiError
from usi_composer.training import train

_getitem = ImageNetMDS.__getitem__


def _getitem_with_index(self: ImageNetMDS, idx: int):
    image, _ = _getitem(self, idx)
    return image, int(idx)


ImageNetMDS.__getitem__ = _getitem_with_index  # type: ignore[method-assign]
# With the sample index as the label, data.num_classes is the number of samples, not the shards'
# classes.json: the recipe's check of the two before training does not apply to these runs.
usi_composer.preflight.check_classes = lambda cfg, plan: None


class RecordAndKill(Callback):
    def __init__(self, record_dir: Path, kill_after: int) -> None:
        self.record_dir, self.kill_after = record_dir, kill_after
        self.pause = os.environ.get("CHILD_PAUSE") == "1"
        only = os.environ.get("CHILD_PAUSE_RANK")
        self.stops = only is None or int(only) == dist.get_global_rank()

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        rank = dist.get_global_rank()
        if event == Event.BATCH_END:
            ids = state.batch[1].tolist()
            with open(self.record_dir / f"rank{rank}.txt", "a") as f:
                f.write(" ".join(map(str, ids)) + "\n")
            record = {"batch": int(state.timestamp.batch), "loss": float(state.loss), "ids": ids}
            with open(self.record_dir / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if (
            event == Event.AFTER_DATALOADER
            and self.kill_after
            and self.stops
            and int(state.timestamp.batch) == self.kill_after
        ):
            # batch kill_after was trained and checkpointed; the next one was fetched
            if not self.pause:
                os._exit(3)
            (self.record_dir / f"paused-rank{rank}").write_text(str(self.kill_after))
            time.sleep(3600)


if __name__ == "__main__":
    record_dir, kill_after, yaml_path, *overrides = sys.argv[1:]
    Path(record_dir).mkdir(parents=True, exist_ok=True)
    cfg = load_config(yaml_path, overrides)
    try:  # train.py's path: errors a user can act on (a lost node, ...) are one line
        trainer = train(cfg, callbacks=[RecordAndKill(Path(record_dir), int(kill_after))])
    except UsiError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    trainer.close()
