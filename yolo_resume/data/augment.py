"""Image and box operations: decoding at the needed size, letterbox, mosaic + affine in one warp, HSV jitter.

Everything random arrives as an `AugParams` drawn from the caller's local generator, so these
functions are pure. Geometry is kept exact: boxes live in continuous pixel coordinates (pixel i
spans [i, i+1]) and the warp matrix is converted to OpenCV's pixel-centre convention, so a box
and the pixels it encloses move together to within interpolation blur.

Images are BGR uint8 (as OpenCV decodes them) until the dataset splits them into RGB planes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import simplejpeg

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
    partner_u: tuple[float, float, float]  # uniforms in [0, 1) the dataset maps to the other three mosaic images
    center: tuple[float, float]  # mosaic centre, as a fraction of imgsz in [0.5, 1.5]
    scale: float
    translate: tuple[float, float]  # fraction of imgsz
    flip: bool
    hsv: tuple[float, float, float]  # gains in [-1, 1] * (hsv_h, hsv_s, hsv_v)


def draw_params(rng: np.random.Generator, cfg: AugmentConfig) -> AugParams:
    """Draw in a fixed order and always draw everything, so that one setting (e.g. mosaic off for
    close_mosaic) never shifts the values the other augmentations get."""
    mosaic_u = float(rng.random())
    partner_u = tuple(float(u) for u in rng.random(3))
    center = tuple(float(c) for c in rng.uniform(0.5, 1.5, 2))
    scale = float(rng.uniform(1 - cfg.scale, 1 + cfg.scale))
    translate = tuple(float(t) for t in rng.uniform(-cfg.translate, cfg.translate, 2))
    flip = bool(rng.random() < cfg.fliplr)
    hsv = tuple(float(g) for g in rng.uniform(-1, 1, 3) * (cfg.hsv_h, cfg.hsv_s, cfg.hsv_v))
    return AugParams(mosaic_u, partner_u, center, max(scale, MIN_SCALE), translate, flip, hsv)  # type: ignore[arg-type]


_JPEG_MAGIC = b"\xff\xd8\xff"
# OpenCV decodes a JPEG at 1/2, 1/4 or 1/8 of its size in the DCT (libjpeg scaling: ceil(size / f),
# about as sharp as an area resize and 2-4x faster than a full decode). Other formats are decoded
# whole and shrunk with a nearest-like resize, so they never take this path.
_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))


def reduction(buf: np.ndarray, width: int, height: int, need_w: int, need_h: int) -> tuple[int, int]:
    """(factor, imread flag) of the smallest JPEG decode that is still at least need_w x need_h."""
    if _is_jpeg(buf):
        for factor, flag in _REDUCED:
            if -(-width // factor) >= need_w and -(-height // factor) >= need_h:
                return factor, flag
    return 1, cv2.IMREAD_COLOR


def decode(rec: ImageRecord, need: tuple[int, int] | None = None) -> np.ndarray:
    """BGR uint8 image of the size the record says, or, given need = (w, h), a JPEG decoded at a reduced
    size no smaller than that (the caller resizes it the rest of the way); a one-line DataError for a bad file."""
    try:
        buf = np.fromfile(rec.path, np.uint8)
    except OSError:
        raise DataError(f"image `{rec.path}` cannot be read; check that it still exists") from None
    factor, flag = reduction(buf, rec.width, rec.height, *need) if need else (1, cv2.IMREAD_COLOR)
    shape = (-(-rec.height // factor), -(-rec.width // factor))
    img = decode_plain_jpeg(buf, rec.width, rec.height, factor)
    if img is None:
        img = cv2.imdecode(buf, flag)
    if img is not None and img.shape[:2] != shape:
        # Annotations made on the raw pixels of an EXIF-rotated JPEG: read it unrotated.
        img = cv2.imdecode(buf, flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise DataError(f"image `{rec.path}` cannot be decoded; replace or remove it")
    if img.shape[:2] != shape and factor > 1:
        return decode(rec)  # the full-size decode names the size the file really has
    if img.shape[:2] != shape:
        raise DataError(
            f"image `{rec.path}` is {img.shape[1]}x{img.shape[0]} but its annotation says "
            f"{rec.width}x{rec.height}; fix the annotation"
        )
    return img


def decode_plain_jpeg(buf: np.ndarray, width: int, height: int, factor: int = 1) -> np.ndarray | None:
    """A JPEG without EXIF, of width x height, decoded to BGR at 1/factor of its size (1, 2, 4 or 8) by
    simplejpeg (libjpeg-turbo's TurboJPEG API: the pixels of `cv2.imdecode` with the same IMREAD_REDUCED
    factor, for 0.93x its CPU at full size and 0.96x at 1/2, BENCHMARKS.md); None for anything else (not a
    JPEG, EXIF that OpenCV may rotate by, another size than expected, a damaged file), which `cv2.imdecode`
    then decodes or rejects as before."""
    if not _is_jpeg(buf) or _may_have_exif(memoryview(buf)):
        return None
    try:
        if simplejpeg.decode_jpeg_header(buf)[:2] != (height, width):
            return None  # OpenCV's path names the size the file really has
        need_h, need_w = -(-height // factor), -(-width // factor)  # with min_factor: exactly libjpeg's 1/factor
        return simplejpeg.decode_jpeg(buf, "BGR", min_height=need_h, min_width=need_w, min_factor=factor)
    except ValueError:  # TurboJPEG's errors, warnings included (a truncated file): OpenCV's rules decide
        return None


def _is_jpeg(buf: np.ndarray) -> bool:
    return buf[:3].tobytes() == _JPEG_MAGIC


_STANDALONE = frozenset({0x01, *range(0xD0, 0xDA)})  # JPEG markers without a length (TEM, RSTn, SOI, EOI)


def _may_have_exif(data: memoryview) -> bool:
    """Whether a JPEG has an APP1 "Exif" segment before its first scan (where libjpeg reads the metadata
    OpenCV takes the orientation from): a walk over the few segment headers, not a parse. Anything
    unexpected counts as yes, so only a cleanly structured file without EXIF answers no."""
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return True
        marker = data[pos + 1]
        if marker == 0xFF or marker in _STANDALONE:  # fill byte; markers without a segment
            pos += 1 if marker == 0xFF else 2
            continue
        if marker == 0xDA:  # start of scan: the metadata is behind us
            return False
        if marker == 0xE1 and data[pos + 4 : pos + 10] == b"Exif\x00\x00":
            return True
        pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
    return True


def letterbox_geometry(width: int, height: int, imgsz: int) -> tuple[float, int, int, int, int]:
    """(ratio, resized width, resized height, pad left, pad top) of the plain letterbox."""
    ratio = imgsz / max(width, height)
    new_w = min(max(1, round(width * ratio)), imgsz)
    new_h = min(max(1, round(height * ratio)), imgsz)
    return ratio, new_w, new_h, (imgsz - new_w) // 2, (imgsz - new_h) // 2


def load_resized(rec: ImageRecord, imgsz: int) -> tuple[np.ndarray, float]:
    """The image resized so its long side is imgsz (area averaging when shrinking: no aliasing), and the
    ratio to the record's pixels. JPEGs are decoded at the smallest reduced size that is still big enough."""
    ratio, new_w, new_h, _, _ = letterbox_geometry(rec.width, rec.height, imgsz)
    img = decode(rec, need=(new_w, new_h))
    if img.shape[:2] != (new_h, new_w):
        interp = cv2.INTER_AREA if img.shape[1] > new_w or img.shape[0] > new_h else cv2.INTER_LINEAR
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


