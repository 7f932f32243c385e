"""Data: datasets, USI's transforms and the device-side normalization."""

from usi_composer.data.digits import export_digits
from usi_composer.data.folder import folder_dataloader
from usi_composer.data.transforms import DeviceNormalize, build_bytes_transform, build_transform

__all__ = ["DeviceNormalize", "build_bytes_transform", "build_transform", "export_digits", "folder_dataloader"]
