"""Image and box operations: decoding, letterbox, mosaic, one affine warp, HSV jitter.

Everything random arrives as an `AugParams` drawn from the caller's local generator, so these
functions are pure. Geometry is kept exact: boxes live in continuous pixel coordinates (pixel i
spans [i, i+1]) and the warp matrix is converted to OpenCV's pixel-centre convention, so a box
and the pixels it encloses move together to within interpolation blur.

Images are BGR uint8 (as OpenCV decodes them) until the dataset converts the result to RGB.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from ..config import AugmentConfig
from ..errors import DataError
from .records import ImageRecord

cv2.setNumThreads(0)  # DataLoader workers already use every core; OpenCV threads would oversubscribe them
PAD_VALUE = 114
MIN_BOX_PX = 2.0  # boxes narrower or lower than this after augmentation are dropped
MIN_AREA_KEPT = 0.1  # ... and so are boxes that kept less than this fraction of their (scaled) area
MAX_ASPECT = 100.0
MIN_SCALE = 0.05  # scale >= 1 in the config would otherwise allow zero or mirrored scales


@dataclass(frozen=True)
class AugParams:
    """Every random decision for one training item."""

    mosaic_u: float  # mosaic happens when this is < the mosaic probability
    partners: tuple[int, int, int]  # the other three mosaic images
    center: tuple[float, float]  # mosaic centre, as a fraction of imgsz in [0.5, 1.5]
    scale: float
    translate: tuple[float, float]  # fraction of imgsz
    flip: bool
    hsv: tuple[float, float, float]  # gains in [-1, 1] * (hsv_h, hsv_s, hsv_v)


def draw_params(rng: np.random.Generator, num_images: int, cfg: AugmentConfig) -> AugParams:
    """Draw in a fixed order and always draw everything, so that one setting (e.g. mosaic off for
    close_mosaic) never shifts the values the other augmentations get."""
    mosaic_u = float(rng.random())
    partners = tuple(int(i) for i in rng.integers(0, num_images, 3))
    center = tuple(float(c) for c in rng.uniform(0.5, 1.5, 2))
    scale = float(rng.uniform(1 - cfg.scale, 1 + cfg.scale))
    translate = tuple(float(t) for t in rng.uniform(-cfg.translate, cfg.translate, 2))
    flip = bool(rng.random() < cfg.fliplr)
    hsv = tuple(float(g) for g in rng.uniform(-1, 1, 3) * (cfg.hsv_h, cfg.hsv_s, cfg.hsv_v))
    return AugParams(mosaic_u, partners, center, max(scale, MIN_SCALE), translate, flip, hsv)  # type: ignore[arg-type]


def decode(rec: ImageRecord) -> np.ndarray:
    """BGR uint8 image of the size the record says; a one-line DataError for a bad file."""
    try:
        buf = np.fromfile(rec.path, np.uint8)
    except OSError:
        raise DataError(f"image `{rec.path}` cannot be read; check that it still exists") from None
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is not None and img.shape[:2] != (rec.height, rec.width):
        # Annotations made on the raw pixels of an EXIF-rotated JPEG: read it unrotated.
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise DataError(f"image `{rec.path}` cannot be decoded; replace or remove it")
    if img.shape[:2] != (rec.height, rec.width):
        raise DataError(
            f"image `{rec.path}` is {img.shape[1]}x{img.shape[0]} but its annotation says "
            f"{rec.width}x{rec.height}; fix the annotation"
        )
    return img


def letterbox_geometry(width: int, height: int, imgsz: int) -> tuple[float, int, int, int, int]:
    """(ratio, resized width, resized height, pad left, pad top) of the plain letterbox."""
    ratio = imgsz / max(width, height)
    new_w = min(max(1, round(width * ratio)), imgsz)
    new_h = min(max(1, round(height * ratio)), imgsz)
    return ratio, new_w, new_h, (imgsz - new_w) // 2, (imgsz - new_h) // 2


def resize_long_side(img: np.ndarray, imgsz: int) -> tuple[np.ndarray, float]:
    """Resize so the long side is imgsz (area averaging when shrinking: no aliasing); returns the ratio."""
    height, width = img.shape[:2]
    ratio, new_w, new_h, _, _ = letterbox_geometry(width, height, imgsz)
    if (new_w, new_h) != (width, height):
        interp = cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR
        img = cv2.resize(img, (new_w, new_h), interpolation=interp)
    return img, ratio


def pad_to_square(img: np.ndarray, imgsz: int) -> np.ndarray:
    """Centre an image whose long side is imgsz on an imgsz x imgsz canvas of PAD_VALUE."""
    height, width = img.shape[:2]
    left, top = (imgsz - width) // 2, (imgsz - height) // 2
    return cv2.copyMakeBorder(
        img,
        top,
        imgsz - height - top,
        left,
        imgsz - width - left,
        cv2.BORDER_CONSTANT,
        value=(PAD_VALUE,) * 3,
    )


def mosaic(
    tiles: list[tuple[np.ndarray, np.ndarray, np.ndarray]], imgsz: int, center: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Four (image, boxes, cls) around a centre of a 2*imgsz canvas (top-left, top-right, bottom-left,
    bottom-right), as ultralytics does; each image is cut at the canvas border, boxes clipped to it."""
    size = 2 * imgsz
    xc, yc = int(center[0] * imgsz), int(center[1] * imgsz)
    canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
    all_boxes, all_cls = [], []
    for k, (img, boxes, cls) in enumerate(tiles):
        h, w = img.shape[:2]
        # Canvas position of the tile's top-left corner; the tile touches the centre with its inner corner.
        x0 = xc - w if k in (0, 2) else xc
        y0 = yc - h if k in (0, 1) else yc
        cx1, cy1, cx2, cy2 = max(x0, 0), max(y0, 0), min(x0 + w, size), min(y0 + h, size)
        canvas[cy1:cy2, cx1:cx2] = img[cy1 - y0 : cy2 - y0, cx1 - x0 : cx2 - x0]
        all_boxes.append(boxes + np.array([x0, y0, x0, y0], np.float32))
        all_cls.append(cls)
    boxes = np.concatenate(all_boxes).clip(0, size)
    return canvas, boxes, np.concatenate(all_cls)


