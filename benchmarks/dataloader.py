"""Loader throughput: our MDS pipeline vs torchvision ImageFolder + timm's create_transform;
with ``--pipeline gpu``, the gpu pipeline's images on the device and the training step it feeds.

    python benchmarks/dataloader.py                      # the 1000 images of ../shared/data/imagenet-sample
    python benchmarks/dataloader.py --limit 64 --image-size 64 --runs 1   # seconds-long smoke run
    python benchmarks/dataloader.py --pipeline gpu --workers 16 --repeat 7   # one GPU, 7,000 samples
    python benchmarks/dataloader.py --pipeline gpu --limit 32 --image-size 32 --batch-size 8 --runs 1 \
        --student resnet10t --teacher resnet10t --steps 3 --warmup 1       # CPU smoke run

Prints ONE JSON line. ``--pipeline cpu`` (default): images per second per loader worker process,
the median of ``--runs`` full passes after one warm-up pass, same JPEGs, same augmentation (USI's
RandomResizedCrop bicubic + flip + RandAugment rand-m7-mstd0.5-inc1), same worker count and
batch size. The baseline is timm's standard CPU pipeline (float tensor, normalized per image);
ours yields uint8 and normalizes on the device, as training does.

``--pipeline gpu`` (on CUDA when there is one, else on CPU tensors):

- ``decode_ms_*``: one image's decode in this process, one thread: ``decode_jpeg`` on the CPU at
  full size, PIL at full size, PIL at the reduced DCT size the CPU path decodes the crop box at
  (``draft``), and on CUDA nvJPEG per image of a ``--batch-size`` batch. Decides
  ``data.gpu_decode`` (decode on the device vs in the workers).
- ``gpu_pipeline_images_per_s``: the MDS loader in gpu mode (``--workers`` workers read bytes and
  draw) + the device transform (decode, crop, resize, flip, RandAugment, normalize): training-ready
  images on the device per second (median of ``--runs`` passes after a warm-up pass, synchronized).
  ``device_transform_images_per_s``: the device transform alone, on batches already loaded.
- ``train_images_per_s_real`` vs ``train_images_per_s_synthetic``: the recipe's training step
  (``build_trainer`` on yamls/usi.yaml, ``--student``/``--teacher``, KD, EMA, MixUp/CutMix) fed by
  the gpu pipeline from the MDS shards vs by uint8 batches already on the device; steps between
  ends of consecutive steps after ``--warmup``. ``train_real_vs_synthetic``: their ratio (target
  >= 0.95 on one H100 with 16 cores).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_jpeg

from usi_composer.config import DataConfig
from usi_composer.data.convert import convert_imagenet
from usi_composer.data.mds import streaming_dataloader
from usi_composer.data.spec import TransformSpec
from usi_composer.data.transforms import BytesTransform, build_transform

REPO = Path(__file__).resolve().parents[1]


def _images_per_second(loader, runs: int, device_transform=None, device: torch.device | None = None) -> float:
    rates = []
    for run in range(runs + 1):  # the first pass warms up workers, page cache and imports
        start, n = time.perf_counter(), 0
        for batch in loader:
            if device_transform is not None:  # the gpu pipeline: ready images on the device
                images, labels = batch[0], batch[-1]
                batch = device_transform((images, labels.to(device, non_blocking=True)))
            n += len(batch[-1])
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize()
        if run:
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=str(REPO / ".." / "shared" / "data" / "imagenet-sample"))
    p.add_argument("--pipeline", choices=("cpu", "gpu"), default="cpu", help="which data.pipeline to measure")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=1, help="loader worker processes (both pipelines)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--runs", type=int, default=3, help="timed passes (after one warm-up pass)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    p.add_argument("--repeat", type=int, default=1, help="each image this many times (a bigger epoch)")
    p.add_argument("--gpu-decode", type=int, choices=(0, 1), default=1, help="gpu: data.gpu_decode (1: on the device)")
    p.add_argument("--student", default="resnet50", help="gpu: the training step's student")
    p.add_argument("--teacher", default="tresnet_v2_l", help="gpu: the training step's teacher")
    p.add_argument("--steps", type=int, default=30, help="gpu: timed training steps (0: no training figures)")
    p.add_argument("--warmup", type=int, default=10, help="gpu: untimed training steps first")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    src = Path(args.src)
    work = Path(tempfile.mkdtemp(prefix="usi-bench-"))
    try:
        if args.limit or args.repeat > 1:  # a folder with the first N images, each `repeat` times
            files = sorted((src / "train").glob("*/*"))[: args.limit or None]
            for f in files:
                (work / "src" / "train" / f.parent.name).mkdir(parents=True, exist_ok=True)
                for r in range(args.repeat):
                    (work / "src" / "train" / f.parent.name / f"{r}_{f.name}").symlink_to(f.resolve())
            src = work / "src"
        (stats,) = convert_imagenet(src, str(work / "mds"), splits=["train"], workers=2, progress=False)
        result: dict[str, Any] = {
            "images": stats.written,
            "image_size": args.image_size,
            "workers": args.workers,
            "pipeline": args.pipeline,
            "converter_images_per_s": round(stats.images_per_second, 1),
        }
        if args.pipeline == "gpu":
            result.update(gpu_figures(args, src, work / "mds"))
        else:
            result.update(cpu_figures(args, src, work / "mds"))
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def cpu_figures(args: argparse.Namespace, src: Path, mds: Path) -> dict[str, Any]:
    common = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=False, drop_last=False)
    result: dict[str, Any] = {}
    spec = TransformSpec.from_data(DataConfig(image_size=args.image_size))  # USI's, timm's ImageNet mean/std
    for name, training in (("train", True), ("val", False)):
        ours = streaming_dataloader(
            remote=None,
            local=str(mds),
            split="train",
            transform=BytesTransform(spec, training),
            shuffle=training,
            persistent_workers=args.workers > 0,
            **common,
        )
        baseline_tf = build_transform(spec, training, use_prefetcher=False)  # float, normalized per image
        folder = ImageFolder(str(src / "train"), transform=baseline_tf)
        baseline = DataLoader(
            Subset(folder, range(len(folder))),
            shuffle=training,
            persistent_workers=args.workers > 0,
            **common,
        )
        per_worker = max(1, args.workers)
        ours_rate = _images_per_second(ours, args.runs) / per_worker
        base_rate = _images_per_second(baseline, args.runs) / per_worker
        result[f"{name}_ours_images_per_s_per_worker"] = round(ours_rate, 1)
        result[f"{name}_imagefolder_images_per_s_per_worker"] = round(base_rate, 1)
        result[f"{name}_ratio"] = round(ours_rate / base_rate, 3)
    result["ratio"] = result["train_ratio"]
    return result


def gpu_figures(args: argparse.Namespace, src: Path, mds: Path) -> dict[str, Any]:
    from usi_composer.config import load_config
    from usi_composer.data.loaders import build_gpu_pipeline

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    result.update(decode_figures(src, args.image_size, args.batch_size, device))
    cfg = load_config(
        REPO / "yamls" / "usi.yaml",
        [
            f"model.name={args.student}",
            f"data.image_size={args.image_size}",
            f"data.gpu_decode={bool(args.gpu_decode)}",
        ],
    )
    pipeline = build_gpu_pipeline(cfg, TransformSpec.from_data(cfg.data))  # timm's ImageNet mean/std
    loader = _gpu_loader(args, mds, pipeline.train_sample, device)
    result["gpu_pipeline_images_per_s"] = round(_images_per_second(loader, args.runs, pipeline.train_device, device), 1)
    batches = [(images, labels.to(device)) for images, labels in _gpu_loader(args, mds, pipeline.train_sample, device)]
    result["device_transform_images_per_s"] = round(
        _images_per_second(batches, args.runs, pipeline.train_device, device), 1
    )
    if args.steps:
        result.update(train_figures(args, mds, device))
    return result


def _gpu_loader(args: argparse.Namespace, mds: Path, transform: Any, device: torch.device) -> Any:
    from usi_composer.data.gpu_pipeline import collate_encoded

    return streaming_dataloader(
        remote=None,
        local=str(mds),
        split="train",
        transform=transform,
        batch_size=args.batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        pin_memory=device.type == "cuda",
        persistent_workers=args.workers > 0,
        collate_fn=collate_encoded,
    )


def decode_figures(src: Path, image_size: int, batch_size: int, device: torch.device) -> dict[str, float]:
    """Milliseconds per image, one thread: decode_jpeg (CPU, full size), PIL full size, PIL at the
    reduced size of a random-resized crop box (the CPU path's draft decode), nvJPEG on CUDA.

    Per image, the CPU decoders take turns (5 rounds) and each keeps its fastest time: on a shared
    machine the minimum is the figure least inflated by other jobs. The mean over the images."""
    from usi_composer.data.draws import draw_sample, sample_rng

    datas = [f.read_bytes() for f in sorted((src / "train").glob("*/*"))[:64]]
    datas = [d for d in datas if Image.open(io.BytesIO(d)).mode in ("RGB", "L")]
    payloads = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    spec = TransformSpec.from_data(DataConfig(image_size=image_size))
    sizes = [Image.open(io.BytesIO(d)).size for d in datas]
    boxes = [draw_sample(sample_rng(0, 0, i), size, spec).crop for i, size in enumerate(sizes)]

    def pil_draft(i: int) -> None:
        img = Image.open(io.BytesIO(datas[i]))
        (full_w, full_h), (_, _, height, width) = sizes[i], boxes[i]
        img.draft(None, (math.ceil(full_w * image_size / width), math.ceil(full_h * image_size / height)))
        img.convert("RGB")

    decoders = {
        "decode_ms_decode_jpeg_cpu": lambda i: decode_jpeg(payloads[i], mode=ImageReadMode.RGB),
        "decode_ms_pil_full": lambda i: Image.open(io.BytesIO(datas[i])).convert("RGB"),
        "decode_ms_pil_draft_crop_box": pil_draft,
    }
    best = {name: [math.inf] * len(datas) for name in decoders}
    for _ in range(5):
        for i in range(len(datas)):
            for name, decode in decoders.items():
                start = time.perf_counter()
                decode(i)
                best[name][i] = min(best[name][i], time.perf_counter() - start)
    figures = {name: round(1000 * statistics.mean(t), 3) for name, t in best.items()}
    if device.type == "cuda":  # nvJPEG on whole batches, synchronized: the median of 5 passes
        times = []
        for run in range(6):
            start = time.perf_counter()
            for first in range(0, len(payloads), batch_size):
                decode_jpeg(payloads[first : first + batch_size], mode=ImageReadMode.RGB, device=device)
            torch.cuda.synchronize()
            if run:  # the first pass warms up nvJPEG
                times.append(time.perf_counter() - start)
        figures["decode_ms_nvjpeg_batched"] = round(1000 * statistics.median(times) / len(datas), 4)
    return figures


def train_figures(args: argparse.Namespace, mds: Path, device: torch.device) -> dict[str, float]:
    """The recipe's step fed by the gpu pipeline from MDS vs by uint8 batches already on the device
    (``train_step.py``'s synthetic run); images per second over the steps after ``--warmup``."""
    sys.path.insert(0, str(Path(__file__).parent))
    import train_step

    from usi_composer import builders
    from usi_composer.data.mds import read_classes_json

    wnids = read_classes_json(None, str(mds))  # the shards' classes (checked against data.num_classes)
    assert wnids is not None  # convert_imagenet writes classes.json
    step_args = argparse.Namespace(
        student=args.student,
        teacher=args.teacher,
        image_size=args.image_size,
        batch_size=args.batch_size,
        num_classes=len(wnids),
        steps=args.steps,
        warmup=args.warmup,
        profile=False,
        device=device,
        set=["trainer.progress_bar=false"],
    )
    real_data = [
        f"data.local={mds}",
        "data.streaming.val_split=null",
        "data.pipeline=gpu",
        f"data.gpu_decode={bool(args.gpu_decode)}",
        f"data.num_workers={args.workers}",
    ]
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = str(Path(tmp) / "teacher.pt")
        train_step.teachers(step_args, checkpoint)
        meter = train_step.run_ours(step_args, train_step.recipe_config(step_args, checkpoint))
        figures["train_images_per_s_synthetic"] = args.batch_size / _mean_step_s(meter)
        cfg = train_step.recipe_config(
            argparse.Namespace(**{**vars(step_args), "set": step_args.set + real_data}), checkpoint
        )
        meter = train_step.Meter(step_args)
        trainer = builders.build_trainer(
            cfg, callbacks=[train_step._MeterCallback(meter)], loggers=[train_step.console_on_stderr()]
        )
        meter.step_end()  # the first step's start
        trainer.fit()
        trainer.close()
        figures["train_images_per_s_real"] = args.batch_size / _mean_step_s(meter)
    figures["train_real_vs_synthetic"] = figures["train_images_per_s_real"] / figures["train_images_per_s_synthetic"]
    return {k: round(v, 3) for k, v in figures.items()}


def _mean_step_s(meter: Any) -> float:
    """Mean seconds per step after the warm-up steps (data stalls count: no median here)."""
    ends = meter.ends[meter.args.warmup :]
    return (ends[-1] - ends[0]) / (len(ends) - 1)


if __name__ == "__main__":
    sys.exit(main())
