"""COCO-format loading (`data.format: coco`, and the synthetic set) and COCO ground truth objects.

The annotation JSON is validated entry by entry so that a bad file gives one line naming the
file, the entry and the fix, never a KeyError from deep inside pycocotools.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import io
import json
import math
import os
import time
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from ..errors import DataError
from .records import Split, clip_boxes, empty_targets


def load_coco_split(
    root: Path,
    ann: str,
    images: str,
    split: str,
    names: list[str] | None,
    on_bad_image: str = "skip",
    fingerprint: str = "stat",
) -> Split:
    """Load and check one split: `ann` is the JSON relative to `root` ('' = annotations/instances_<split>.json,
    or a Roboflow export's `<split>/_annotations.coco.json`). A start whose JSON and images have the (size,
    mtime) the split index stored reads the index and not the JSON."""
    from .check import CocoIndex

    start = time.perf_counter()
    ann_path = _annotation_file(root, ann, split)
    index = CocoIndex(root, ann_path, split, {"images": images, "names": names, "fingerprint": fingerprint})
    cached = index.load(on_bad_image, start)
    if cached is not None:
        return cached
    raw = ann_path.read_bytes()
    label_digest = hashlib.sha256(raw).hexdigest()
    data = parse_coco(raw, ann_path)
    del raw  # the JSON text and its objects are never held together with the records
    image_dir = _image_dir(root, ann_path, images, split, data["images"])
    categories = trained_categories(data)
    names = _names(names, [str(c["name"]) for c in categories], ann_path)
    note = ""
    if len(categories) < len(data["categories"]):
        placeholder = _placeholder(data)
        note = (
            f"{split}: `{ann_path.name}`: category {placeholder['id']} (`{placeholder['name']}`) is the "
            "export's placeholder for the whole dataset (Roboflow), not a class: not trained"
        )
    table = coco_table(data, {c["id"]: i for i, c in enumerate(categories)}, image_dir)
    del data
    release_freed_memory()
    if not len(table.paths):
        raise DataError(f"annotation file `{ann_path}` lists no images; the {split} split must not be empty")
    meta = {"label_digest": label_digest, "names": names, "class_to_category": [c["id"] for c in categories]}
    return index.build(table, meta, note, on_bad_image, start)


def release_freed_memory() -> None:
    """Hand the freed JSON objects' memory back to the system: glibc keeps freed heap pages resident, so the
    parse of a 120k-image JSON would stay in the process's memory for the whole run."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to do
        return
    libc.malloc_trim(0)


class CocoTable:
    """The images and trained boxes of a COCO JSON as flat columns, in the JSON's image order."""

    def __init__(self, paths, numbers, boxes, counts, cls, raw_counts) -> None:
        self.paths: list[str] = paths
        self.numbers: np.ndarray = numbers  # (n, 3) width, height, image id
        self.boxes: np.ndarray = boxes  # (m, 4) float32 xyxy, clipped, with area, image by image
        self.counts: np.ndarray = counts  # (n,) boxes per image
        self.cls: np.ndarray = cls  # (m,)
        self.raw_counts: np.ndarray = raw_counts  # (n,) non-crowd annotations per image, any category


