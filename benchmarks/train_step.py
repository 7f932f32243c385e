"""One USI training step three ways, in one process: this recipe, timm's KD loop, a hand-written loop.

    python benchmarks/train_step.py                       # timing: median ms per step of each loop
    python benchmarks/train_step.py --profile             # aten ops and host syncs per step (eager)
    python benchmarks/train_step.py --set trainer.progress_bar=false   # any recipe override

(a) ``ours``: the Trainer ``usi_composer.builders.build_trainer`` builds from ``yamls/usi.yaml``
    (with ``--set`` overrides), exactly as ``train.py`` does, except that the data is a synthetic
    uint8 batch already on the device (no decode) behind the recipe's own device normalization.
(b) ``timm``: the peer a timm user writes: ``timm.task.LogitDistillationTask``, timm ``Mixup``,
    ``ModelEmaV3`` (through the task), ``create_optimizer_v2`` AdamW, ``CosineLRScheduler``
    stepped per update, ``PrefetchLoader`` normalization, channels-last, autocast, and
    train.py's per-step ``loss.item()`` (single process) and ``cudnn.benchmark``.
(c) ``plain``: the same math written by hand in PyTorch (foreach EMA, no framework).

All three use USI's hyper-parameters and the same BN-folded, channels-last teacher network
(random weights: the step's cost does not depend on them). Sizes: on CUDA the USI pair
(ResNet-50 student, TResNet-L-V2 teacher, 224 px, batch 256, bf16); on the CPU a CI-sized pair.
Runs are interleaved (a, b, c, a, b, c, ...) so drifts in machine load hit all loops alike.

Timing prints ``ours_ms``, ``timm_ms``, ``plain_ms`` and ``ours_vs_timm`` / ``ours_vs_plain``
(targets: ours/timm <= 0.85 on CUDA, <= 1.0 on the CPU). A step is the time between the ends of
consecutive steps (on CUDA after a device synchronize), so each loop's own per-step work between
steps (framework events, logging, fetching the next batch) is counted.

``--profile`` runs ``--steps`` steps of each loop under ``torch.profiler`` (eager) after the
warm-up, then ``--steps`` more under a dispatch mode, and prints per step ``*_ops``: the
``aten::`` operators dispatched by the loop's code and by autograd, not those an operator calls
inside itself (on the CPU a ``_foreach_*`` op runs one op per tensor inside it, where CUDA runs
a few fused kernels: counting those would charge a fused update for the CPU's fallback), and
``*_syncs``: host reads of tensor values (``SYNC_OPS`` below: ``.item()``, ``bool(t)``,
``torch.equal``, ...), except on AdamW's step counters, which torch keeps on the host.
``ours_syncs_in_recipe``: those called from this repository's code. Device-to-host copies
(``t.cpu()``) also wait on CUDA but cannot be told from a copy on a CPU run; not counted.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import timm
import torch
from _common import console_on_stderr  # the script's folder is on sys.path
from composer.core import Callback, DataSpec, Event, State
from composer.loggers import Logger
from timm.data import Mixup
from timm.data.loader import PrefetchLoader
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.task import DistillationTeacher, LogitDistillationTask
from torch.utils._python_dispatch import TorchDispatchMode

import usi_composer.algorithms
from usi_composer import builders, preflight
from usi_composer.algorithms import kd_loss
from usi_composer.config import Config, load_config
from usi_composer.data import DeviceNormalize
from usi_composer.plan import RunPlan, resolve
from usi_composer.teacher import build_teacher

YAML = Path(__file__).resolve().parents[1] / "yamls" / "usi.yaml"
# Ops that hand a device value to the host, which waits for the device to get there. ``item``
# and ``is_nonzero`` decompose into ``_local_scalar_dense`` before a dispatch mode sees them.
SYNC_OPS = frozenset(
    {
        "aten::_local_scalar_dense",  # t.item(), bool(t), float(t), int(t), if t: ...
        "aten::equal",  # torch.equal
        "aten::allclose",
        "aten::nonzero",  # output size depends on the data
        "aten::masked_select",
        "aten::_unique2",
        "aten::unique_consecutive",
    }
)
RECIPE_DIRS = tuple(str(Path(m.__file__).parent) + os.sep for m in (builders, usi_composer.algorithms))
CUDA_SIZES = dict(student="resnet50", teacher="tresnet_v2_l", image_size=224, batch_size=256, steps=30, warmup=10)
CPU_SIZES = dict(student="resnet18", teacher="resnet34", image_size=64, batch_size=16, steps=6, warmup=2)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", help="timm name (default: resnet50 on CUDA, resnet18 on the CPU)")
    parser.add_argument("--teacher", help="timm name (default: tresnet_v2_l on CUDA, resnet34 on the CPU)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, help="timed (or profiled) steps per run, after warm-up")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--runs", type=int, default=3, help="interleaved repeats; the median of run medians")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of yamls/usi.yaml")
    parser.add_argument("--profile", action="store_true", help="count ops and host syncs instead of timing")
    args = parser.parse_args()
    args.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for key, value in (CUDA_SIZES if args.device.type == "cuda" else CPU_SIZES).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.profile:
        args.runs = 1
    return args


def recipe_config(args: argparse.Namespace, teacher_checkpoint: str) -> Config:
    """The recipe's config with the benchmark's sizes; data paths are unused (data is synthetic)."""
    steps = Meter.num_steps(args)
    return load_config(
        YAML,
        [
            f"model.name={args.student}",
            f"teacher.name={args.teacher}",
            "teacher.pretrained=false",
            f"teacher.checkpoint={teacher_checkpoint}",
            f"data.num_classes={args.num_classes}",
            f"data.image_size={args.image_size}",
            "data.train_dir=unused",
            "data.val_dir=null",
            f"trainer.global_batch_size={args.batch_size}",
            f"trainer.max_duration={steps}ba",
            # --profile counts eager ops: the recipe's compilation (on by default on GPUs) is turned off
            *(["trainer.compile=false"] if args.profile else []),
            *args.set,
        ],
    )


class DeviceBatches:
    """``num_batches`` uint8 image batches and integer labels, already on the device (4 distinct)."""

    def __init__(self, args: argparse.Namespace, num_batches: int) -> None:
        g = torch.Generator().manual_seed(0)
        shape = (args.batch_size, 3, args.image_size, args.image_size)
        self.batches = [
            (
                torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(args.device),
                torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(args.device),
            )
            for _ in range(4)
        ]
        self.num_batches = num_batches
        self.batch_size = args.batch_size  # Composer reads it for the microbatch size

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self.batches[i % len(self.batches)] for i in range(self.num_batches))


class SyncCounter(TorchDispatchMode):
    """Counts host syncs: ``SYNC_OPS`` dispatched on any tensor but the optimizers' step counters
    (torch's AdamW keeps ``step`` on the host unless fused/capturable and reads it with ``.item()``
    per parameter: a host read, not a device sync, and the same optimizer in every loop)."""

    def __init__(self, host_tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.host_ids = {id(t) for t in host_tensors}
        self.count = 0
        self.in_recipe = 0  # those called from this repository's code (usi_composer, its algorithms)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in SYNC_OPS and not (args and id(args[0]) in self.host_ids):
            self.count += 1
            self.in_recipe += any(f.filename.startswith(RECIPE_DIRS) for f in traceback.extract_stack())
        return func(*args, **(kwargs or {}))


def _step_counters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [s["step"] for s in optimizer.state.values() if isinstance(s.get("step"), torch.Tensor)]


class Meter:
    """Per-step measurements at the end of each step: its time, or with ``--profile``, aten ops
    (``torch.profiler``) over ``steps`` steps after the warm-up, then host syncs over ``steps`` more."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.ends: list[float] = []
        self.optimizer: torch.optim.Optimizer | None = None  # set by the loop
        self.profiler: torch.profiler.profile | None = None
        self.syncs: SyncCounter | None = None

    @staticmethod
    def num_steps(args: argparse.Namespace) -> int:
        return args.warmup + args.steps * (2 if args.profile else 1)

    def step_end(self) -> None:
        done, w, n = len(self.ends), self.args.warmup, self.args.steps
        if not self.args.profile:
            if self.args.device.type == "cuda":
                torch.cuda.synchronize()
        elif done == w:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.start()
        elif done == w + n:
            assert self.profiler is not None and self.optimizer is not None
            self.profiler.stop()
            self.syncs = SyncCounter(_step_counters(self.optimizer))
            self.syncs.__enter__()
        elif done == w + 2 * n:
            assert self.syncs is not None
            self.syncs.__exit__(None, None, None)
        self.ends.append(time.perf_counter())

    def median_ms(self) -> float:
        times = [b - a for a, b in zip(self.ends[:-1], self.ends[1:], strict=True)][self.args.warmup :]
        return 1000 * statistics.median(times)

    def counts(self) -> tuple[float, float, float]:
        """(aten ops, host syncs, host syncs called from the recipe's code) per step."""
        assert self.profiler is not None and self.syncs is not None, "fewer steps ran than asked"
        ops = sum(1 for e in self.profiler.events() if e.name.startswith("aten::") and not _inside_aten_op(e))
        n = self.args.steps
        return ops / n, self.syncs.count / n, self.syncs.in_recipe / n


