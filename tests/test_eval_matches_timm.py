"""The numbers users compare: the recipe's evaluation (training's and ``usi-eval``) sees timm's eval pixels
of an export, at every size, on real JPEGs. Training crops keep the reduced-size decode
(``data.streaming.fast_decode``); evaluation decodes at full size, as timm does."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from helpers import REPO, make_imagenet, sample_files
from usi_composer.cli import eval as eval_cli
from usi_composer.cli import export as export_cli
from usi_composer.config import DataConfig, load_config
from usi_composer.data.draws import sample_rng
from usi_composer.data.gpu_pipeline import HEIGHT, WIDTH, EncodedSample
from usi_composer.data.loaders import build_dataloaders
from usi_composer.data.spec import TransformSpec
from usi_composer.data.transforms import BytesTransform, decode_rgb
from usi_composer.plan import resolve

DEMO = str(REPO / "yamls" / "demo.yaml")


def timm_pixels(transform, image: Image.Image, mean, std) -> torch.Tensor:
    """timm's normalized eval tensor back to the uint8 pixels it was made from (exact: float error << 1/2)."""
    x = transform(image) * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return (x * 255).round().to(torch.uint8)


@pytest.mark.parametrize("size", [64, 224])
def test_eval_pixels_are_timms_eval_pixels_on_real_jpegs(size: int) -> None:
    """At 64 px the reduced-size decode changed 173 of 200 images (up to 130/255 in a pixel); now none."""
    spec = TransformSpec.from_data(DataConfig(image_size=size, crop_pct=0.875, interpolation="bicubic"))
    config = {"input_size": (3, size, size), "crop_pct": 0.875, "interpolation": "bicubic"}
    timm_eval = create_transform(**resolve_data_config({**config, "mean": spec.mean, "std": spec.std}))
    ours = BytesTransform(spec, training=False, fast=True)  # fast_decode=true, the default: training crops only
    worker = EncodedSample(spec, training=False, decode_on_device=False)  # data.pipeline=gpu, gpu_decode=false
    files = sample_files()[::20]  # 50 JPEGs of 50 classes, sizes and aspect ratios as ImageNet's
    for f in files:
        data = f.read_bytes()
        reference = timm_pixels(timm_eval, Image.open(f).convert("RGB"), spec.mean, spec.std)
        assert torch.equal(ours(data, sample_rng(0, 0, 0)), reference), f.name
        payload, row = worker(data)
        full = np.array(decode_rgb(data))
        assert (row[HEIGHT], row[WIDTH]) == full.shape[:2], f"{f.name}: decoded at reduced size for evaluation"
        assert torch.equal(payload, torch.from_numpy(full.reshape(-1))), f.name


@pytest.fixture(scope="module")
def sample_with_val(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """50 classes of the ImageNet sample as train/ and the same JPEGs as val/ (the sample has no val split)."""
    root = make_imagenet(tmp_path_factory.mktemp("sample-val"), n_classes=50, start=500)
    shutil.copytree(root / "train", root / "val")
    return root


def call(main, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_usi_eval_equals_timms_eval_of_the_export_at_64_px(
    sample_with_val: Path, saved_teacher, tmp_path: Path
) -> None:
    """usi-export, then usi-eval and a plain timm evaluation of the export (the model and its eval transform
    from the folder alone, a loop over the val folder): the same top-1 and top-5, and the recipe's eval
    loader (fast_decode on) yields exactly timm's pixels for every image."""
    overrides = [
        f"data.train_dir={sample_with_val / 'train'}",
        f"data.val_dir={sample_with_val / 'val'}",
        "data.local=null",
        "data.num_classes=50",
        "data.image_size=64",
        "data.crop_pct=0.875",
        "data.interpolation=bicubic",
        "data.streaming.fast_decode=true",
        "algorithms.distillation.enabled=false",
        "trainer.eval_batch_size=16",
    ]
    weights = saved_teacher("resnet10t", 50)  # fixed weights: the comparison needs no training
    folder = tmp_path / "export"
    code, _, err = call(export_cli.main, DEMO, *overrides, "--checkpoint", str(weights), "--out", str(folder))
    assert code == 0, err
    metrics = tmp_path / "metrics.json"
    code, _, err = call(eval_cli.main, DEMO, *overrides, "--checkpoint", str(folder), "--metrics-out", str(metrics))
    assert code == 0, err
    recipe = json.loads(metrics.read_text())

    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    data_config = resolve_data_config(model=model)
    transform = create_transform(**data_config)
    val = sample_with_val / "val"
    classes = sorted(p.name for p in val.iterdir())
    files = sorted(val.glob("*/*.JPEG"))
    images = [Image.open(f).convert("RGB") for f in files]
    with torch.no_grad():
        logits = model(torch.stack([transform(image) for image in images]))
    labels = torch.tensor([classes.index(f.parent.name) for f in files])
    top1 = float((logits.argmax(1) == labels).float().mean())
    top5 = float((logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean())
    print(
        f"64 px, {len(files)} images: usi-eval top-1 {recipe['metrics/eval/top1']:.4f} top-5 "
        f"{recipe['metrics/eval/top5']:.4f}; timm top-1 {top1:.4f} top-5 {top5:.4f}"
    )
    assert recipe["samples"] == len(files) == 50
    assert recipe["metrics/eval/top1"] == pytest.approx(top1, abs=1e-6)
    assert recipe["metrics/eval/top5"] == pytest.approx(top5, abs=1e-6)

    cfg = load_config(DEMO, overrides)
    _, loader = build_dataloaders(cfg, resolve(cfg))
    assert loader is not None
    pixels = torch.cat([images for images, _ in loader.dataloader])  # uint8, before the device normalizes
    reference = torch.stack(
        [timm_pixels(transform, image, data_config["mean"], data_config["std"]) for image in images]
    )
    assert torch.equal(pixels, reference), f"{int((pixels != reference).flatten(1).any(1).sum())} images differ"
