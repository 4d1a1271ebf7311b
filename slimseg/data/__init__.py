"""Data: PaddleSeg dataset configs, transforms and datasets (list files, image folders)."""
from __future__ import annotations

from slimseg.data.config import DatasetConfig, DatasetSpec, load_dataset_config, parse_dataset_config
from slimseg.data.datasets import (ImageFolder, Sample, SegDataset, build_dataset, calibration_batches,
                                   collate, load_image, load_label)
from slimseg.data.transforms import TRANSFORMS, Compose, build_transforms, resize_image

__all__ = [
    "DatasetConfig", "DatasetSpec", "load_dataset_config", "parse_dataset_config",
    "ImageFolder", "Sample", "SegDataset", "build_dataset", "calibration_batches", "collate", "load_image", "load_label",
    "TRANSFORMS", "Compose", "build_transforms", "resize_image",
]
