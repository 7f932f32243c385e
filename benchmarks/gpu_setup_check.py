"""gpu_check.sh's setup step, after the install: every import the checks need (the benchmarks' too),
the versions in use (and the machine's own where .site/ shadows it: the next reading of
gpu-machine.txt), MDS shards written and read back with this numpy and streaming, and a CUDA device.

    python benchmarks/gpu_setup_check.py [--allow-no-cuda]

The sample is ``$USI_IMAGENET_SAMPLE`` (gpu_check.sh sets it). ``--allow-no-cuda`` (gpu_check.sh
--rehearse): no CUDA device is not an error. Exit 1 on a failed check, with one ``error:`` line.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import importlib.util
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
MODULES = ("composer", "streaming", "omegaconf", "timm", "torchvision", "pytest", "sklearn", "usi_composer.training")
# the steps' scripts, loaded as modules (their imports run, their main does not)
SCRIPTS = ("train_step.py", "dataloader.py")
VERSIONS = (
    "torchvision",
    "numpy",
    "timm",
    "mosaicml",
    "mosaicml-streaming",
    "omegaconf",
    "torchmetrics",
    "transformers",
    "huggingface-hub",
    "setuptools",
    "pytest",
)
MDS_IMAGES = 16  # the sample's first classes, one image each: seconds


def _version_line(name: str, site: Path | None) -> str:
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return f"version: {name} missing"
    where = Path(str(dist.locate_file(""))).resolve()
    if site is None or where != site:
        return f"version: {name} {dist.version}"
    # the carried one shadows the machine's: say which the machine has, for gpu-machine.txt
    others = [p for p in sys.path if p and Path(p).resolve() != site]
    own = next((d.version for d in metadata.distributions(name=name, path=others)), "none")
    return f"version: {name} {dist.version} (carried in .site/; the machine's own: {own})"


def check_imports() -> list[str]:
    missing = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ImportError as e:
            missing.append(f"{name} ({e})")
    try:
        importlib.import_module("timm.task")
    except ImportError:  # a warning: only train_step.py needs it, the other steps can still run
        print("warning: this timm has no timm.task (timm >= 1.0.23): train_step.py will fail (make gpu-wheels)")
        return missing
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their neighbour _common
    for script in SCRIPTS:
        spec = importlib.util.spec_from_file_location(f"gpu_check_{Path(script).stem}", BENCHMARKS / script)
        try:
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except Exception as e:  # any failure to import a script fails its step
            missing.append(f"benchmarks/{script} ({type(e).__name__}: {e})")
    return missing


def mds_round_trip(sample: Path, count: int = MDS_IMAGES) -> str:
    """Convert ``count`` images of ``sample`` to MDS and read them back through the recipe's loader:
    the bytes and labels must come back unchanged (streaming 0.13 declares numpy<2.2)."""
    import numpy as np
    import streaming

    from usi_composer.data.convert import convert_imagenet
    from usi_composer.data.mds import streaming_dataloader

    classes = sorted(p for p in (sample / "train").iterdir() if p.is_dir())[:count]
    with tempfile.TemporaryDirectory() as tmp:
        for folder in classes:
            shutil.copytree(folder, Path(tmp, "src", "train", folder.name))
        convert_imagenet(Path(tmp, "src"), str(Path(tmp, "mds")), splits=["train"], workers=1, progress=False)
        loader = streaming_dataloader(
            remote=None,
            local=str(Path(tmp, "mds")),
            split="train",
            transform=lambda data, rng: data,
            batch_size=len(classes),
            shuffle=False,
            drop_last=False,
            num_workers=0,
            pin_memory=False,
            collate_fn=list,
        )
        read = sorted((label, data) for batch in loader for data, label in batch)
        del loader
    written = sorted((label, f.read_bytes()) for label, folder in enumerate(classes) for f in folder.iterdir())
    if read != written:
        raise RuntimeError(f"{len(read)} samples read back, {len(written)} written, or their bytes or labels differ")
    return (
        f"mds: {len(read)} images written and read back unchanged with numpy {np.__version__} "
        f"and streaming {streaming.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--allow-no-cuda", action="store_true", help="no CUDA device is not an error (a rehearsal)")
    args = parser.parse_args(argv)
    site = Path(os.environ["SITE"]).resolve() if os.environ.get("SITE") else None

    missing = check_imports()
    import torch

    print(
        f"python {platform.python_version()} ({sys.executable}), torch {torch.__version__}, CUDA {torch.version.cuda}"
    )
    for name in VERSIONS:
        print(_version_line(name, site))
    if missing:
        print("error: cannot import " + "; ".join(missing) + ": add its wheel to .whl/ (make gpu-wheels)")
        return 1
    sample = Path(os.environ.get("USI_IMAGENET_SAMPLE", ""))
    if not (sample / "train").is_dir():
        print("error: no sample ($USI_IMAGENET_SAMPLE): bash benchmarks/gpu_check.sh --pack-sample")
        return 1
    try:
        print(mds_round_trip(sample))
    except Exception as e:  # the one line names any failure
        print(f"error: MDS shards of the sample could not be written and read back: {type(e).__name__}: {e}")
        return 1
    if torch.cuda.is_available():
        print(f"device: {torch.cuda.get_device_name()}")
        return 0
    print("device: no CUDA device")
    if args.allow_no_cuda:
        print("rehearsal: no CUDA here: the steps that need it report 'skipped: no CUDA'")
        return 0
    print(
        "error: no CUDA device here: the GPU tests would skip and the benchmarks measure the CPU "
        "(--rehearse runs what needs no CUDA; --dry-run checks the plan)"
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
