"""A deterministic synthetic detection dataset (colored shapes on textured backgrounds), in COCO format.

The dataset is a pure function of its parameters: image i of a split is drawn from a generator
seeded by (seed, split, i), images are lossless PNG, and the JSON is written in a fixed order, so
the same parameters give the same bytes on every machine with the same OpenCV/zlib. The class is
the shape; colors, sizes, positions and backgrounds vary so that color never identifies it.

Layout:  <root>/images/{train,val}/NNNNNN.png, <root>/annotations/instances_{train,val}.json,
<root>/synthetic.json (the parameters; a dataset whose file matches is reused as is).
"""

from __future__ import annotations

import json
import math
import shutil
from functools import cache, lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..config import DataConfig
from ..errors import DataError

cv2.setNumThreads(0)

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
GENERATOR_VERSION = 1  # bump when the images change, so existing datasets are regenerated
PARAMS_FILE = "synthetic.json"
NEGATIVE_FRACTION = 0.05
MAX_OBJECTS = 4
SIZE_RANGE = (0.15, 0.45)  # object size as a fraction of the image side
MAX_OCCLUDED = 0.2  # an object may lose at most this fraction of its pixels to later ones
MAX_ROTATION = math.radians(25)
_SPLIT_TAGS = {"train": 1, "val": 2}
_SUBPIXEL_BITS = 4  # fillPoly fixed-point bits: polygon vertices are placed at 1/16 pixel


def ensure_synthetic(data_cfg: DataConfig) -> Path:
    """The synthetic dataset at data_cfg.root, generated unless one with the same parameters is there."""
    root = Path(data_cfg.root)
    params = synthetic_params(
        data_cfg.num_train, data_cfg.num_val, data_cfg.num_classes, data_cfg.image_size, data_cfg.seed
    )
    if _read_params(root) == params:
        return root
    return generate_synthetic(
        root, data_cfg.num_train, data_cfg.num_val, data_cfg.num_classes, data_cfg.image_size, data_cfg.seed
    )


def synthetic_params(num_train: int, num_val: int, num_classes: int, image_size: int, seed: int) -> dict[str, Any]:
    return {
        "generator": "yolo-resume synthetic shapes",
        "version": GENERATOR_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "num_classes": num_classes,
        "image_size": image_size,
        "seed": seed,
    }


