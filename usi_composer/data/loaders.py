"""The run's dataloaders: MDS shards (streaming) or image folders, the CPU or the GPU pipeline, both
following one :class:`~usi_composer.data.spec.TransformSpec` made from ``cfg.data`` and the plan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from composer.core import DataSpec

from usi_composer.compilation import mark_batch_dynamic
from usi_composer.config import Config
from usi_composer.data.folder import folder_dataloader
from usi_composer.data.gpu_pipeline import DeviceTransform, EncodedSample, collate_encoded, num_samples, split_encoded
from usi_composer.data.mds import streaming_dataloader
from usi_composer.data.spec import TransformSpec
from usi_composer.data.transforms import BytesTransform, DeviceNormalize
from usi_composer.plan import RunPlan

__all__ = ["GPUPipeline", "build_dataloaders", "build_gpu_pipeline"]


def build_dataloaders(cfg: Config, plan: RunPlan) -> tuple[DataSpec, DataSpec | None]:
    """Train and eval ``DataSpec``s: MDS shards via streaming when ``data.remote`` or ``data.local``
    is set, else ImageNet folders. Both yield uint8 images; normalization runs on the device. The
    plan's student normalization and ``cfg.data`` make the one :class:`TransformSpec` both pipelines
    follow. Where the plan compiles, eval batches are marked dynamic in size, so the last, smaller one
    compiles nothing."""
    d = cfg.data
    spec = TransformSpec.from_data(d, mean=plan.student_mean, std=plan.student_std)
    # The samples' transform (data: bytes, rng) -> what the loader batches, the same for MDS and folders
    gpu = build_gpu_pipeline(cfg, spec) if d.pipeline == "gpu" else None
    if gpu is not None:
        samples = (gpu.train_sample, gpu.eval_sample)
    else:
        train = BytesTransform(spec, training=True, fast=d.streaming.fast_decode)  # reduced-size decode: crops only
        samples = (train, BytesTransform(spec, training=False))  # evaluation decodes at full size, as timm
    loader_args: dict[str, Any] = dict(
        num_workers=d.num_workers,
        pin_memory=d.pin_memory and torch.cuda.is_available(),
        persistent_workers=d.persistent_workers,
        seed=cfg.trainer.seed,  # keys each sample's random view: sample_rng(seed, epoch, index)
        collate_fn=collate_encoded if gpu is not None else None,
    )
    batch_sizes = (plan.per_process_batch, plan.eval_batch_size)
    train, val = (_mds_loaders if plan.streams else _folder_loaders)(cfg, plan, samples, batch_sizes, loader_args)
    if gpu is not None:
        train_transform, eval_transform = gpu.train_device, gpu.eval_device
    else:
        train_transform = eval_transform = DeviceNormalize(
            spec.mean, spec.std, channels_last=cfg.algorithms.channels_last
        )
    # gpu: the batch holds host-side encoded images, which Composer's default split/count cannot read
    split = dict(split_batch=split_encoded, get_num_samples_in_batch=num_samples) if gpu else {}
    train_spec = DataSpec(train, microbatch_transforms=train_transform, **split)
    if val is None:
        return train_spec, None
    if plan.compile:
        to_device = eval_transform
        eval_transform = lambda batch: mark_batch_dynamic(to_device(batch))  # noqa: E731
    return train_spec, DataSpec(val, microbatch_transforms=eval_transform, **split)


Loaders = tuple[Any, Any]  # the train loader, and the eval loader or None


def _mds_loaders(
    cfg: Config, plan: RunPlan, samples: tuple[Any, Any], batch_sizes: tuple[int, int], args: dict[str, Any]
) -> Loaders:
    d, s = cfg.data, cfg.data.streaming
    knobs: dict[str, Any] = dict(
        remote=d.remote,
        local=d.local,
        shuffle_algo=s.shuffle_algo,
        shuffle_seed=plan.shuffle_seed,
        shuffle_block_size=s.shuffle_block_size,
        num_canonical_nodes=s.num_canonical_nodes,
        predownload=s.predownload,
        cache_limit=s.cache_limit,
        download_timeout=s.download_timeout,
        download_retry=s.download_retry,
        validate_hash=plan.validate_hash,
        num_classes=d.num_classes,
        **args,
    )
    train = streaming_dataloader(
        split=s.train_split, transform=samples[0], batch_size=batch_sizes[0], shuffle=True, drop_last=True, **knobs
    )
    if s.val_split is None:
        return train, None
    val = streaming_dataloader(
        split=s.val_split, transform=samples[1], batch_size=batch_sizes[1], shuffle=False, drop_last=False, **knobs
    )
    return train, val


def _folder_loaders(
    cfg: Config, plan: RunPlan, samples: tuple[Any, Any], batch_sizes: tuple[int, int], args: dict[str, Any]
) -> Loaders:
    d = cfg.data
    assert d.train_dir is not None  # validated
    train = folder_dataloader(d.train_dir, samples[0], batch_sizes[0], shuffle=True, drop_last=True, **args)
    if d.val_dir is None:
        return train, None
    classes = train.dataset.classes  # val's labels are train's class indices
    val = folder_dataloader(
        d.val_dir, samples[1], batch_sizes[1], shuffle=False, drop_last=False, classes=classes, **args
    )
    return train, val


@dataclass
class GPUPipeline:
    """``data.pipeline=gpu``: the workers' sample transforms and the device transforms."""

    train_sample: EncodedSample
    eval_sample: EncodedSample
    train_device: DeviceTransform
    eval_device: DeviceTransform


def build_gpu_pipeline(cfg: Config, spec: TransformSpec) -> GPUPipeline:
    """``spec``'s transforms, split between the loader workers and the device (``cfg.data.gpu_decode``,
    ``cfg.algorithms.channels_last``)."""
    decode_on_device, channels_last = cfg.data.gpu_decode, cfg.algorithms.channels_last
    return GPUPipeline(
        train_sample=EncodedSample(spec, training=True, decode_on_device=decode_on_device),
        eval_sample=EncodedSample(spec, training=False, decode_on_device=decode_on_device),
        train_device=DeviceTransform(spec, training=True, channels_last=channels_last),
        eval_device=DeviceTransform(spec, training=False, channels_last=channels_last),
    )
