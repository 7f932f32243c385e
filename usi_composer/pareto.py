"""The speed-accuracy Pareto comparison: inference throughput of timm backbones (BatchNorm folded,
as the paper measures), joined with top-1 from finished runs, drawn with the frontier marked."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from usi_composer.ablate.results import read_rows
from usi_composer.errors import UsiError, first_line
from usi_composer.plotting import new_figure, save_figure

__all__ = [
    "Throughput",
    "Top1",
    "load_top1",
    "markdown_table",
    "measure_throughput",
    "pareto_front",
    "plot_pareto",
    "throughput_json",
]

DEFAULT_METRICS = ("metrics/eval_best/top1", "metrics/eval/top1")
# trainer.precision's names (usi-benchmark-backbones --precision) -> the autocast dtype
PRECISION_DTYPES = {"fp32": None, "amp_fp16": torch.float16, "amp_bf16": torch.bfloat16}
# what a model's runs may differ in and still be pooled into one point of the figure
POOLED = ("model.name", "trainer.seed")


@dataclass
class Throughput:
    model: str
    images_per_s: float  # batch_size / median seconds per batch
    median_ms: float  # per batch
    iqr_ms: float
    runs: int  # timed blocks the median is over
    batch_size: int
    image_size: int
    device: str
    precision: str  # trainer.precision's name: fp32, amp_fp16, amp_bf16
    channels_last: bool
    bn_folded: int  # BatchNorm layers folded into convolutions
    params_m: float


def _count_bn(model: torch.nn.Module) -> int:
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def measure_throughput(
    name: str,
    *,
    batch_size: int = 64,
    image_size: int = 224,
    num_classes: int = 1000,
    device: str = "cpu",
    precision: str = "fp32",
    channels_last: bool = True,
    fold_bn: bool = True,
    warmup: int = 5,
    min_run_time: float = 2.0,
) -> Throughput:
    """Images per second of timm's ``name`` built for ``image_size`` (random weights: speed does not
    depend on them) in eval mode, BN folded, after ``warmup`` batches; the median over the blocks that
    ``torch.utils.benchmark`` times in ``min_run_time`` seconds (it synchronizes CUDA)."""
    from usi_composer.teacher import fold_batchnorm

    if precision not in PRECISION_DTYPES:
        raise UsiError(f"--precision: must be one of {', '.join(PRECISION_DTYPES)}, got '{precision}'")
    benchmark = _torch_benchmark()
    model = _backbone(name, image_size, num_classes)
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    before = _count_bn(model)
    model = fold_batchnorm(model) if fold_bn else model.eval()
    folded = before - _count_bn(model)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).to(memory_format=memory_format)
    dtype = PRECISION_DTYPES[precision]
    device_type = torch.device(device).type

    def step() -> torch.Tensor:
        autocast = torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with torch.inference_mode(), autocast:
            return model(x)

    for _ in range(warmup):
        step()
    m = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time
    )
    return Throughput(
        model=name,
        images_per_s=batch_size / m.median,
        median_ms=m.median * 1e3,
        iqr_ms=m.iqr * 1e3,
        runs=len(m.times),
        batch_size=batch_size,
        image_size=image_size,
        device=device,
        precision=precision,
        channels_last=channels_last,
        bn_folded=folded,
        params_m=params_m,
    )


def _torch_benchmark() -> Any:
    """``torch.utils.benchmark``, imported without its stray line: it imports ``torch.utils.cpp_extension``,
    which prints "No CUDA runtime is found, using CUDA_HOME=..." on a machine without CUDA."""
    with contextlib.redirect_stderr(io.StringIO()):
        from torch.utils import benchmark
    return benchmark


def _backbone(name: str, image_size: int, num_classes: int) -> torch.nn.Module:
    """timm's ``name`` built for ``image_size`` where the model takes it (ViT, Swin, LeViT, ...), as the
    recipe trains it; a name or a size it cannot run is one line, not a traceback."""
    import timm

    from usi_composer.config.schema import suggest
    from usi_composer.models import check_input_size, create_backbone

    if not timm.is_model(name):
        hint = suggest(name, timm.list_models()) or " (timm.list_models('*part-of-name*') lists them)"
        raise UsiError(f"{name}: not a timm model{hint}")
    try:
        check_input_size(name, image_size, num_classes)
        return create_backbone(name, num_classes, img_size=image_size)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise UsiError(f"{name}: {first_line(e)}") from None


# --------------------------------------------------------------------------- top-1 of finished runs


def _wandb_runs(root: Path) -> Iterable[Path]:
    if any(root.glob("run-*.wandb")):
        yield root
    else:
        yield from sorted({p.parent for p in root.rglob("run-*.wandb")})


@dataclass(frozen=True)
class Top1:
    """A model's top-1 over its finished runs (e.g. the seeds of one sweep point)."""

    mean: float
    std: float  # sample standard deviation over the runs; 0 for one run
    runs: int
    sources: tuple[str, ...]


