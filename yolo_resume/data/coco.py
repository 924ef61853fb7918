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
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from ..errors import DataError
from .records import ImageRecord, Split, clip_boxes, empty_targets


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
    or a Roboflow export's `<split>/_annotations.coco.json`)."""
    from .check import check_coco_images

    ann_path = _annotation_file(root, ann, split)
    raw = ann_path.read_bytes()
    data = parse_coco(raw, ann_path)
    image_dir = _image_dir(root, ann_path, images, split, data["images"])

    categories = trained_categories(data)
    cat_to_cls = {c["id"]: i for i, c in enumerate(categories)}
    names = _names(names, [str(c["name"]) for c in categories], ann_path)

    per_image: dict[int, list[dict]] = {img["id"]: [] for img in data["images"]}
    for a in data["annotations"]:
        if not a["iscrowd"]:  # crowd regions stay in the ground truth (COCOeval ignores them) only
            per_image[a["image_id"]].append(a)

    records = []
    for img in data["images"]:
        boxes, cls = _targets(per_image[img["id"]], cat_to_cls, img)
        path = image_dir / img["file_name"]
        records.append(ImageRecord(path, img["width"], img["height"], boxes, cls, img["id"]))
    if not records:
        raise DataError(f"annotation file `{ann_path}` lists no images; the {split} split must not be empty")
    records, report = check_coco_images(root, ann_path, records, split, on_bad_image, fingerprint)
    for rec in records:
        rec.file_size = rec.path.stat().st_size
    report.used = len(records)
    report.labels = sum(bool(per_image[r.image_id]) for r in records)
    report.backgrounds = sum(not len(r.boxes) for r in records)
    report.dropped_boxes = sum(len(per_image[r.image_id]) - len(r.boxes) for r in records)
    counts = Counter(c for r in records for c in r.cls.tolist())
    report.boxes = Counter({names[c]: counts[c] for c in sorted(counts)})
    if len(categories) < len(data["categories"]):
        report.notes.append(
            f"{split}: `{ann_path.name}`: category {_placeholder(data)['id']} (`{_placeholder(data)['name']}`) is the "
            "export's placeholder for the whole dataset (Roboflow), not a class: not trained"
        )
    return Split(
        names=names,
        records=records,
        class_to_category=[c["id"] for c in categories],
        base=root,
        label_digest=hashlib.sha256(raw).hexdigest(),
        coco_json=ann_path,
        report=report,
    )


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
