"""Data: datasets, USI's transforms and the device-side normalization."""

from usi_composer.data.digits import export_digits
from usi_composer.data.folder import folder_dataloader
from usi_composer.data.spec import TransformSpec
from usi_composer.data.transforms import BytesTransform, DeviceNormalize, build_transform

__all__ = [
    "BytesTransform",
    "DeviceNormalize",
    "TransformSpec",
    "build_transform",
    "export_digits",
    "folder_dataloader",
]