def load_top1(
    results: Iterable[str | os.PathLike] = (),
    wandb_dirs: Iterable[str | os.PathLike] = (),
    csvs: Iterable[str | os.PathLike] = (),
    metrics: Sequence[str] = DEFAULT_METRICS,
    where: Sequence[str] = (),
) -> dict[str, Top1]:
    """Top-1 per model name, mean and standard deviation over its finished runs.

    A run's top-1 is the first of ``metrics`` it has (by default USI's better-of-EMA-and-raw
    ``metrics/eval_best/top1``, else ``metrics/eval/top1``). Pass the runs of one recipe per
    model (e.g. ``usi-ablate ... --seeds 0,1,2``): every run of a model counts, and a model whose
    results.jsonl rows come from different sweep points (another base, overrides or swept value than
    :data:`POOLED`) is refused, naming the first difference; ``where`` (``KEY=VALUE``) keeps the rows
    and W&B runs with that value (a swept parameter of a row, a config key of a W&B run).

    ``results``: the local runner's results.jsonl files (the latest row of each point); ``wandb_dirs``:
    W&B run directories or folders holding them (offline or synced runs; the model is the logged
    ``model.name``); ``csvs``: files with a ``model`` column and a ``top1`` column, one row per run.
    A run found both in a results.jsonl and in a W&B folder (the same W&B run id) counts once.
    """
    runs: dict[tuple[str, ...], _Run] = {}  # run key -> the run
    wanted = _where(where)

    def pick(values: dict[str, Any]) -> Any:
        return next((values[m] for m in metrics if values.get(m) is not None), None)

    def offer(key: tuple[str, ...], model: str | None, value: Any, source: str, setting: str | None = None) -> None:
        if model and isinstance(value, int | float) and not isinstance(value, bool):
            runs[key] = _Run(model, float(value), source, setting)

    for path in map(Path, results):
        if not path.is_file():
            raise UsiError(f"{path}: no such results file")
        # usi-ablate's reader (a row cut short by a killed runner is left out); a point run again
        # (after a failure) counts once
        latest = {row["point"]: row for row in read_rows(path) if "point" in row}
        for point, row in latest.items():
            params = row.get("params", {})
            if row.get("status") == "ok" and all(_shown(params.get(k, _ABSENT)) == v for k, v in wanted.items()):
                run_dir = row.get("wandb_run_dir")
                key = ("wandb", Path(run_dir).name.rsplit("-", 1)[-1]) if run_dir else ("results", str(path), point)
                offer(key, row.get("model"), pick(row.get("metrics", {})), f"{path}: {point}", _setting(row))
    for root in map(Path, wandb_dirs):
        if not root.exists():
            raise UsiError(f"{root}: no such W&B folder")
        from usi_composer.tracking import read_wandb_run

        for run_dir in _wandb_runs(root):
            run = read_wandb_run(run_dir)
            if all(_shown(_config_value(run["config"], k)) == v for k, v in wanted.items()):
                model = run["config"].get("model", {}).get("name")
                offer(("wandb", str(run.get("id"))), model, pick(run["summary"]), f"W&B run {run.get('id')}")
    for path in map(Path, csvs):
        for i, (model, top1) in enumerate(_csv_rows(path)):
            offer(("csv", str(path), str(i)), model, top1, str(path))
    return _per_model(runs.values())


