"""COCO-format loading (`data.format: coco`, and the synthetic set) and COCO ground truth objects.

The annotation JSON is validated entry by entry so that a bad file gives one line naming the
file, the entry and the fix, never a KeyError from deep inside pycocotools.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from ..errors import DataError
from .records import ImageRecord, Split, clip_boxes, empty_targets, file_size


def load_coco_split(root: Path, ann: str, images: str, split: str, names: list[str] | None) -> Split:
    """Load one split: `ann` is the JSON relative to `root` ('' = annotations/instances_<split>.json)."""
    ann_path = root / (ann or f"annotations/instances_{split}.json")
    if not ann_path.is_file():
        key = f"data.{split}"
        raise DataError(f"annotation file `{ann_path}` not found; check data.root and {key}")
    raw = ann_path.read_bytes()
    data = parse_coco(raw, ann_path)
    image_dir = _image_dir(root, ann_path, images, split)

    categories = sorted(data["categories"], key=lambda c: c["id"])
    cat_to_cls = {c["id"]: i for i, c in enumerate(categories)}
    names = _names(names, [str(c["name"]) for c in categories], ann_path)

    per_image: dict[int, list[dict]] = {img["id"]: [] for img in data["images"]}
    for a in data["annotations"]:
        if not a["iscrowd"]:  # crowd regions stay in the ground truth (COCOeval ignores them) only
            per_image[a["image_id"]].append(a)

    records = []
    for img in data["images"]:
        anns = per_image[img["id"]]
        boxes, cls = empty_targets()
        if anns:
            xywh = np.array([a["bbox"] for a in anns], np.float32)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
            cls = np.array([cat_to_cls[a["category_id"]] for a in anns], np.int64)
            boxes, cls = clip_boxes(boxes, cls, img["width"], img["height"])
        path = image_dir / img["file_name"]
        size = file_size(path, f"image of `{ann_path}`")
        records.append(ImageRecord(path, img["width"], img["height"], boxes, cls, img["id"], size))
    if not records:
        raise DataError(f"annotation file `{ann_path}` lists no images; the {split} split must not be empty")
    return Split(
        names=names,
        records=records,
        class_to_category=[c["id"] for c in categories],
        base=root,
        label_digest=hashlib.sha256(raw).hexdigest(),
        coco_json=ann_path,
    )


def _names(configured: list[str] | None, from_file: list[str], ann_path: Path) -> list[str]:
    if configured is None:
        return from_file
    if len(configured) != len(from_file):
        raise DataError(
            f"data.names has {len(configured)} entries but `{ann_path}` has {len(from_file)} categories; "
            "fix data.names or leave it unset to use the category names"
        )
    return list(configured)


def _image_dir(root: Path, ann_path: Path, images: str, split: str) -> Path:
    """`data.<split>_images`, else images/<name> or <name> where the JSON is instances_<name>.json."""
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
    raise DataError(
        f"image folder for `{ann_path}` not found (tried `{tried[0]}` and `{tried[1]}`); set data.{split}_images"
    )


def parse_coco(raw: bytes, path: Path) -> dict[str, Any]:
    """Validated COCO dict, with `id`, `area` and `iscrowd` filled in where an exporter left them out."""
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
    images = [check.image(i, img) for i, img in enumerate(data["images"])]
    categories = [check.category(i, cat) for i, cat in enumerate(data["categories"])]
    image_ids = check.unique("images", [img["id"] for img in images])
    cat_ids = check.unique("categories", [c["id"] for c in categories])
    anns = [check.annotation(i, a, image_ids, cat_ids) for i, a in enumerate(data.get("annotations", []))]
    if len({a["id"] for a in anns}) != len(anns):  # pycocotools indexes by id: renumber rather than lose some
        for i, a in enumerate(anns):
            a["id"] = i + 1
    return {**data, "images": images, "categories": categories, "annotations": anns}


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
        return dict(entry)

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
    """Ground truth in original pixels: the annotation file itself, or built from YOLO labels."""
    if split.coco_json is not None:
        return coco_from_dict(parse_coco(split.coco_json.read_bytes(), split.coco_json))
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
