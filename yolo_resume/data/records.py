"""What a loaded split is: per-image records plus what evaluation and fingerprinting need.

Both loaders (COCO and YOLO) produce a `Split`; everything downstream (augmentation, the
dataset, evaluation) only sees this format, so the two layouts behave identically.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError


@dataclass
class ImageRecord:
    """One image: where it is, its size, and its training targets in original pixels."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float32 xyxy, clipped to the image, positive size
    cls: np.ndarray  # (n,) int64 contiguous class ids
    image_id: int
    file_size: int = 0  # bytes on disk: part of the fingerprint, read once at load time
    mtime_ns: int = 0  # modification time: part of the `stat` fingerprint
    content: str = ""  # sha256 of the file, with `data.fingerprint: content` (cached in the dataset index)


@dataclass
class Split:
    """A loaded train or val split."""

    names: list[str]
    records: list[ImageRecord]
    class_to_category: list[int]  # contiguous class id -> COCO category id of `coco_gt`
    base: Path  # image paths are fingerprinted relative to this folder
    label_digest: str  # sha256 of the annotation / label contents the records came from
    coco_json: Path | None = None  # coco: the ground truth file; None: built from the records
    report: Any = None  # the up-front check's findings (check.CheckReport)
    label_files: dict[str, str] = field(default_factory=dict)  # yolo: label path (relative) -> sha256


def empty_targets() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)


def clip_boxes(boxes: np.ndarray, cls: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip xyxy boxes to the image and drop those left with no area."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    cls = np.asarray(cls, np.int64).reshape(-1)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], cls[keep]


def file_size(path: Path, what: str) -> int:
    """Size of an image file, or a DataError naming it (a missing image fails at load, not mid-epoch)."""
    try:
        return path.stat().st_size
    except OSError:
        raise DataError(f"{what} `{path}` not found; check the dataset folder and the file name") from None


FINGERPRINT_SCHEMES = ("stat", "content")
FINGERPRINT_VERSION = "v2"  # before: sha256 over (path, size) only, without a scheme prefix


def fingerprint(split: Split, scheme: str = "stat") -> str:
    """sha256 over sorted (relative image path, size, and the mtime (`stat`) or the sha256 of the bytes
    (`content`)), the label contents and the class names."""
    if scheme not in FINGERPRINT_SCHEMES:
        raise ValueError(f"unknown fingerprint scheme {scheme!r}")
    third = (lambda r: r.mtime_ns) if scheme == "stat" else (lambda r: r.content)
    files = sorted((_rel(r.path, split.base), r.file_size, third(r)) for r in split.records)
    return _digest({"files": files, "labels": split.label_digest, "names": split.names})


def legacy_fingerprint(split: Split, label_digest: str | None = None) -> str:
    """The fingerprint yolo-resume 0.2 stored (paths and sizes only), to compare a checkpoint it wrote."""
    files = sorted((_rel(r.path, split.base), r.file_size) for r in split.records)
    return _digest({"files": files, "labels": label_digest or split.label_digest, "names": split.names})


def dataset_fingerprint(train: Split, val: Split, scheme: str) -> str:
    """What a checkpoint stores: `v2-<scheme>:<train>:<val>`."""
    return f"{FINGERPRINT_VERSION}-{scheme}:{fingerprint(train, scheme)}:{fingerprint(val, scheme)}"


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()