def coco_table(data: dict[str, Any], cat_to_cls: dict[int, int], image_dir: Path) -> CocoTable:
    """Training boxes of every image at once: non-crowd annotations of the trained categories, clipped, those
    without area dropped (`coco_gt` drops the same), in the arithmetic (float32) of `_targets`, per image in
    annotation order."""
    imgs, anns = data["images"], data["annotations"]
    n, m = len(imgs), len(anns)
    numbers = np.fromiter(chain.from_iterable((i["width"], i["height"], i["id"]) for i in imgs), np.int64, 3 * n)
    numbers = numbers.reshape(n, 3)
    prefix = str(image_dir) + os.sep
    paths = [_join(prefix, image_dir, img["file_name"]) for img in imgs]
    row_of = {img["id"]: i for i, img in enumerate(imgs)}
    owner = np.fromiter((row_of[a["image_id"]] for a in anns), np.int64, m)
    crowd = np.fromiter((a["iscrowd"] for a in anns), np.int64, m).astype(bool)
    cat = np.fromiter((a["category_id"] for a in anns), np.int64, m)
    xywh = np.fromiter(chain.from_iterable(a["bbox"] for a in anns), np.float32, 4 * m).reshape(m, 4)
    raw_counts = np.bincount(owner[~crowd], minlength=n).astype(np.int64)
    ids, inverse = np.unique(cat, return_inverse=True)
    cls_all = np.array([cat_to_cls.get(c, -1) for c in ids.tolist()], np.int64)[inverse.reshape(-1)]
    sel = ~crowd & (cls_all >= 0)
    order = np.flatnonzero(sel)[np.argsort(owner[sel], kind="stable")]
    owner, xywh, cls = owner[order], xywh[order], cls_all[order]
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    wh = numbers[owner, :2].astype(np.float32)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, wh[:, :1])  # records.clip_boxes, per row bounds
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, wh[:, 1:])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    counts = np.bincount(owner[keep], minlength=n).astype(np.int64)
    return CocoTable(paths, numbers, boxes[keep], counts, cls[keep], raw_counts)


def _join(prefix: str, folder: Path, name: str) -> str:
    """str(folder / name), without a Path object where the name is a plain relative path."""
    if name[:1] != "/" and "//" not in name and "./" not in name and not name.endswith(("/", "/.")) and name != ".":
        return prefix + name
    return str(folder / name)


def _targets(anns: list[dict], cat_to_cls: dict[int, int], img: dict) -> tuple[np.ndarray, np.ndarray]:
    """Training boxes of one image: clipped, those without area dropped (`coco_gt` drops the same)."""
    anns = [a for a in anns if a["category_id"] in cat_to_cls]
    if not anns:
        return empty_targets()
    xywh = np.array([a["bbox"] for a in anns], np.float32)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    cls = np.array([cat_to_cls[a["category_id"]] for a in anns], np.int64)
    return clip_boxes(boxes, cls, img["width"], img["height"])


def _placeholder(data: dict[str, Any]) -> dict | None:
    """Roboflow's COCO exports add a category for the dataset itself (id 0, named after the project, the
    `supercategory` of every real class, with no annotation): it is not a class to train."""
    cats = data["categories"]
    if len(cats) < 2:
        return None
    first = min(cats, key=lambda c: c["id"])
    others = [c for c in cats if c is not first]
    used = {a["category_id"] for a in data["annotations"]}
    if first["id"] in used or not all(c.get("supercategory") == first.get("name") for c in others):
        return None
    return first


def trained_categories(data: dict[str, Any]) -> list[dict]:
    """The categories that become classes, sorted by id (contiguous class ids follow that order)."""
    placeholder = _placeholder(data)
    return sorted((c for c in data["categories"] if c is not placeholder), key=lambda c: c["id"])


def _annotation_file(root: Path, ann: str, split: str) -> Path:
    if not root.is_dir():
        raise DataError(f"dataset root `{root}` not found; check data.root")
    if ann:
        candidates = [root / ann]
    else:  # the COCO layout, then a Roboflow export (`valid/` for val)
        folders = [split] + (["valid"] if split == "val" else [])
        candidates = [root / f"annotations/instances_{split}.json"]
        candidates += [root / f / "_annotations.coco.json" for f in folders]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        tried = " or ".join(f"`{c}`" for c in candidates)
        raise DataError(f"annotation file {tried} not found; check data.root and data.{split}")
    return found


def _names(configured: list[str] | None, from_file: list[str], ann_path: Path) -> list[str]:
    if configured is None:
        return from_file
    if len(configured) != len(from_file):
        raise DataError(
            f"data.names has {len(configured)} entries but `{ann_path}` has {len(from_file)} categories; "
            "fix data.names or leave it unset to use the category names"
        )
    return list(configured)