def _inside_aten_op(event: Any) -> bool:
    """Whether a profiler event runs inside another ``aten::`` operator."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


class _MeterCallback(Callback):
    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    def run_event(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_END:
            self.meter.step_end()


def run_ours(args: argparse.Namespace, cfg: Config) -> Meter:
    """``build_trainer(cfg)`` as ``train.py`` calls it, with the folder/MDS loaders replaced by
    device-resident batches behind the recipe's own ``DeviceNormalize``."""
    meter = Meter(args)
    batches = DeviceBatches(args, Meter.num_steps(args))

    def synthetic_dataloaders(cfg: Config, plan: RunPlan) -> tuple[DataSpec, None]:
        normalize = DeviceNormalize(plan.student_mean, plan.student_std, channels_last=cfg.algorithms.channels_last)
        return DataSpec(batches, microbatch_transforms=normalize), None

    # synthetic data: no folder or classes.json to check (the pre-flight's data checks are skipped)
    no_data = [mock.patch.object(preflight, name, lambda cfg, plan: None) for name in ("check_data", "check_classes")]
    with mock.patch.object(builders, "build_dataloaders", synthetic_dataloaders), no_data[0], no_data[1]:
        trainer = builders.build_trainer(cfg, callbacks=[_MeterCallback(meter)], loggers=[console_on_stderr()])
    meter.optimizer = trainer.state.optimizers[0]
    meter.step_end()  # the first step's start
    trainer.fit()
    trainer.close()
    return meter