def _csv_rows(path: Path) -> Iterable[tuple[str, float]]:
    """``(model, top1)`` of each row of a CSV file with those columns."""
    if not path.is_file():
        raise UsiError(f"{path}: no such CSV file")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not {"model", "top1"} <= set(reader.fieldnames or []):
            raise UsiError(f"{path}: needs columns 'model' and 'top1', has {reader.fieldnames}")
        return [(row["model"], float(row["top1"])) for row in reader]


@dataclass(frozen=True)
class _Run:
    model: str
    top1: float
    source: str
    setting: str | None  # a results.jsonl row's sweep point but for POOLED (JSON); None: not known


_ABSENT = object()


def _where(pairs: Sequence[str]) -> dict[str, str]:
    wanted = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsiError(f"--where: expected KEY=VALUE, got '{pair}'")
        wanted[key] = value
    return wanted


def _shown(value: Any) -> str | None:
    """A value as written on a command line (yaml's spelling of booleans and null)."""
    if value is _ABSENT:
        return None
    if value is None or isinstance(value, bool):
        return "null" if value is None else str(value).lower()
    return json.dumps(value) if isinstance(value, dict | list) else str(value)


def _config_value(config: dict[str, Any], key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return _ABSENT
        value = value[part]
    return value


def _setting(row: dict[str, Any]) -> str:
    params = {k: v for k, v in row.get("params", {}).items() if k not in POOLED}
    return json.dumps({"base": row.get("base"), "overrides": row.get("overrides"), **params}, sort_keys=True)


def _first_difference(a: str, b: str) -> str:
    x, y = json.loads(a), json.loads(b)
    key = next(k for k in sorted({*x, *y}) if x.get(k, _ABSENT) != y.get(k, _ABSENT))
    return f"{key} = {_shown(x.get(key, _ABSENT))} and {_shown(y.get(key, _ABSENT))}"


def _per_model(runs: Iterable[_Run]) -> dict[str, Top1]:
    """Each model's :class:`Top1`; a model with runs of different sweep points is refused."""
    by_model: dict[str, list[_Run]] = {}
    for run in runs:
        by_model.setdefault(run.model, []).append(run)
    for model, found in by_model.items():
        settings = sorted({r.setting for r in found if r.setting is not None})
        if len(settings) > 1:
            raise UsiError(
                f"{model}: its runs come from {len(settings)} different sweep points "
                f"({_first_difference(settings[0], settings[1])}): one figure would pool them; "
                "pick one with --where KEY=VALUE"
            )
    return {
        model: Top1(
            mean=statistics.fmean(r.top1 for r in found),
            std=statistics.stdev(r.top1 for r in found) if len(found) > 1 else 0.0,
            runs=len(found),
            sources=tuple(r.source for r in found),
        )
        for model, found in by_model.items()
    }


# --------------------------------------------------------------------------- the frontier


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (speed, accuracy) points, higher is better in both: True where no other point is at
    least as good in both and better in one."""
    return [
        not any((sx >= x and sy >= y) and (sx > x or sy > y) for j, (sx, sy) in enumerate(points) if j != i)
        for i, (x, y) in enumerate(points)
    ]


def _top1(top1: dict[str, Top1], model: str) -> str:
    t = top1[model]
    return f"{t.mean:.4f} ± {t.std:.4f} ({t.runs} runs)" if t.runs > 1 else f"{t.mean:.4f} (1 run)"


def markdown_table(speeds: list[Throughput], top1: dict[str, Top1]) -> str:
    joined = [s for s in speeds if s.model in top1]
    front = dict(
        zip(
            [s.model for s in joined], pareto_front([(s.images_per_s, top1[s.model].mean) for s in joined]), strict=True
        )
    )
    lines = [
        "| model | images/s | ms/batch (median) | ms/batch (IQR) | params (M) | BN folded | top-1 (mean ± std) "
        "| Pareto |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for s in sorted(speeds, key=lambda s: -s.images_per_s):
        acc = _top1(top1, s.model) if s.model in top1 else "no run"
        lines.append(
            f"| {s.model} | {s.images_per_s:.1f} | {s.median_ms:.2f} | {s.iqr_ms:.2f} | {s.params_m:.2f} "
            f"| {s.bn_folded} | {acc} | {'★' if front.get(s.model) else ''} |"
        )
    s0 = speeds[0]
    lines.append(
        f"\nThroughput: batch {s0.batch_size}, {s0.image_size}px, {s0.device}, precision={s0.precision}, "
        f"channels_last={s0.channels_last}, BatchNorm folded; ms/batch: the median and the interquartile "
        "range over the timed blocks; top-1: mean ± standard deviation over each model's finished runs; "
        "the frontier is drawn through the means."
    )
    return "\n".join(lines)


def plot_pareto(speeds: list[Throughput], top1: dict[str, Top1], path: Path, metric: str = "top-1") -> Path:
    joined = [s for s in speeds if s.model in top1]
    if not joined:
        raise UsiError("no benchmarked model has a finished run with a top-1: nothing to plot")
    xs = [s.images_per_s for s in joined]
    ys = [top1[s.model].mean for s in joined]
    front = pareto_front(list(zip(xs, ys, strict=True)))
    fig, ax = new_figure((7, 4.8))
    ax.errorbar(
        xs,
        ys,
        yerr=[top1[s.model].std for s in joined],
        fmt="o",
        color="tab:gray",
        capsize=3,
        zorder=2,
        label="backbone (mean ± std over runs)",
    )
    frontier = sorted((x, y) for x, y, f in zip(xs, ys, front, strict=True) if f)
    ax.plot(*zip(*frontier, strict=True), "o-", color="tab:red", zorder=3, label="Pareto frontier")
    if max(xs) / min(xs) > 10:  # backbones' speeds span orders of magnitude
        ax.set_xscale("log")
    # Each label goes right of its point, moved down a line at a time while it overlaps one
    # already placed (top points first), as drawn: names are long, so closeness of the points
    # alone does not tell.
    fig.canvas.draw()  # fixes the axes' limits: text extents are only right after a draw
    renderer = fig.canvas.get_renderer()
    placed: list[Any] = []
    for i in sorted(range(len(joined)), key=lambda i: -ys[i]):
        label = f"{joined[i].model} ({top1[joined[i].model].runs})"
        text = ax.annotate(label, (xs[i], ys[i]), textcoords="offset points", xytext=(6, 4), fontsize="small")
        box, lines = text.get_window_extent(renderer), 0
        line = 11 * fig.dpi / 72  # 11 points in pixels
        while lines < 8 and any(box.translated(0, -line * lines).overlaps(other) for other in placed):
            lines += 1
        text.xyann = (6, 4 - 11 * lines)
        placed.append(box.translated(0, -line * lines))
    s0 = joined[0]
    ax.set_xlabel(
        f"inference throughput (images/s; {s0.device}, batch {s0.batch_size}, {s0.image_size}px, "
        f"precision={s0.precision})"
    )
    ax.set_ylabel(metric)
    ax.set_title("speed-accuracy Pareto (BatchNorm folded; (n): runs per model)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return save_figure(fig, path)


def throughput_json(speeds: list[Throughput]) -> str:
    return json.dumps([asdict(s) for s in speeds], indent=1)
