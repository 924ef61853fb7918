"""`yolo-resume predict`: run a checkpoint on images and draw what it finds.

Thin over ultralytics: its `LetterBox` prepares each image as its predictor does (square, stride 32,
grey padding), its `non_max_suppression` and `scale_boxes` turn the raw output into boxes in the
original pixels, and its `Annotator` draws them with class names and its palette. The checkpoint is
verified through `checkpoint.ref` exactly as `val` and `--resume` do.
"""

from __future__ import annotations

import glob
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from .errors import UserError
from .files import atomic_write


@dataclass(frozen=True)
class PredictRequest:
    checkpoint: str
    sources: tuple[str, ...]
    conf: float = 0.25
    iou: float = 0.7
    imgsz: int | None = None
    save_dir: Path | None = None
    weights: str = "ema"
    device: str | None = None
    max_det: int = 300


def list_sources(sources: tuple[str, ...] | list[str]) -> list[Path]:
    """Image files named directly, found in folders (not recursive, sorted), or matched by globs."""
    from ultralytics.data.utils import IMG_FORMATS

    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.suffix.lower().lstrip(".") in IMG_FORMATS)
            if not matches:
                raise UserError(f"folder `{source}` holds no images ({', '.join(sorted(IMG_FORMATS))})")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(source):
            matches = sorted(Path(p) for p in glob.glob(source, recursive=True) if Path(p).is_file())
            matches = [p for p in matches if p.suffix.lower().lstrip(".") in IMG_FORMATS]
            if not matches:
                raise UserError(f"pattern `{source}` matches no image file")
        else:
            raise UserError(f"`{source}` does not exist; give image files, folders or glob patterns")
        found += [p for p in matches if p not in found]
    return found


def predict_image(model: torch.nn.Module, image: np.ndarray, imgsz: int, device, request: PredictRequest) -> np.ndarray:
    """Detections (n, 6: x1 y1 x2 y2 conf class) of one BGR image, in its own pixels."""
    from ultralytics.data.augment import LetterBox
    from ultralytics.utils.nms import non_max_suppression
    from ultralytics.utils.ops import scale_boxes

    boxed = LetterBox((imgsz, imgsz), auto=False, stride=32)(image=image)
    tensor = torch.from_numpy(np.ascontiguousarray(boxed[:, :, ::-1].transpose(2, 0, 1)))  # BGR -> RGB CHW
    with torch.no_grad():
        preds = model(tensor[None].to(device).float() / 255)
    preds = preds[0] if isinstance(preds, (list, tuple)) else preds
    det = non_max_suppression(preds, request.conf, request.iou, max_det=request.max_det)[0].float().cpu()
    det[:, :4] = scale_boxes(boxed.shape[:2], det[:, :4], image.shape[:2])
    return det.numpy()


def draw(image: np.ndarray, det: np.ndarray, names: list[str]) -> np.ndarray:
    """The image with each box and `name conf` drawn by ultralytics' Annotator (OpenCV drawing: no font
    file to download)."""
    from ultralytics.utils.plotting import Annotator, colors

    annotator = Annotator(image.copy(), pil=False)
    for *box, conf, cls in det.tolist():
        annotator.box_label(box, f"{names[int(cls)]} {conf:.2f}", color=colors(int(cls), True))
    return annotator.result()


def run_predict(request: PredictRequest) -> tuple[list[dict], Path]:
    """Predict every source image; write the drawn pictures and `predictions.json` to the save folder."""
    from .val import check_inference_args, inference_device, load_for_inference, pick_checkpoint, report_dir

    check_inference_args(request.conf, request.iou, request.imgsz)
    device = inference_device(request.device)
    images = list_sources(request.sources)  # bad sources are refused before the checkpoint is read
    ref = pick_checkpoint(request.checkpoint)
    loaded = load_for_inference(ref, request.weights)
    model = loaded.model.to(device)
    imgsz = request.imgsz or loaded.cfg.model.imgsz
    folder = Path(request.save_dir) if request.save_dir else report_dir(ref, None, "predict")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the save folder `{folder}`: {exc.strerror or exc}; pass --save-dir") from None
    rows, written = [], set()
    for path in images:
        image = cv2.imread(str(path))
        if image is None:
            raise UserError(f"image `{path}` cannot be read or decoded; remove it from the sources")
        det = predict_image(model, image, imgsz, device, request)
        out = _unique_name(folder, path, written)
        if not cv2.imwrite(str(out), draw(image, det, loaded.names)):
            raise UserError(f"could not write `{out}`; check that the save folder is writable")
        rows.append(
            {
                "image": str(path),
                "output": str(out),
                "width": int(image.shape[1]),
                "height": int(image.shape[0]),
                "detections": [
                    {
                        "class": int(cls),
                        "name": loaded.names[int(cls)],
                        "confidence": round(float(conf), 5),
                        "box_xyxy": [round(float(v), 2) for v in box],
                    }
                    for *box, conf, cls in det.tolist()
                ],
            }
        )
    doc = {"checkpoint": str(ref.where), "weights": loaded.weights, "imgsz": imgsz, "conf": request.conf}
    report = folder / "predictions.json"
    atomic_write(report, json.dumps(doc | {"images": rows}, indent=2) + "\n")
    return rows, report


def _unique_name(folder: Path, source: Path, taken: set[str]) -> Path:
    """`<stem>.jpg` in the save folder; two sources with one stem (from two folders) get `-2`, `-3`."""
    stem, n = source.stem, 1
    name = f"{stem}.jpg"
    while name in taken:
        n += 1
        name = f"{stem}-{n}.jpg"
    taken.add(name)
    return folder / name