def mosaic_offsets(shapes: list[tuple[int, ...]], imgsz: int, center: tuple[float, float]) -> list[tuple[int, int]]:
    """Canvas position (x, y) of the top-left pixel of each of four images (top-left, top-right,
    bottom-left, bottom-right) on a 2*imgsz canvas, as ultralytics places them: each touches the
    centre with its inner corner, and the canvas border cuts what sticks out."""
    xc, yc = int(center[0] * imgsz), int(center[1] * imgsz)
    return [(xc - w if k in (0, 2) else xc, yc - h if k in (0, 1) else yc) for k, (h, w, *_) in enumerate(shapes)]


def place_boxes(boxes: np.ndarray, offsets: np.ndarray, canvas: tuple[int, int]) -> np.ndarray:
    """Boxes moved by their images' canvas positions (one (x, y) row per box) and clipped to the canvas."""
    moved = boxes + np.tile(np.asarray(offsets, np.float32).reshape(-1, 2), 2)
    return np.clip(moved, 0, np.array([*canvas, *canvas], np.float32))


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


def compose(
    images: list[np.ndarray],
    offsets: list[tuple[int, int]],
    canvas: tuple[int, int],
    scale: float,
    translate: tuple[float, float],
    flip: bool,
    out: np.ndarray,
) -> list[np.ndarray]:
    """What pasting the images at `offsets` on a (width, height) canvas of PAD_VALUE and warping it by
    `affine_matrix(*canvas, imgsz, scale, translate, flip)` into `out` (imgsz x imgsz x 3, overwritten)
    gives (the mosaic + affine of ultralytics), in one pass: no canvas is filled or copied, every output
    pixel is interpolated once. The map is axis-aligned, so each image (cut at the canvas border) lands
    in its own output rectangle, filled by one `cv2.resize` (~3x faster than `warpAffine`) of the
    integer source crop that maps closest to that rectangle. Returns, per image, the 3x3 map from
    canvas to output coordinates it really got (within half an output pixel of the nominal one):
    boxes must follow these. At an image's edge the interpolation repeats its border pixels instead of
    blending in the neighbour. A mirror is one flip of the whole output at the end."""
    imgsz = out.shape[0]
    # mirror(x) = imgsz - x after the map without mirror and with the x shift negated is the mirrored map
    plain = affine_matrix(*canvas, imgsz, scale, (-translate[0] if flip else translate[0], translate[1]), False)
    out.fill(PAD_VALUE)
    maps = []
    for img, (x0, y0) in zip(images, offsets, strict=True):
        h, w = img.shape[:2]
        xs = _realized_span(plain[0, 0], plain[0, 2], max(x0, 0), min(x0 + w, canvas[0]), imgsz)
        ys = _realized_span(plain[1, 1], plain[1, 2], max(y0, 0), min(y0 + h, canvas[1]), imgsz)
        if xs is None or ys is None:  # cut off by the canvas border, or mapped outside the output
            maps.append(plain)
            continue
        (rx1, rx2, sx1, sx2), (ry1, ry2, sy1, sy2) = xs, ys
        cv2.resize(
            img[sy1 - y0 : sy2 - y0, sx1 - x0 : sx2 - x0],
            (rx2 - rx1, ry2 - ry1),
            dst=out[ry1:ry2, rx1:rx2],
            interpolation=cv2.INTER_LINEAR,
        )
        gx, gy = (rx2 - rx1) / (sx2 - sx1), (ry2 - ry1) / (sy2 - sy1)
        maps.append(np.array([[gx, 0, rx1 - gx * sx1], [0, gy, ry1 - gy * sy1], [0, 0, 1]], np.float64))
    if flip:
        cv2.flip(out, 1, dst=out)
        mirror = np.array([[-1, 0, imgsz], [0, 1, 0], [0, 0, 1]], np.float64)
        maps = [mirror @ m for m in maps]
    return maps


