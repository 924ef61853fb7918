"""YOLO-format loading (`data.format: yolo`): the ultralytics images/ + labels/ layout.

`images/<split>/x.jpg` pairs with `labels/<split>/x.txt` (one `class cx cy w h` line per object,
normalized to 0-1; ultralytics polygon lines are reduced to their box). A missing label file is a
negative image. `data.root` may also be an ultralytics dataset YAML (path, train, val, names).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .records import ImageRecord, Split, clip_boxes, empty_targets, file_size

IMAGE_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height
_COORD_SLACK = 0.01  # exporters round; beyond this a coordinate is not normalized


def load_yolo_split(root_opt: str, spec: str, split: str, names: list[str] | None) -> Split:
    """Load one split; `root_opt` is the data root folder or a dataset YAML."""
    root = Path(root_opt)
    specs: list[str] = [spec] if spec else []
    if root.suffix.lower() in (".yaml", ".yml"):
        meta = read_dataset_yaml(root, split)
        root, specs = meta["path"], specs or meta["split"]
        names = names if names is not None else meta["names"]
    if not root.is_dir():
        raise DataError(f"dataset root `{root}` not found; check data.root")
    if not names:
        raise DataError(f"yolo dataset `{root_opt}` needs class names: set data.names or `names` in the dataset YAML")
    specs = specs or [f"images/{split}"]
    images = [img for s in specs for img in _list_images(root, s, split)]
    if not images:
        where = ", ".join(f"`{root / s}`" for s in specs)
        raise DataError(f"no images found for the {split} split in {where}; check data.root and data.{split}")

    digest = hashlib.sha256()
    records, labelled = [], 0
    for i, path in enumerate(images):
        width, height = image_size(path)
        boxes, cls, raw = _read_labels(label_path(path), len(names), width, height)
        labelled += raw is not None
        raw = raw or b""
        digest.update(f"{Path(os.path.relpath(path, root)).as_posix()}\0{len(raw)}\0".encode() + raw)
        records.append(ImageRecord(path, width, height, boxes, cls, i + 1, file_size(path, "image")))
    if not labelled:  # a wrong layout, not a split of negatives: nobody trains a detector without boxes
        raise DataError(
            f"none of the {len(images)} {split} images has a label file (e.g. `{label_path(images[0])}`); "
            "labels must sit in a `labels` folder mirroring `images`"
        )
    return Split(
        names=list(names),
        records=records,
        class_to_category=list(range(1, len(names) + 1)),
        base=root,
        label_digest=digest.hexdigest(),
    )


def read_dataset_yaml(path: Path, split: str) -> dict[str, Any]:
    """The parts of an ultralytics dataset YAML we use: root folder, the split's image specs, names."""
    if not path.is_file():
        raise DataError(f"dataset YAML `{path}` not found; check data.root")
    try:
        meta = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"dataset YAML `{path}` is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(meta, dict):
        raise DataError(f"dataset YAML `{path}` must be a mapping with path, train, val and names")
    # A relative `path` is taken relative to the YAML's folder (ultralytics uses its datasets_dir setting).
    root = path.parent / str(meta.get("path") or ".")
    specs = meta.get(split) or []
    specs = [specs] if isinstance(specs, str) else specs
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise DataError(f"dataset YAML `{path}`: `{split}` must be a path or a list of paths")
    return {"path": root, "split": specs, "names": _yaml_names(meta.get("names"), path)}


def _yaml_names(names: Any, path: Path) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, dict):
        if sorted(names) != list(range(len(names))):
            raise DataError(f"dataset YAML `{path}`: `names` keys must be the class ids 0..{len(names) - 1}")
        return [str(names[i]) for i in range(len(names))]
    if isinstance(names, list):
        return [str(n) for n in names]
    raise DataError(f"dataset YAML `{path}`: `names` must be a list or a mapping of class id to name")


def _list_images(root: Path, spec: str, split: str) -> list[Path]:
    """Images of a folder (recursively, sorted) or of a `.txt` list file (in its order)."""
    where = root / spec
    if where.is_dir():
        return sorted(p for p in where.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if where.is_file() and where.suffix.lower() == ".txt":
        return _read_list_file(where)
    raise DataError(f"image folder or list file `{where}` not found; check data.root and data.{split}")


def _read_list_file(path: Path) -> list[Path]:
    """Image paths, one per line; relative ones are relative to the list file's folder."""
    images = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        image = path.parent / line.strip()
        if not image.is_file():
            raise DataError(f"list file `{path}` line {lineno}: image `{image}` not found")
        images.append(image)
    return images


def label_path(image: Path) -> Path:
    """The ultralytics convention: the last `images` folder of the path becomes `labels`, suffix `.txt`."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header, as cv2 decodes it (EXIF orientation applied); no decoding."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    # ImportError: ultralytics patches Image.open to look for a HEIF plugin on unknown files.
    except (OSError, UnidentifiedImageError, ValueError, ImportError) as exc:
        raise DataError(f"image `{path}` cannot be read ({' '.join(str(exc).split())}); replace or remove it") from None
    return (height, width) if orientation in _TRANSPOSED else (width, height)


def _read_labels(path: Path, nc: int, width: int, height: int) -> tuple[np.ndarray, np.ndarray, bytes | None]:
    """xyxy pixel boxes, class ids and the raw file bytes (None when there is no label file: a negative)."""
    if not path.is_file():
        return *empty_targets(), None
    raw = path.read_bytes()
    rows = []
    for lineno, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), 1):
        if line.strip():
            rows.append(_parse_label_line(line, path, lineno, nc))
    if not rows:
        return *empty_targets(), raw
    lab = np.array(rows, np.float64)
    scale = np.array([width, height, width, height])
    xyxy = np.concatenate([lab[:, 1:3] - lab[:, 3:5] / 2, lab[:, 1:3] + lab[:, 3:5] / 2], 1) * scale
    boxes, cls = clip_boxes(xyxy, lab[:, 0].astype(np.int64), width, height)
    return boxes, cls, raw


def _parse_label_line(line: str, path: Path, lineno: int, nc: int) -> list[float]:
    """[cls, cx, cy, w, h] from a box line or an ultralytics polygon line (`cls x1 y1 x2 y2 ...`)."""
    where = f"label file `{path}` line {lineno}"
    try:
        values = [float(v) for v in line.split()]
    except ValueError:
        raise DataError(f"{where}: expected `class cx cy w h` numbers, got `{line.strip()}`") from None
    if len(values) == 5:
        c, cx, cy, w, h = values
    elif len(values) >= 7 and len(values) % 2 == 1:
        xs, ys = values[1::2], values[2::2]
        c, cx, cy = values[0], (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
        w, h = max(xs) - min(xs), max(ys) - min(ys)
    else:
        raise DataError(f"{where}: expected `class cx cy w h` (5 values), got {len(values)} values")
    if not c.is_integer() or not 0 <= c < nc:
        raise DataError(
            f"{where}: class id {line.split()[0]} is out of range 0-{nc - 1} ({nc} names); fix the label or data.names"
        )
    coords = values[1:]
    if not all(np.isfinite(coords)) or min(coords) < -_COORD_SLACK or max(coords) > 1 + _COORD_SLACK:
        raise DataError(f"{where}: coordinates must be normalized to 0-1, got `{line.strip()}`")
    return [c, cx, cy, max(w, 0.0), max(h, 0.0)]