def _hyper(cfg: Config) -> dict[str, Any]:
    a, o, s = cfg.algorithms, cfg.optimizer, cfg.scheduler
    plan = resolve(cfg)
    return dict(
        lr=plan.lr,
        ema=plan.ema_smoothing,
        mixup=dict(
            mixup_alpha=a.mixup_cutmix.mixup_alpha,
            cutmix_alpha=a.mixup_cutmix.cutmix_alpha,
            prob=a.mixup_cutmix.prob,
            switch_prob=a.mixup_cutmix.switch_prob,
            label_smoothing=a.mixup_cutmix.label_smoothing,
            num_classes=cfg.data.num_classes,
        ),
        adamw=dict(weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps),
        warmup_lr=s.warmup_lr,
        min_lr=s.min_lr,
    )


def _autocast(args: argparse.Namespace):
    return (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if args.device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )


def _student(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(args.student, num_classes=args.num_classes)
    return model.to(args.device, memory_format=torch.channels_last).train()


def run_timm(args: argparse.Namespace, cfg: Config, teacher_net: torch.nn.Module) -> Meter:
    """What a timm user writes (timm's train.py with a ``LogitDistillationTask``)."""
    h, kd = _hyper(cfg), cfg.algorithms.distillation
    meter = Meter(args)
    steps = Meter.num_steps(args)
    model = _student(args)
    task = LogitDistillationTask(
        model,
        DistillationTeacher(teacher_net, device=args.device),
        criterion=SoftTargetCrossEntropy(),
        distill_loss_weight=kd.alpha,
        task_loss_weight=kd.ce_weight,
        temperature=kd.temperature,
        device=args.device,
        verbose=False,
    )
    task.setup_ema(decay=h["ema"])
    optimizer = meter.optimizer = create_optimizer_v2(model, opt="adamw", lr=h["lr"], **h["adamw"])
    scheduler = CosineLRScheduler(
        optimizer, t_initial=steps, lr_min=h["min_lr"], warmup_t=steps, warmup_lr_init=h["warmup_lr"], t_in_epochs=False
    )
    mixup = Mixup(**h["mixup"])
    cfg_s = model.pretrained_cfg
    loader = PrefetchLoader(DeviceBatches(args, steps), mean=cfg_s["mean"], std=cfg_s["std"], device=args.device)
    losses: list[float] = []
    meter.step_end()
    for num_updates, (inputs, targets) in enumerate(loader, start=1):
        inputs, targets = mixup(inputs, targets)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        with _autocast(args):
            loss = task(inputs, targets)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())  # timm's train.py logs the loss every step in a single process
        task.update_ema(step=num_updates)
        scheduler.step_update(num_updates=num_updates)
        meter.step_end()
    return meter


