"""The detection dataset: stateless items keyed by (epoch, index), and the batch collation.

An item is a pure function of (dataset seed, epoch, index): its random decisions come from a
generator built from exactly those three numbers, never from a global RNG or from state left by an
earlier call. That is what makes a resumed run, any worker count and any loading order produce the
same bytes.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import cv2
import numpy as np
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset, get_worker_info

from ..config import AugmentConfig
from . import augment as aug
from .coco import coco_gt
from .records import FlatRecords, ImageRecord, Split, fingerprint
from .sampler import epoch_permutation
from .shared_cache import SharedImageCache, shared_uint8

_ITEM_STREAM = 0x17E4  # spawn-key tag: item augmentation (the sampler uses another tag)


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one item; `seed % 2**64` because SeedSequence wants non-negative entropy."""
    return np.random.default_rng(np.random.SeedSequence(seed % 2**64, spawn_key=(_ITEM_STREAM, epoch, index)))


# Per process (each data-loader worker holds its own), for val items and uniform partners: a batch's
# images at 640 px take ~15 MB; small datasets stay fully decoded.
DECODED_CACHE_BYTES = 64 << 20
# Where the three mosaic partners of an item come from: `augment.mosaic_window`. N (default 128): uniformly
# from the other images of its block of the epoch's sample order (sampler.epoch_permutation, the order the
# batches are cut from), cut into near-equal blocks of about N positions (window_block). Over an epoch each image's
# partners are still uniform over the dataset (the order is a uniform permutation); within a batch the
# tiles come from N images, as ultralytics draws them from a buffer of its ~8 x batch most recently
# loaded images (a small window, e.g. 16 at batch 16, makes batches far less varied: measured lower mAP,
# BENCHMARKS.md). The block's images are decoded once into a cache every loader worker shares
# (shared_cache.py): ~1 decode per item. 0: uniformly from the whole dataset (on a split larger than the
# per-process cache each partner is a fresh decode: ~4 per item). Either way a pure function of
# (seed, epoch, index).


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
        # The records as columns: an item reads its sizes and boxes from them (no ImageRecord built per tile).
        records = split.records
        self._flat = records if isinstance(records, FlatRecords) else FlatRecords.from_records(records)
        # Decoded, resized images, most recently used last. Decoding is a pure function of the file,
        # so the cache changes no output; it spares re-decoding the 3 mosaic partners of each item.
        self._decoded_lru: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._decoded_bytes = 0
        # Windowed partners: one cache shared by all workers instead (made here, before they fork).
        self._shared = self._shared_cache()
        self._out: np.ndarray | None = None  # see _scratch
        self._order: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, order, position of each index)

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
        return self._item(key, torch.empty((3, self.imgsz, self.imgsz), dtype=torch.uint8))

    def __getitems__(self, keys: list) -> list[dict[str, Any]]:
        """A whole batch (the DataLoader's batched fetch): each image is written straight into its slot of
        one batch tensor, which `collate_fn` then takes as it is instead of stacking copies."""
        batch = _batch_tensor((len(keys), 3, self.imgsz, self.imgsz))
        return [self._item(key, batch[i]) for i, key in enumerate(keys)]

    def _item(self, key: tuple[int, int] | int, img_out: torch.Tensor) -> dict[str, Any]:
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
        planes = img_out.numpy()
        cv2.split(img, [planes[2], planes[1], planes[0]])  # BGR HWC -> RGB CHW in one pass, into img_out
        width, height = self._size(index)
        ratio, _, _, left, top = aug.letterbox_geometry(width, height, self.imgsz)
        return {
            "img": img_out,
            "cls": torch.from_numpy(cls.astype(np.float32).reshape(-1, 1)),
            "bboxes": torch.from_numpy(_xyxy_to_normalized_xywh(boxes, self.imgsz)),
            "image_id": int(self._flat.image_id[index]),
            "ori_shape": (height, width),
            # The plain letterbox mapping (exact for val items; train items are augmented beyond it).
            "ratio_pad": (ratio, (float(left), float(top))),
        }

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`_decoded(index)`, through this process's cache of recently decoded images."""
        if index in self._decoded_lru:
            self._decoded_lru.move_to_end(index)
            return self._decoded_lru[index]
        loaded = self._decoded(index)
        for array in loaded:
            array.flags.writeable = False  # shared through the cache: an in-place edit would leak
        self._decoded_lru[index] = loaded
        self._decoded_bytes += loaded[0].nbytes
        while self._decoded_bytes > DECODED_CACHE_BYTES and len(self._decoded_lru) > 1:
            _, (old, _, _) = self._decoded_lru.popitem(last=False)
            self._decoded_bytes -= old.nbytes
        return loaded

    def _decoded(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """BGR image resized to long side imgsz, with its boxes in the resized pixels."""
        return aug.load_resized(self.records[index], self.imgsz)[0], *self._targets(index)

    def _targets(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """An image's boxes in the pixels of its resized image (long side imgsz), and their classes."""
        ratio = aug.letterbox_geometry(*self._size(index), self.imgsz)[0]  # the ratio load_resized uses
        flat = self._flat
        lo, hi = flat.box_offsets[index], flat.box_offsets[index + 1]
        return flat.boxes[lo:hi] * np.float32(ratio), flat.cls[lo:hi]

    def _size(self, index: int) -> tuple[int, int]:
        """(width, height) of image `index`, as its record says."""
        return int(self._flat.width[index]), int(self._flat.height[index])

    def _letterboxed(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        img, boxes, cls = self._load(index)
        h, w = img.shape[:2]
        left, top = (self.imgsz - w) // 2, (self.imgsz - h) // 2
        return aug.pad_to_square(img, self.imgsz), boxes + np.float32([left, top, left, top]), cls

    def _augmented(self, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """BGR training image (in this process's scratch buffer, valid until the next item): mosaic (or
        the image alone), affine, flip and HSV, with its boxes."""
        cfg = self.augment
        assert cfg is not None
        p = aug.draw_params(item_rng(self.seed, epoch, index), cfg)
        mosaic = self.mosaic_enabled(epoch) and p.mosaic_u < cfg.mosaic
        indices = (index, *self.mosaic_partners(epoch, index, p.partner_u)) if mosaic else (index,)
        out = self._scratch()
        for shared in (self._shared is not None, False):
            tiles, leases = self._tiles(epoch, indices, shared)
            if mosaic:
                offsets = aug.mosaic_offsets([img.shape for img, _, _ in tiles], self.imgsz, p.center)
                canvas = (2 * self.imgsz, 2 * self.imgsz)
            else:
                offsets, canvas = [(0, 0)], (tiles[0][0].shape[1], tiles[0][0].shape[0])
            maps = aug.compose([t[0] for t in tiles], offsets, canvas, p.scale, p.translate, p.flip, out)
            if not leases or self._shared.unchanged(leases):
                break  # else another worker began rewriting a tile's slot while we read it: redo from our own decodes
        counts = [len(b) for _, b, _ in tiles]  # every tile's boxes at once, each row with its tile's offset and map
        boxes = aug.place_boxes(np.concatenate([b for _, b, _ in tiles]), np.repeat(offsets, counts, 0), canvas)
        moved = aug.transform_boxes(boxes, np.repeat(np.stack(maps), counts, 0), self.imgsz)
        cls = np.concatenate([c for _, _, c in tiles])
        keep = aug.keep_boxes(boxes, moved, p.scale)
        return aug.hsv_jitter(out, p.hsv), moved[keep], cls[keep]

    def _tiles(self, epoch: int, indices: tuple[int, ...], shared: bool) -> tuple[list, list[tuple[int, int]]]:
        """The decoded images of `indices` with their boxes, and the leases of those read from the shared
        cache (`shared`: windowed partners), else from this process's own cache."""
        if not shared:
            return [self._load(i) for i in indices], []
        assert self._shared is not None
        _, position = self._epoch_order(epoch)
        tiles, leases = [], []
        for i in indices:
            slot = int(position[i]) % self._shared.slots  # a window's images never share a slot (see shared_cache)
            got = self._shared.get(slot, i)
            if got is None:
                img, _, _ = loaded = self._decoded(i)
                got = self._shared.put(slot, i, img)
                if got is None:  # another worker is writing that slot: use our own copy
                    tiles.append(loaded)
                    continue
            img, lease = got
            tiles.append((img, *self._targets(i)))
            leases.append(lease)
        return tiles, leases

    def mosaic_partners(self, epoch: int, index: int, partner_u: tuple[float, ...]) -> tuple[int, ...]:
        """The other mosaic images of item (epoch, index), by the `augment.mosaic_window` rule."""
        n, window = len(self), self.augment.mosaic_window if self.augment is not None else 0
        if window < 2 or n == 1:
            return tuple(min(int(u * n), n - 1) for u in partner_u)
        order, position = self._epoch_order(epoch)
        pos = int(position[index])
        start, size = window_block(pos, n, window)
        picks = (start + min(int(u * (size - 1)), size - 2) for u in partner_u)  # a block position but pos
        return tuple(int(order[q + (q >= pos)]) for q in picks)

    def _shared_cache(self) -> SharedImageCache | None:
        """Two windows of decoded training images, shared by the workers (windowed partners only: with
        partners from the whole split nothing would be found in it)."""
        window = self.augment.mosaic_window if self.augment is not None else 0
        if window < 2 or len(self) < 2:
            return None
        slots = min(2 * window_block(0, len(self), window)[1] + 2, len(self))  # two of the longest blocks
        return SharedImageCache(slots=slots, slot_bytes=self.imgsz * self.imgsz * 3)

    def _scratch(self) -> np.ndarray:
        """One imgsz x imgsz x 3 buffer per process, reused by every item: a fresh one each time costs
        more in page faults than the warp that fills it."""
        if self._out is None:
            self._out = np.empty((self.imgsz, self.imgsz, 3), np.uint8)
        return self._out

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's sample order and its inverse (kept for the epoch: a worker asks for every item)."""
        if self._order is None or self._order[0] != epoch:
            order = epoch_permutation(len(self), self.seed, epoch)
            position = np.empty_like(order)
            position[order] = np.arange(len(order))
            self._order = (epoch, order, position)
        return self._order[1], self._order[2]


def window_block(pos: int, n: int, window: int) -> tuple[int, int]:
    """(start, length) of the block of the epoch order holding position `pos`: the order cut into
    round(n / window) blocks (at least 2 positions each) of equal length to within one, so every image
    is a partner equally often (a short tail joined to one block would make that block's images
    partners of more items than the others'). Block j spans [j * n // B, (j + 1) * n // B)."""
    blocks = max(1, min((2 * n + window) // (2 * window), n // 2))
    j = ((pos + 1) * blocks - 1) // n
    start = j * n // blocks
    return start, (j + 1) * n // blocks - start


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised uint8 tensor; in a data-loader worker, in shared memory (as torch's default_collate
    does), so sending the batch to the main process does not copy it there first, with its pages committed
    up front (the items fill it whole)."""
    return torch.empty(shape, dtype=torch.uint8) if get_worker_info() is None else shared_uint8(shape, commit=True)


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
        "img": _stacked(items),
        "cls": torch.cat([it["cls"] for it in items]),
        "bboxes": torch.cat([it["bboxes"] for it in items]),
        "batch_idx": torch.cat(
            [torch.full((len(it["cls"]),), float(i), dtype=torch.float32) for i, it in enumerate(items)]
        ),
        "image_id": [it["image_id"] for it in items],
        "ori_shape": [it["ori_shape"] for it in items],
        "ratio_pad": [it["ratio_pad"] for it in items],
    }


def _stacked(items: list[dict[str, Any]]) -> torch.Tensor:
    """The batch tensor `DetectionDataset.__getitems__` wrote the images into, else a stacked copy."""
    imgs = [it["img"] for it in items]
    batch = imgs[0]._base
    if (
        batch is not None
        and batch.is_contiguous()
        and batch.shape == (len(imgs), *imgs[0].shape)
        and all(img._base is batch and img.data_ptr() == batch[i].data_ptr() for i, img in enumerate(imgs))
    ):
        return batch
    return torch.stack(imgs)
