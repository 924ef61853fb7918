"""Data pipeline: COCO / YOLO / synthetic loading, deterministic augmentation, resumable batch order.

Every item is a pure function of (seed, epoch, index) and the batch order a pure function of
(seed, epoch): resuming at batch k of epoch e needs nothing but those numbers.
"""

from __future__ import annotations

from pathlib import Path

from ..config import AugmentConfig, DataConfig
from ..errors import DataError
from .coco import load_coco_split
from .dataset import DetectionDataset, collate_fn, item_rng
from .records import FlatRecords, ImageRecord, Split
from .sampler import EpochBatchSampler, epoch_permutation
from .synthetic import SHAPES, ensure_synthetic, generate_synthetic
from .yolo import load_yolo_split

__all__ = [
    "SHAPES",
    "DetectionDataset",
    "EpochBatchSampler",
    "FlatRecords",
    "ImageRecord",
    "Split",
    "build_datasets",
    "check_dataset",
    "collate_fn",
    "ensure_synthetic",
    "epoch_permutation",
    "generate_synthetic",
    "item_rng",
    "load_split",
]


def load_split(data_cfg: DataConfig, split: str) -> Split:
    """Load and check the `train` or `val` split of the configured dataset (synthetic: generating it first)."""
    checks = {"on_bad_image": data_cfg.on_bad_image, "fingerprint": data_cfg.fingerprint}
    if data_cfg.format == "synthetic":
        root = ensure_synthetic(data_cfg)
        return load_coco_split(root, "", "", split, data_cfg.names, **checks)
    if data_cfg.format == "yolo":
        return load_yolo_split(data_cfg.root, getattr(data_cfg, split), split, data_cfg.names, **checks)
    if data_cfg.format == "coco":
        root = Path(data_cfg.root)
        return load_coco_split(
            root, getattr(data_cfg, split), getattr(data_cfg, f"{split}_images"), split, data_cfg.names, **checks
        )
    raise DataError(f"data.format must be coco, yolo or synthetic, got `{data_cfg.format}`")


def check_dataset(data_cfg: DataConfig) -> tuple[Split, Split]:
    """Both splits, loaded and checked (the check training runs before its first step); their classes agree."""
    train = load_split(data_cfg, "train")
    val = load_split(data_cfg, "val")
    if (val.names, val.class_to_category) != (train.names, train.class_to_category):
        raise DataError(
            f"the val split ({val.coco_json or data_cfg.val or 'val'}) has classes {val.names} but the "
            f"train split has {train.names}; both splits must use the same categories"
        )
    return train, val


def build_datasets(
    data_cfg: DataConfig, aug_cfg: AugmentConfig, imgsz: int, seed: int, epochs: int
) -> tuple[DetectionDataset, DetectionDataset]:
    """(train dataset with augmentation, val dataset without); both splits must share their classes."""
    train, val = check_dataset(data_cfg)
    return (
        DetectionDataset(train, imgsz, augment=aug_cfg, seed=seed, epochs=epochs),
        DetectionDataset(val, imgsz, augment=None, seed=seed, epochs=epochs),
    )