def run_plain(args: argparse.Namespace, cfg: Config, teacher: torch.nn.Module) -> Meter:
    """The same math by hand: one multiply-add normalization, timm's Mixup sampling, soft CE +
    alpha * KD, AdamW without decay on biases/norms, a foreach EMA over parameters and buffers."""
    h, kd = _hyper(cfg), cfg.algorithms.distillation
    meter = Meter(args)
    steps = Meter.num_steps(args)
    model = _student(args)
    ema = copy.deepcopy(model).requires_grad_(False)
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = meter.optimizer = torch.optim.AdamW(groups, lr=h["lr"], **h["adamw"])
    warmup = h["warmup_lr"] / h["lr"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup + (1 - warmup) * step / steps)
    mixup = Mixup(**h["mixup"])
    mean, std = model.pretrained_cfg["mean"], model.pretrained_cfg["std"]
    normalize = DeviceNormalize(mean, std, channels_last=True)
    pairs = list(zip(ema.state_dict().values(), model.state_dict().values(), strict=True))
    floats = [pair for pair in pairs if pair[0].is_floating_point()]
    ints = [pair for pair in pairs if not pair[0].is_floating_point()]  # BatchNorm's num_batches_tracked
    ema_f, model_f = [e for e, _ in floats], [p for _, p in floats]
    ema_i, model_i = [e for e, _ in ints], [p for _, p in ints]
    meter.step_end()
    for inputs, targets in DeviceBatches(args, steps):
        inputs, targets = normalize((inputs, targets))
        inputs, targets = mixup(inputs, targets)
        with _autocast(args):
            logits = model(inputs)
            ce = torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            with torch.no_grad():
                teacher_logits = teacher(inputs)
        loss = kd.ce_weight * ce + kd.alpha * kd_loss(logits, teacher_logits, kd.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_f, model_f, 1 - h["ema"])
            torch._foreach_copy_(ema_i, model_i)
        meter.step_end()
    return meter


def teachers(args: argparse.Namespace, checkpoint: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Random teacher weights saved to ``checkpoint`` (the recipe loads them from there); the
    prepared teacher as the recipe builds it (for the plain loop); and its inner BN-folded
    channels-last network with its own normalization recorded (timm's ``DistillationTeacher``
    re-normalizes from the student's stats itself)."""
    torch.manual_seed(0)
    net = timm.create_model(args.teacher, num_classes=args.num_classes)
    torch.save(net.state_dict(), checkpoint)
    student_cfg = timm.create_model(args.student, num_classes=1).pretrained_cfg
    normalizations = (student_cfg["mean"], student_cfg["std"]), (net.pretrained_cfg["mean"], net.pretrained_cfg["std"])
    prepared = build_teacher(args.teacher, args.num_classes, *normalizations, checkpoint=checkpoint).to(args.device)
    prepared.model.pretrained_cfg = net.pretrained_cfg
    return prepared, prepared.model


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True  # timm's train.py sets it, so does build_trainer on GPUs
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / "teacher.pt")
        prepared_teacher, teacher_net = teachers(args, checkpoint)
        cfg = recipe_config(args, checkpoint)
        figures = measure(args, cfg, prepared_teacher, teacher_net)
    config = {k: v for k, v in vars(args).items() if k not in ("device", "threads")}
    rounded = {k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}
    device = torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu"
    line = {"benchmark": "train_step", **config, "device": device, "threads": torch.get_num_threads(), **rounded}
    print(json.dumps(line), flush=True)


def measure(
    args: argparse.Namespace, cfg: Config, prepared_teacher: torch.nn.Module, teacher_net: torch.nn.Module
) -> dict[str, float]:
    """Runs the loops interleaved; per-step figures."""
    loops: dict[str, Callable[[], Meter]] = {
        "ours": lambda: run_ours(args, cfg),
        "timm": lambda: run_timm(args, cfg, teacher_net),
        "plain": lambda: run_plain(args, cfg, prepared_teacher),
    }
    results: dict[str, list[Meter]] = {name: [] for name in loops}
    for _ in range(args.runs):
        for name, loop in loops.items():
            results[name].append(loop())
            if args.device.type == "cuda":
                gc.collect()  # the previous loop's models and optimizer states, before the next loop's
                torch.cuda.empty_cache()
    figures: dict[str, float] = {}
    if args.profile:
        for name, (meter,) in results.items():
            figures[f"{name}_ops"], figures[f"{name}_syncs"], in_recipe = meter.counts()
            if name == "ours":
                figures["ours_syncs_in_recipe"] = in_recipe
    else:
        for name, meters in results.items():
            figures[f"{name}_ms"] = statistics.median(m.median_ms() for m in meters)
        figures["ours_vs_timm"] = figures["ours_ms"] / figures["timm_ms"]
        figures["ours_vs_plain"] = figures["ours_ms"] / figures["plain_ms"]
        figures["ours_img_per_s"] = args.batch_size / figures["ours_ms"] * 1000
    return figures


if __name__ == "__main__":
    sys.exit(main())
