"""The detection dataset: stateless items keyed by (epoch, index), and the batch collation.

An item is a pure function of (dataset seed, epoch, index): its random decisions come from a
generator built from exactly those three numbers, never from a global RNG or from state left by an
earlier call. That is what makes a resumed run, any worker count and any loading order produce the
same bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from ..config import AugmentConfig
from . import augment as aug
from .coco import coco_gt
from .records import ImageRecord, Split, fingerprint

_ITEM_STREAM = 0x17E4  # spawn-key tag: item augmentation (the sampler uses another tag)


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one item; `seed % 2**64` because SeedSequence wants non-negative entropy."""
    return np.random.default_rng(np.random.SeedSequence(seed % 2**64, spawn_key=(_ITEM_STREAM, epoch, index)))


# Per process (each data-loader worker holds its own): small datasets stay fully decoded.
DECODED_CACHE_BYTES = 128 << 20


class DetectionDataset(Dataset):
    """Letterboxed (val) or augmented (train) images with their boxes, addressed by (epoch, index)."""

    def __init__(
        self, split: Split, imgsz: int, augment: AugmentConfig | None = None, seed: int = 0, epochs: int = 1
    ) -> None:
        self.split = split
        self.imgsz = imgsz
        self.augment = augment
        self.seed = seed
        self.epochs = epochs
        # Decoded, resized images, most recently used last. Decoding is a pure function of the file,
        # so the cache changes no output; it spares re-decoding the 3 mosaic partners of each item.
        self._decoded: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._decoded_bytes = 0

    @property
    def names(self) -> list[str]:
        return self.split.names

    @property
    def records(self) -> list[ImageRecord]:
        return self.split.records

    @property
    def class_to_category(self) -> list[int]:
        return self.split.class_to_category

    def __len__(self) -> int:
        return len(self.split.records)

    def coco_gt(self) -> COCO:
        return coco_gt(self.split)

    def fingerprint(self) -> str:
        return fingerprint(self.split)

    def mosaic_enabled(self, epoch: int) -> bool:
        """Mosaic is off for the last `close_mosaic` epochs (and for val)."""
        cfg = self.augment
        return cfg is not None and cfg.mosaic > 0 and epoch < self.epochs - cfg.close_mosaic

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = (0, key) if isinstance(key, (int, np.integer)) else key
        epoch, index = int(epoch), int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} images")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if self.augment is None:
            img, boxes, cls = self._letterboxed(index)
        else:
            img, boxes, cls = self._augmented(epoch, index)
        rec = self.records[index]
        ratio, _, _, left, top = aug.letterbox_geometry(rec.width, rec.height, self.imgsz)
        return {
            "img": torch.from_numpy(np.ascontiguousarray(img[:, :, ::-1].transpose(2, 0, 1))),  # BGR -> RGB CHW
            "cls": torch.from_numpy(cls.astype(np.float32).reshape(-1, 1)),
            "bboxes": torch.from_numpy(_xyxy_to_normalized_xywh(boxes, self.imgsz)),
            "image_id": rec.image_id,
            "ori_shape": (rec.height, rec.width),
            # The plain letterbox mapping (exact for val items; train items are augmented beyond it).
            "ratio_pad": (ratio, (float(left), float(top))),
        }

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image resized to long side imgsz, with its boxes in the resized pixels (read-only arrays)."""
        if index in self._decoded:
            self._decoded.move_to_end(index)
            return self._decoded[index]
        rec = self.records[index]
        img, ratio = aug.resize_long_side(aug.decode(rec), self.imgsz)
        loaded = (img, rec.boxes * np.float32(ratio), rec.cls)
        for array in loaded:
            array.flags.writeable = False  # shared through the cache: an in-place edit would leak
        self._decoded[index] = loaded
        self._decoded_bytes += img.nbytes
        while self._decoded_bytes > DECODED_CACHE_BYTES and len(self._decoded) > 1:
            _, (old, _, _) = self._decoded.popitem(last=False)
            self._decoded_bytes -= old.nbytes
        return loaded

    def _letterboxed(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        img, boxes, cls = self._load(index)
        h, w = img.shape[:2]
        left, top = (self.imgsz - w) // 2, (self.imgsz - h) // 2
        return aug.pad_to_square(img, self.imgsz), boxes + np.float32([left, top, left, top]), cls

    def _augmented(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cfg = self.augment
        assert cfg is not None
        p = aug.draw_params(item_rng(self.seed, epoch, index), len(self), cfg)
        if self.mosaic_enabled(epoch) and p.mosaic_u < cfg.mosaic:
            tiles = [self._load(i) for i in (index, *p.partners)]
            img, boxes, cls = aug.mosaic(tiles, self.imgsz, p.center)
        else:
            img, boxes, cls = self._load(index)
        matrix = aug.affine_matrix(img.shape[1], img.shape[0], self.imgsz, p.scale, p.translate, p.flip)
        img = aug.hsv_jitter(aug.warp(img, matrix, self.imgsz), p.hsv)
        moved = aug.transform_boxes(boxes, matrix, self.imgsz)
        keep = aug.keep_boxes(boxes, moved, p.scale)
        return img, moved[keep], cls[keep]


def _xyxy_to_normalized_xywh(boxes: np.ndarray, imgsz: int) -> np.ndarray:
    out = np.empty((len(boxes), 4), np.float32)
    out[:, 0] = (boxes[:, 0] + boxes[:, 2]) / 2
    out[:, 1] = (boxes[:, 1] + boxes[:, 3]) / 2
    out[:, 2] = boxes[:, 2] - boxes[:, 0]
    out[:, 3] = boxes[:, 3] - boxes[:, 1]
    return out / np.float32(imgsz)


def collate_fn(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack images, concatenate targets with `batch_idx` (the layout v8DetectionLoss reads)."""
    return {
        "img": torch.stack([it["img"] for it in items]),
        "cls": torch.cat([it["cls"] for it in items]),
        "bboxes": torch.cat([it["bboxes"] for it in items]),
        "batch_idx": torch.cat(
            [torch.full((len(it["cls"]),), float(i), dtype=torch.float32) for i, it in enumerate(items)]
        ),
        "image_id": [it["image_id"] for it in items],
        "ori_shape": [it["ori_shape"] for it in items],
        "ratio_pad": [it["ratio_pad"] for it in items],
    }
