"""A sweep's ``results.jsonl``: one JSON row per finished point, read back for reruns and reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from usi_composer import storage
from usi_composer.ablate.sweep import Sweep, SweepError, grid, swept

__all__ = ["append_row", "finished_rows", "read_rows"]


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``results.jsonl`` in order, ``[]`` for none; a row cut short (a runner killed
    while writing it, always the last) is left out: its point counts as not run."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a row cut short by a killed runner: that point runs again
                continue
    return rows


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Add ``row`` to the file at ``path`` by replacing the file whole (:func:`storage.atomic_write`):
    a runner killed while writing leaves the rows before it, never half a row. Rewriting the whole
    file per point costs little (one row per training run)."""
    try:
        previous = storage.read(path)
    except FileNotFoundError:
        previous = b""
    if previous and not previous.endswith(b"\n"):  # a row cut short by an older, appending runner
        previous += b"\n"
    storage.atomic_write(path, previous + (json.dumps(row) + "\n").encode())


def finished_rows(sweep: Sweep, out_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``out_dir/results.jsonl`` for ``sweep``'s parameters, the latest per point."""
    rows = [r for r in read_rows(out_dir / "results.jsonl") if set(swept(sweep)) <= set(r.get("params", {}))]
    if not rows:
        raise SweepError(f"{out_dir / 'results.jsonl'}: no finished points of {sweep.path} to report")
    latest = list({r["point"]: r for r in rows}.values())
    # in grid order (a sweep with cached teacher outputs runs each group's longest point first)
    order = [tuple(str(v) for v in p.values()) for p in grid({k: sweep.parameters[k] for k in swept(sweep)})]
    position = {values: i for i, values in enumerate(order)}
    return sorted(latest, key=lambda r: position.get(tuple(str(r["params"].get(k)) for k in swept(sweep)), len(order)))