def _image_dir(root: Path, ann_path: Path, images: str, split: str, entries: list[dict]) -> Path:
    """`data.<split>_images`; else images/<name> or <name> where the JSON is instances_<name>.json (COCO);
    else the one folder among the JSON's own (Roboflow, Label Studio), `<root>/images` (CVAT) and the root
    that holds the images the JSON names."""
    if images:
        folder = root / images
        if not folder.is_dir():
            raise DataError(f"image folder `{folder}` (data.{split}_images) not found")
        return folder
    stem = ann_path.stem
    name = stem[len("instances_") :] if stem.startswith("instances_") else stem
    tried = [root / "images" / name, root / name]
    for folder in tried:
        if folder.is_dir():
            return folder
    sample = [e["file_name"] for e in entries[:8]]
    others = list(dict.fromkeys(p.resolve() for p in (ann_path.parent, root / "images", root)))
    holding = [f for f in others if sample and all((f / s).is_file() for s in sample)]
    if holding:
        return holding[0]  # the JSON's own folder first: an export is self-contained
    tried += [f for f in others if f not in tried]
    raise DataError(
        f"image folder for `{ann_path}` not found (tried {', '.join(f'`{t}`' for t in tried)}); set data.{split}_images"
    )


def parse_coco(raw: bytes, path: Path) -> dict[str, Any]:
    """Validated COCO dict, with `id`, `area` and `iscrowd` filled in where an exporter left them out. The
    entries json.loads made are checked and completed in place (a copy of each would double the memory of a
    120k-image JSON for the time of the check)."""
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"annotation file `{path}` is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    except UnicodeDecodeError:
        raise DataError(f"annotation file `{path}` is not UTF-8 text; re-export it as COCO JSON") from None
    if not isinstance(data, dict):
        raise DataError(f"annotation file `{path}` must hold a JSON object with images, annotations, categories")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"annotation file `{path}` has no `{key}` list; is it a COCO instances file?")
    if not isinstance(data.get("annotations", []), list):
        raise DataError(f"annotation file `{path}`: `annotations` must be a list")
    if not data["categories"]:
        raise DataError(f"annotation file `{path}` has an empty `categories` list")

    check = _Checker(path)
    images = data["images"]
    for i, img in enumerate(images):
        check.image(i, img)
    for i, cat in enumerate(data["categories"]):
        check.category(i, cat)
    image_ids = check.unique("images", [img["id"] for img in images])
    cat_ids = check.unique("categories", [c["id"] for c in data["categories"]])
    anns = data.setdefault("annotations", [])
    for i, a in enumerate(anns):
        check.annotation(i, a, image_ids, cat_ids)
    if len({a["id"] for a in anns}) != len(anns):  # pycocotools indexes by id: renumber rather than lose some
        for i, a in enumerate(anns):
            a["id"] = i + 1
    return data


_REAL = frozenset({int, float})