def affine_matrix(
    src_w: int, src_h: int, imgsz: int, scale: float, translate: tuple[float, float], flip: bool
) -> np.ndarray:
    """3x3 map (continuous coordinates) taking the source centre to the output centre (+ translation),
    scaled and optionally mirrored about it."""
    centre = np.array([[1, 0, -src_w / 2], [0, 1, -src_h / 2], [0, 0, 1]], np.float64)
    flip_m = np.diag([-1.0 if flip else 1.0, 1.0, 1.0])
    scale_m = np.diag([scale, scale, 1.0])
    tx, ty = (0.5 + translate[0]) * imgsz, (0.5 + translate[1]) * imgsz
    move = np.array([[1, 0, tx], [0, 1, ty], [0, 0, 1]], np.float64)
    return move @ scale_m @ flip_m @ centre


def warp(img: np.ndarray, matrix: np.ndarray, imgsz: int) -> np.ndarray:
    """Apply a continuous-coordinate affine map; OpenCV puts pixel centres at integers, hence the shifts."""
    half = np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]], np.float64)
    to_cv = np.linalg.inv(half) @ matrix @ half
    return cv2.warpAffine(img, to_cv[:2], (imgsz, imgsz), flags=cv2.INTER_LINEAR, borderValue=(PAD_VALUE,) * 3)


def transform_boxes(boxes: np.ndarray, matrix: np.ndarray, imgsz: int) -> np.ndarray:
    """Map xyxy boxes by an axis-aligned affine (scale, flip, shift) and clip them to the output."""
    xs = boxes[:, [0, 2]] * matrix[0, 0] + matrix[0, 2]
    ys = boxes[:, [1, 3]] * matrix[1, 1] + matrix[1, 2]
    out = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], 1)
    return out.clip(0, imgsz).astype(np.float32)


def keep_boxes(before: np.ndarray, after: np.ndarray, scale: float) -> np.ndarray:
    """Boxes still worth training on: big enough, not sliver-shaped, not mostly cut off."""
    w1, h1 = (before[:, 2] - before[:, 0]) * scale, (before[:, 3] - before[:, 1]) * scale
    w2, h2 = after[:, 2] - after[:, 0], after[:, 3] - after[:, 1]
    aspect = np.maximum(w2 / (h2 + 1e-16), h2 / (w2 + 1e-16))
    kept_area = (w2 * h2) / (w1 * h1 + 1e-16)
    return (w2 >= MIN_BOX_PX) & (h2 >= MIN_BOX_PX) & (kept_area > MIN_AREA_KEPT) & (aspect < MAX_ASPECT)


def hsv_jitter(img: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    """The ultralytics (>= 8.3.79) HSV augmentation, with the gains passed in instead of drawn."""
    if not any(gains):
        return img
    x = np.arange(256, dtype=np.float64)
    lut_hue = ((x + gains[0] * 180) % 180).astype(np.uint8)
    lut_sat = np.clip(x * (1 + gains[1]), 0, 255).astype(np.uint8)
    lut_val = np.clip(x * (1 + gains[2]), 0, 255).astype(np.uint8)
    lut_sat[0] = 0  # keep grey pixels grey
    lut = np.stack([lut_hue, lut_sat, lut_val], -1).reshape(1, 256, 3)
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
    return cv2.cvtColor(cv2.LUT(hsv, lut), cv2.COLOR_HSV2BGR)
