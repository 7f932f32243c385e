"""Loader throughput: our MDS pipeline vs torchvision ImageFolder + timm's create_transform.

    python benchmarks/dataloader.py                      # the 1000 images of ../shared/data/imagenet-sample
    python benchmarks/dataloader.py --limit 64 --image-size 64 --runs 1   # seconds-long smoke run

Prints ONE JSON line. Throughput is images per second per loader worker process, the median
of ``--runs`` full passes after one warm-up pass, same JPEGs, same augmentation (USI's
RandomResizedCrop bicubic + flip + RandAugment rand-m7-mstd0.5-inc1), same worker count and
batch size. The baseline is timm's standard CPU pipeline (float tensor, normalized per image);
ours yields uint8 and normalizes on the device, as training does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, Subset
from torchvision.datasets import ImageFolder

from usi_composer.data.convert import convert_imagenet
from usi_composer.data.mds import streaming_dataloader
from usi_composer.data.transforms import build_bytes_transform

REPO = Path(__file__).resolve().parents[1]
AUGMENT = dict(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, interpolation="bicubic", crop_pct=0.95)
RAND_AUGMENT = "rand-m7-mstd0.5-inc1"


def _images_per_second(loader, runs: int) -> float:
    rates = []
    for run in range(runs + 1):  # the first pass warms up workers, page cache and imports
        start, n = time.perf_counter(), 0
        for images, _ in loader:
            n += len(images)
        if run:
            rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default=str(REPO / ".." / "shared" / "data" / "imagenet-sample"))
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--workers", type=int, default=1, help="loader worker processes (both pipelines)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--runs", type=int, default=3, help="timed passes (after one warm-up pass)")
    p.add_argument("--limit", type=int, default=0, help="use only the first N images (0 = all)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    src = Path(args.src)
    work = Path(tempfile.mkdtemp(prefix="usi-bench-"))
    try:
        if args.limit:  # a smaller ImageNet folder with the first N images
            for f in sorted((src / "train").glob("*/*"))[: args.limit]:
                (work / "src" / "train" / f.parent.name).mkdir(parents=True, exist_ok=True)
                (work / "src" / "train" / f.parent.name / f.name).symlink_to(f.resolve())
            src = work / "src"
        (stats,) = convert_imagenet(src, str(work / "mds"), splits=["train"], workers=2, progress=False)
        common = dict(batch_size=args.batch_size, num_workers=args.workers, pin_memory=False, drop_last=False)
        result: dict[str, float | int | str] = {
            "images": stats.written,
            "image_size": args.image_size,
            "workers": args.workers,
            "converter_images_per_s": round(stats.images_per_second, 1),
        }
        for name, training in (("train", True), ("val", False)):
            aug = dict(auto_augment=RAND_AUGMENT, **AUGMENT) if training else dict(AUGMENT)
            ours = streaming_dataloader(
                remote=None,
                local=str(work / "mds"),
                split="train",
                transform=build_bytes_transform(args.image_size, training, **aug),
                shuffle=training,
                persistent_workers=args.workers > 0,
                **common,
            )
            timm_aug = {k: v for k, v in aug.items() if k != "crop_pct" or not training}
            baseline_tf = create_transform(args.image_size, is_training=training, color_jitter=None, **timm_aug)
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
        print(json.dumps(result))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