def _read_params(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / PARAMS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def generate_synthetic(
    out: str | Path, num_train: int, num_val: int, num_classes: int, image_size: int, seed: int
) -> Path:
    """Write the dataset to `out`, replacing a previous synthetic dataset there.

    It is built in a sibling `.<name>.partial` folder and renamed into place at the end, so an
    interrupted generation never leaves a folder that looks complete.
    """
    out = Path(out)
    _check_params(out, num_train, num_val, num_classes, image_size)
    partial = out.parent / f".{out.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted generation: incomplete by definition
    try:
        for split, count in (("train", num_train), ("val", num_val)):
            _write_split(partial, split, count, num_classes, image_size, seed)
        params = synthetic_params(num_train, num_val, num_classes, image_size, seed)
        (partial / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
        _replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def _check_params(out: Path, num_train: int, num_val: int, num_classes: int, image_size: int) -> None:
    if not 1 <= num_classes <= len(SHAPES):
        raise DataError(f"synthetic data: num_classes must be 1-{len(SHAPES)}, got {num_classes}")
    if image_size < 32:
        raise DataError(f"synthetic data: image_size must be >= 32, got {image_size}")
    if num_train < 1 or num_val < 1:
        raise DataError(f"synthetic data: num_train and num_val must be >= 1, got {num_train}, {num_val}")
    if out.exists() and not (out.is_dir() and ((out / PARAMS_FILE).is_file() or not any(out.iterdir()))):
        raise DataError(
            f"data.root `{out}` exists and is not a synthetic dataset; choose a new folder for synthetic data"
        )


def _replace(partial: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(out)


def _write_split(root: Path, split: str, count: int, num_classes: int, size: int, seed: int) -> None:
    image_dir = root / "images" / split
    image_dir.mkdir(parents=True)
    (root / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng(np.random.SeedSequence(seed % 2**64, spawn_key=(_SPLIT_TAGS[split], i)))
        img, objects = render_image(rng, size, num_classes)
        name = f"{i + 1:06d}.png"
        cv2.imwrite(str(image_dir / name), img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for cls, (x1, y1, x2, y2), area in objects:
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": cls + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": area,
                    "iscrowd": 0,
                }
            )
    categories = [{"id": k + 1, "name": SHAPES[k], "supercategory": "shape"} for k in range(num_classes)]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    text = json.dumps(coco, separators=(",", ":"))
    (root / "annotations" / f"instances_{split}.json").write_text(text + "\n", encoding="utf-8")


def render_image(
    rng: np.random.Generator, size: int, num_classes: int
) -> tuple[np.ndarray, list[tuple[int, tuple[int, int, int, int], int]]]:
    """A BGR image and its objects as (class, exact xyxy box of the whole shape, visible pixel count)."""
    img = _background(rng, size)
    owner = np.zeros((size, size), np.uint8)  # which object (1-based) is visible at each pixel; 0 = none
    objects: list[tuple[int, np.ndarray]] = []
    num = 0 if rng.random() < NEGATIVE_FRACTION else int(rng.integers(1, MAX_OBJECTS + 1))
    for _ in range(num):
        placed = _place_object(rng, size, num_classes, owner, objects)
        if placed is None:
            continue
        cls, mask = placed
        img[mask] = _contrasting_color(rng, img[mask].mean(0))
        objects.append((cls, mask))
        owner[mask] = len(objects)
    noise = rng.integers(-6, 7, img.shape, dtype=np.int16)  # sensor-like noise over objects and background
    img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)
    visible = np.bincount(owner.ravel(), minlength=len(objects) + 1)
    return img, [(cls, _mask_box(mask), int(visible[k + 1])) for k, (cls, mask) in enumerate(objects)]


def _place_object(
    rng: np.random.Generator, size: int, num_classes: int, owner: np.ndarray, objects: list
) -> tuple[int, np.ndarray] | None:
    """A shape mask that hides at most MAX_OCCLUDED of any earlier object; None after 20 tries."""
    full = [int(m.sum()) for _, m in objects]
    visible = np.bincount(owner.ravel(), minlength=len(objects) + 1)[1:]
    for _ in range(20):
        cls = int(rng.integers(num_classes))
        radius = rng.uniform(*SIZE_RANGE) * size / 2
        angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION) if SHAPES[cls] not in ("circle", "ring") else 0.0
        outer, hole = _unit_shape(SHAPES[cls])
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        outer, hole = outer @ rot.T * radius, (None if hole is None else hole @ rot.T * radius)
        lo, hi = outer.min(0), outer.max(0)
        # Keep a pixel of margin so the shape, and therefore its box, lies entirely inside the image.
        centre = rng.uniform(1 - lo, size - 1 - hi)
        mask = _fill(size, outer + centre, None if hole is None else hole + centre)
        if not mask.any():
            continue
        hidden = np.bincount(owner[mask], minlength=len(objects) + 1)[1:]
        if all(vis - hid >= (1 - MAX_OCCLUDED) * f for vis, hid, f in zip(visible, hidden, full, strict=True)):
            return cls, mask
    return None


@cache
def _unit_shape(shape: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Outline (and hole) of a shape of radius 1 around the origin."""

    def circle(r: float, n: int = 48) -> np.ndarray:
        t = np.linspace(0, 2 * np.pi, n, endpoint=False)
        return np.stack([np.cos(t), np.sin(t)], 1) * r

    if shape == "circle":
        return circle(1.0), None
    if shape == "ring":
        return circle(1.0), circle(0.55)
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.8, None
    if shape == "triangle":
        t = np.radians([-90, 30, 150])
        return np.stack([np.cos(t), np.sin(t)], 1), None
    if shape == "star":
        t = np.radians(np.arange(10) * 36 - 90)
        r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
        return np.stack([np.cos(t) * r, np.sin(t) * r], 1), None
    if shape == "cross":
        a, b = 0.3, 0.95  # arm half-width, arm length
        pts = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
        return np.array(pts, np.float64), None
    raise ValueError(f"unknown shape {shape}")


def _fill(size: int, outer: np.ndarray, hole: np.ndarray | None) -> np.ndarray:
    """Boolean mask of a polygon (minus a hole) with vertices in continuous pixel coordinates."""
    mask = np.zeros((size, size), np.uint8)
    scale = 1 << _SUBPIXEL_BITS
    to_fixed = lambda pts: np.round((pts - 0.5) * scale).astype(np.int32)  # noqa: E731 (pixel centres at .5)
    cv2.fillPoly(mask, [to_fixed(outer)], 1, cv2.LINE_8, _SUBPIXEL_BITS)
    if hole is not None:
        cv2.fillPoly(mask, [to_fixed(hole)], 0, cv2.LINE_8, _SUBPIXEL_BITS)
    return mask.astype(bool)


def _mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tightest xyxy box (pixel edges) around the mask's pixels."""
    cols, rows = mask.any(0), mask.any(1)
    x1, y1 = int(cols.argmax()), int(rows.argmax())
    x2, y2 = len(cols) - int(cols[::-1].argmax()), len(rows) - int(rows[::-1].argmax())
    return x1, y1, x2, y2


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return xx, yy


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation color: backgrounds stay in the grey range so vivid objects stand out."""
    return np.clip(rng.uniform(40, 215) + rng.uniform(-30, 30, 3), 0, 255).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth noise, a linear gradient or soft stripes between two muted colors."""
    xx, yy = _grid(size)
    kind = int(rng.integers(3))
    c0, c1 = _muted_color(rng), _muted_color(rng)
    angle = rng.uniform(0, 2 * np.pi)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    if kind == 0:
        coarse = rng.uniform(0, 1, (4, 4)).astype(np.float32)
        t = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    elif kind == 1:
        t = (along - along.min()) / (along.max() - along.min())
    else:
        t = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 8) * along + rng.uniform(0, 2 * np.pi))
    return (c0 + t[..., None] * (c1 - c0)).astype(np.uint8)


def _contrasting_color(rng: np.random.Generator, behind: np.ndarray) -> np.ndarray:
    """The most contrasting of four random vivid colors against the mean color behind the object."""
    hsv = np.stack([rng.integers(0, 180, 4), rng.integers(150, 256, 4), rng.integers(110, 256, 4)], 1).astype(np.uint8)
    bgr = cv2.cvtColor(hsv[None], cv2.COLOR_HSV2BGR)[0].astype(np.float32)
    return bgr[np.abs(bgr - behind).sum(1).argmax()].astype(np.uint8)
