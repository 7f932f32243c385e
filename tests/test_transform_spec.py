"""The one transform spec: its values come from ``DataConfig`` and the student's normalization, what
follows from them is timm's, and one spec object drives every transform of a run."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, RandAugment
from torchvision.transforms import CenterCrop, Resize

from usi_composer.config import DataConfig, load_config
from usi_composer.data.draws import sample_rng
from usi_composer.data.gpu_pipeline import DeviceTransform, EncodedSample, collate_encoded
from usi_composer.data.loaders import build_dataloaders
from usi_composer.data.spec import TransformSpec
from usi_composer.data.transforms import BytesTransform, build_transform
from usi_composer.plan import resolve

STUDENT_MEAN, STUDENT_STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def test_the_spec_has_no_defaults_of_its_own_and_takes_the_data_configs() -> None:
    for f in dataclasses.fields(TransformSpec):
        if f.init:
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, f.name
    data = DataConfig(
        image_size=40,
        crop_pct=0.8,
        interpolation="bilinear",
        scale=[0.3, 0.9],
        ratio=[0.5, 2.0],
        hflip=0.25,
        auto_augment="rand-m9-mstd0.5",
        max_image_pixels=1234,
    )
    spec = TransformSpec.from_data(data)
    for f in dataclasses.fields(TransformSpec):
        if f.init and f.name not in ("mean", "std"):
            expected = getattr(data, f.name)
            assert getattr(spec, f.name) == (tuple(expected) if isinstance(expected, list) else expected), f.name
    assert spec.randaugment is not None and spec.randaugment.magnitude == 9.0
    # mean/std: the student's, else data.mean/std, else timm's ImageNet defaults (resolve_data_config)
    assert (spec.mean, spec.std) == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    assert TransformSpec.from_data(DataConfig(mean=[0.1, 0.2, 0.3], std=[1, 1, 1])).mean == (0.1, 0.2, 0.3)
    student = TransformSpec.from_data(DataConfig(mean=[0.1, 0.2, 0.3]), mean=STUDENT_MEAN, std=STUDENT_STD)
    assert (student.mean, student.std) == (STUDENT_MEAN, STUDENT_STD)


@pytest.mark.parametrize(("image_size", "crop_pct"), [(224, 0.95), (224, 0.875), (24, 0.95), (37, 0.9), (64, 1.0)])
def test_derived_values_are_timms(image_size: int, crop_pct: float) -> None:
    """The eval size is timm's Resize target and the RandAugment fill timm's img_mean: a timm
    change shows here."""
    spec = TransformSpec.from_data(DataConfig(image_size=image_size, crop_pct=crop_pct), mean=STUDENT_MEAN)
    steps = build_transform(spec, False).transforms
    (resize,) = [s for s in steps if isinstance(s, Resize)]
    (crop,) = [s for s in steps if isinstance(s, CenterCrop)]
    assert resize.size in (spec.eval_size, [spec.eval_size], (spec.eval_size, spec.eval_size))
    assert tuple(crop.size) == (image_size, image_size)
    (ra,) = [s for s in build_transform(spec, True).transforms if isinstance(s, RandAugment)]
    assert ra.ops[0].kwargs["fillcolor"] == spec.fill == (128, 102, 76)


def test_random_interpolation_evaluates_bicubic_on_both_pipelines(imagenet_sample: Path) -> None:
    """``data.interpolation=random`` is a per-sample training draw; evaluation resizes bicubic, on the
    CPU path (timm's eval transform has no 'random') as on the device."""
    datas = [f.read_bytes() for f in sorted(imagenet_sample.glob("*/*.JPEG"))[:3]]
    drawn, bicubic = (
        TransformSpec.from_data(DataConfig(image_size=32, interpolation=i)) for i in ("random", "bicubic")
    )
    for data in datas:
        cpu = BytesTransform(drawn, training=False)(data, sample_rng(0, 0, 0))
        assert torch.equal(cpu, BytesTransform(bicubic, training=False)(data, sample_rng(0, 0, 0)))

    def device(spec: TransformSpec) -> torch.Tensor:
        sample = EncodedSample(spec, training=False)
        return DeviceTransform(spec, training=False)(collate_encoded([(sample(d), 0) for d in datas]))[0]

    assert torch.equal(device(drawn), device(bicubic))


@pytest.mark.parametrize("pipeline", ["cpu", "gpu"])
def test_one_spec_from_the_config_and_the_student_drives_every_transform(
    repo: Path, imagenet_sample: Path, pipeline: str
) -> None:
    cfg = load_config(
        repo / "yamls" / "usi.yaml",
        [
            "model.name=resnet10t",
            f"data.train_dir={imagenet_sample}",
            f"data.val_dir={imagenet_sample}",
            "data.image_size=32",
            "data.crop_pct=0.875",
            "data.hflip=0.0",
            f"data.pipeline={pipeline}",
            "data.num_workers=0",
        ],
    )
    plan = dataclasses.replace(resolve(cfg), student_mean=tuple(STUDENT_MEAN), student_std=tuple(STUDENT_STD))
    train, val = build_dataloaders(cfg, plan)
    assert val is not None
    transforms = [train.dataloader.dataset.transform, val.dataloader.dataset.transform]
    if pipeline == "gpu":
        transforms += [train.microbatch_transforms, val.microbatch_transforms]
    spec = transforms[0].spec
    assert all(t.spec is spec for t in transforms)
    assert spec == TransformSpec.from_data(cfg.data, mean=STUDENT_MEAN, std=STUDENT_STD)
    assert (spec.image_size, spec.eval_size, spec.hflip) == (32, 36, 0.0)