def _realized_span(gain: float, shift: float, lo: int, hi: int, size: int) -> tuple[int, int, int, int] | None:
    """Along one axis (gain > 0): the output pixels [r1, r2) (of 0..size) whose centres x -> gain * x + shift
    maps [lo, hi) onto, and the integer source span [s1, s2) inside [lo, hi) that maps closest to them;
    None if either is empty. Neighbouring images share a boundary, computed alike, so their output spans
    tile the output exactly."""
    if hi <= lo:
        return None
    r1 = max(math.ceil(gain * lo + shift - 0.5), 0)
    r2 = min(math.ceil(gain * hi + shift - 0.5), size)
    if r2 <= r1:
        return None
    s1 = min(max(round((r1 - shift) / gain), lo), hi - 1)
    s2 = max(min(round((r2 - shift) / gain), hi), s1 + 1)
    return r1, r2, s1, s2


def transform_boxes(boxes: np.ndarray, matrices: np.ndarray, imgsz: int) -> np.ndarray:
    """Map xyxy boxes, each by its own axis-aligned affine (scale, flip, shift; one 3x3 per box), and
    clip them to the output."""
    m = matrices
    xs = boxes[:, [0, 2]] * m[:, 0, :1] + m[:, 0, 2:]
    ys = boxes[:, [1, 3]] * m[:, 1, 1:2] + m[:, 1, 2:]
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
    """The ultralytics (>= 8.3.79) HSV augmentation with the gains passed in instead of drawn, in place:
    one 3-channel LUT between the two colour conversions."""
    if not any(gains):
        return img
    x = np.arange(256, dtype=np.float64)
    lut_hue = ((x + gains[0] * 180) % 180).astype(np.uint8)
    lut_sat = np.clip(x * (1 + gains[1]), 0, 255).astype(np.uint8)
    lut_val = np.clip(x * (1 + gains[2]), 0, 255).astype(np.uint8)
    lut_sat[0] = 0  # keep grey pixels grey
    lut = np.stack([lut_hue, lut_sat, lut_val], -1).reshape(1, 256, 3)
    hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV, dst=img)
    return cv2.cvtColor(cv2.LUT(hsv, lut, dst=hsv), cv2.COLOR_HSV2BGR, dst=hsv)