class _Checker:
    """Entry-level checks; each failure is one line naming the file and the entry."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, what: str) -> DataError:
        return DataError(f"annotation file `{self.path}`: {where} {what}")

    def _int(self, where: str, entry: dict, key: str, minimum: int | None = None) -> int:
        value = entry.get(key)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool) or (minimum is not None and value < minimum):
            bound = "" if minimum is None else f" >= {minimum}"
            raise self.fail(where, f"needs an integer `{key}`{bound}, got {value!r}")
        return value

    def _entry(self, where: str, entry: Any) -> dict:
        if not isinstance(entry, dict):
            raise self.fail(where, f"must be an object, got {type(entry).__name__}")
        return entry

    def image(self, i: int, entry: Any) -> dict:
        where = f"images[{i}]"
        img = self._entry(where, entry)
        img["id"] = self._int(where, img, "id")
        img["width"] = self._int(where, img, "width", 1)
        img["height"] = self._int(where, img, "height", 1)
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise self.fail(where, "needs a `file_name` string")
        return img

    def category(self, i: int, entry: Any) -> dict:
        where = f"categories[{i}]"
        cat = self._entry(where, entry)
        cat["id"] = self._int(where, cat, "id")
        cat.setdefault("name", str(cat["id"]))
        return cat

    def unique(self, key: str, ids: list[int]) -> set[int]:
        seen: set[int] = set()
        for value in ids:
            if value in seen:
                raise self.fail(f"`{key}`", f"has the id {value} twice; ids must be unique")
            seen.add(value)
        return seen

    def annotation(self, i: int, entry: Any, image_ids: set[int], cat_ids: set[int]) -> dict:
        """The checks below, and first the same checks of the common case in as few steps as Python allows
        (860k annotations): where any of them fails, the full path names what is wrong."""
        if type(entry) is dict:
            image_id, cat, bbox = entry.get("image_id"), entry.get("category_id"), entry.get("bbox")
            if (
                type(image_id) is int
                and type(cat) is int
                and type(bbox) is list
                and len(bbox) == 4
                and image_id in image_ids
                and cat in cat_ids
            ):
                x, y, w, h = bbox
                if (
                    type(x) in _REAL
                    and type(y) in _REAL
                    and type(w) in _REAL
                    and type(h) in _REAL
                    and math.isfinite(x + y + w + h)  # overflow or nan: the full path decides
                ):
                    entry["bbox"] = bbox = [float(x), float(y), float(w), float(h)]
                    crowd = entry.get("iscrowd", 0)
                    entry["iscrowd"] = crowd if type(crowd) is int and crowd in (0, 1) else int(bool(crowd))
                    entry.setdefault("area", bbox[2] * bbox[3])
                    entry.setdefault("id", i + 1)
                    return entry
        return self._annotation(i, entry, image_ids, cat_ids)

    def _annotation(self, i: int, entry: Any, image_ids: set[int], cat_ids: set[int]) -> dict:
        where = f"annotations[{i}]"
        ann = self._entry(where, entry)
        ann["image_id"] = self._int(where, ann, "image_id")
        if ann["image_id"] not in image_ids:
            raise self.fail(where, f"refers to image_id {ann['image_id']}, which is not in `images`")
        ann["category_id"] = self._int(where, ann, "category_id")
        if ann["category_id"] not in cat_ids:
            raise self.fail(
                where,
                f"has category_id {ann['category_id']}, which is not in `categories`; add it or fix the id",
            )
        bbox = ann.get("bbox")
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bbox)
        ):
            raise self.fail(where, f"needs `bbox` as [x, y, width, height] numbers, got {bbox!r}")
        ann["bbox"] = [float(v) for v in bbox]
        ann["iscrowd"] = int(bool(ann.get("iscrowd", 0)))
        ann.setdefault("area", ann["bbox"][2] * ann["bbox"][3])
        ann.setdefault("id", i + 1)
        return ann


def coco_from_dict(data: dict[str, Any]) -> COCO:
    """A pycocotools COCO object from an in-memory dict (its progress printout silenced)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def coco_gt(split: Split) -> COCO:
    """Ground truth in original pixels: the annotation file itself (its boxes with no area after clipping,
    dropped from training, dropped here too; only the trained categories), or built from YOLO labels."""
    if split.coco_json is not None:
        data = parse_coco(split.coco_json.read_bytes(), split.coco_json)
        sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
        kept_cats = set(split.class_to_category)
        data["categories"] = [c for c in data["categories"] if c["id"] in kept_cats]
        data["annotations"] = [
            a
            for a in data["annotations"]
            if a["category_id"] in kept_cats and (a["iscrowd"] or _has_area(a["bbox"], *sizes[a["image_id"]]))
        ]
        return coco_from_dict(data)
    images, annotations = [], []
    for rec in split.records:
        images.append({"id": rec.image_id, "file_name": rec.path.name, "width": rec.width, "height": rec.height})
        for box, c in zip(rec.boxes.tolist(), rec.cls.tolist(), strict=True):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": rec.image_id,
                    "category_id": split.class_to_category[c],
                    "bbox": [box[0], box[1], w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": cid, "name": n} for cid, n in zip(split.class_to_category, split.names, strict=True)]
    return coco_from_dict({"images": images, "annotations": annotations, "categories": categories})


def _has_area(bbox: list[float], width: int, height: int) -> bool:
    """The training rule for one xywh box, in the same float32 arithmetic (`_targets`, records.clip_boxes)."""
    xywh = np.array([bbox], np.float32)
    boxes, _ = clip_boxes(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), np.zeros(1), width, height)
    return len(boxes) == 1
