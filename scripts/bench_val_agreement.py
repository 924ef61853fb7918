"""`yolo-resume val` on a checkpoint vs ultralytics' `val` on its `ckpt export` .pt, on one YOLO split.

The run's val split is copied as an ultralytics YOLO dataset (images + labels + data.yaml); ultralytics'
validator scores the exported .pt on it (`YOLO(pt).val(conf=0.001, iou=0.7, save_json=True)`, in a child
process) and `yolo-resume val --config` scores the checkpoint on the same files. Compared:
- detections: per image, the most confident box of each (ours: evaluate.predict_coco, what `val` scores;
  theirs: the validator's predictions.json): same box (IoU) and score. Ultralytics validates "rect"
  batches padded by half a stride (`pad=0.5`: a 128-px square image is fed as 160 px, 16 px of grey at
  each side), we feed the image letterboxed to imgsz exactly; so this is measured twice, on our input and
  with our model fed the input ultralytics' validator builds (which isolates the weights, export and NMS);
- figures: our `ultralytics_map*` (ultralytics' matching and `ap_per_class` on our detections) and our
  COCOeval `map*` (pycocotools: one label per box, 100 detections per image, a step 101-point precision
  sample) against ultralytics' mAP (multi-label, 300 detections, 101-point trapezoid).

Usage: python scripts/bench_val_agreement.py [--run DIR] [--dir WORK] [--json OUT]
Without --run it trains one first: the demo config with yolov5n, 200 train / 60 val images of 128 px,
10 epochs (~5 minutes on 2 CPU cores), so the model finds the shapes (a barely trained one predicts
one constant box and mAP 0 in both, which compares nothing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN_SETS = [
    "model.cfg=yolov5n.yaml",
    "data.num_train=200",
    "data.num_val=60",
    "train.epochs=10",
    "eval.every_epochs=5",
    "train.workers=0",
]

ULTRALYTICS_VAL = """
import json, sys
from ultralytics import YOLO
res = YOLO(sys.argv[1]).val(data=sys.argv[2], imgsz=int(sys.argv[4]), batch=8, conf=0.001, iou=0.7, device="cpu",
                            workers=0, plots=False, verbose=False, save_json=True, project=sys.argv[3], name="val")
print(json.dumps({"map": float(res.box.map), "map50": float(res.box.map50), "dir": str(res.save_dir)}))
"""


def yolo_copy(records, names: list[str], out: Path) -> Path:
    """The records as an ultralytics YOLO dataset (images/val, labels/val) with its data.yaml, numbered
    000..: ultralytics names an image in its predictions.json by the number in its file name."""
    import yaml

    for folder in ("images", "labels"):
        (out / folder / "val").mkdir(parents=True)
    for k, rec in enumerate(records):
        shutil.copy(rec.path, out / "images" / "val" / f"{k:03d}{Path(rec.path).suffix}")
        size = [rec.width, rec.height, rec.width, rec.height]
        lines = []
        for c, box in zip(rec.cls, rec.boxes, strict=True):
            x1, y1, x2, y2 = (float(v) / s for v, s in zip(box, size, strict=True))
            lines.append(f"{int(c)} {(x1 + x2) / 2:.6f} {(y1 + y2) / 2:.6f} {x2 - x1:.6f} {y2 - y1:.6f}\n")
        (out / "labels" / "val" / f"{k:03d}.txt").write_text("".join(lines))
    spec = {"path": str(out), "train": "images/val", "val": "images/val", "names": dict(enumerate(names))}
    (out / "data.yaml").write_text(yaml.safe_dump(spec))
    return out / "data.yaml"


def export_pt(ckpt: Path, out: Path) -> Path:
    from yolo_resume.interop import export_checkpoint

    return export_checkpoint(ckpt, "ultralytics", out)


def ultralytics_val(pt: Path, data_yaml: Path, imgsz: int, work: Path) -> tuple[dict, list[dict]]:
    """Ultralytics' validator on the .pt, in a child process: its mAP and its predictions.json."""
    args = [sys.executable, "-c", ULTRALYTICS_VAL, str(pt), str(data_yaml), str(work), str(imgsz)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=work, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"ultralytics val failed: {done.stderr[-2000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return figures, json.loads((Path(figures["dir"]) / "predictions.json").read_text())


def our_val(ckpt: Path, data_yaml: Path, work: Path) -> dict:
    """`yolo-resume val CKPT --set data.format=yolo --set data.root=DATA_YAML` (in process)."""
    from yolo_resume.val import ValRequest, run_val

    overrides = ("data.format=yolo", f"data.root={data_yaml}", "data.train=", "data.val=")
    report, _ = run_val(ValRequest(str(ckpt), overrides=overrides, device="cpu", save_dir=work / "ours"))
    return report


def our_detections(ckpt: Path, data_yaml: Path, imgsz: int) -> list[dict]:
    """The detections `val` scores (evaluate.predict_coco), each named by the number of its file."""
    import torch
    from torch.utils.data import DataLoader

    from yolo_resume.checkpoint.ref import resolve
    from yolo_resume.config import DataConfig, EvalConfig
    from yolo_resume.data import DetectionDataset, collate_fn, load_split
    from yolo_resume.evaluate import UltralyticsStyleAP, predict_coco
    from yolo_resume.val import load_for_inference

    split = load_split(DataConfig(format="yolo", root=str(data_yaml)), "val")
    model = load_for_inference(resolve(str(ckpt)).one()).model
    loader = DataLoader(DetectionDataset(split, imgsz), batch_size=8, collate_fn=collate_fn)
    dets = predict_coco(model, loader, split.class_to_category, torch.device("cpu"), EvalConfig(), UltralyticsStyleAP())
    number = {r.image_id: int(Path(r.path).stem) for r in split.records}
    return [d | {"image_id": number[d["image_id"]]} for d in dets]


def their_input_detections(ckpt: Path, data_yaml: Path, imgsz: int, stride: int = 32) -> list[dict]:
    """Our model's multi-label detections (as the validator's) on the input ultralytics' validator builds
    for a square image of imgsz: padded with grey (114) to ceil(imgsz / stride + 0.5) * stride."""
    import math

    import cv2
    import torch
    from ultralytics.utils.nms import non_max_suppression

    from yolo_resume.checkpoint.ref import resolve
    from yolo_resume.val import load_for_inference

    model = load_for_inference(resolve(str(ckpt)).one()).model
    side = math.ceil(imgsz / stride + 0.5) * stride
    pad = (side - imgsz) // 2
    dets = []
    for path in sorted((data_yaml.parent / "images" / "val").iterdir()):
        img = cv2.imread(str(path))
        if img.shape[:2] != (imgsz, imgsz):
            raise ValueError(f"{path}: only square images of imgsz are fed alike here")
        img = cv2.copyMakeBorder(img, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=(114, 114, 114))
        tensor = torch.from_numpy(img[:, :, ::-1].transpose(2, 0, 1).copy()).float()[None] / 255
        with torch.no_grad():
            found = non_max_suppression(model(tensor)[0], 0.001, 0.7, multi_label=True, max_det=300)[0]
        boxes = (found[:, :4] - pad).clamp(0, imgsz)  # in the original image, clipped to it (as theirs)
        for (x1, y1, x2, y2), score in zip(boxes.tolist(), found[:, 4].tolist(), strict=True):
            dets.append({"image_id": int(path.stem), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    return dets


def top_per_image(dets: list[dict]) -> dict[int, dict]:
    best: dict[int, dict] = {}
    for d in dets:
        if d["image_id"] not in best or d["score"] > best[d["image_id"]]["score"]:
            best[d["image_id"]] = d
    return best


def iou_xywh(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def compare_top(ours: list[dict], theirs: list[dict]) -> dict:
    """Per image, the most confident detection of each: how many images have the same one (IoU > 0.99 and
    scores within 1e-3), the median IoU and score gap, and how many distinct boxes there are (a model that
    predicts one constant box agrees trivially)."""
    import statistics

    mine, other = top_per_image(ours), top_per_image(theirs)
    images = sorted(set(mine) | set(other))
    both = [i for i in images if i in mine and i in other]
    ious = [iou_xywh(mine[i]["bbox"], other[i]["bbox"]) for i in both]
    gaps = [abs(mine[i]["score"] - other[i]["score"]) for i in both]
    return {
        "images": len(images),
        "in_both": len(both),
        "same": sum(iou > 0.99 and gap < 1e-3 for iou, gap in zip(ious, gaps, strict=True)),
        "median_iou": statistics.median(ious) if ious else 0.0,
        "median_score_gap": statistics.median(gaps) if gaps else 0.0,
        "max_score_gap": max(gaps, default=0.0),
        "distinct_boxes": len({tuple(round(v, 1) for v in mine[i]["bbox"]) for i in both}),
    }


def compare(ckpt: Path, records, names: list[str], imgsz: int, work: Path) -> dict:
    data_yaml = yolo_copy(records, names, work / "yolo")
    pt = export_pt(ckpt, work / "model.pt")
    theirs, their_dets = ultralytics_val(pt, data_yaml, imgsz, work)
    report = our_val(ckpt, data_yaml, work)
    m = report["metrics"]
    return {
        "checkpoint": str(ckpt),
        "images": report["images"],
        "top_detection_on_our_input": compare_top(our_detections(ckpt, data_yaml, imgsz), their_dets),
        "top_detection_on_their_input": compare_top(their_input_detections(ckpt, data_yaml, imgsz), their_dets),
        "ultralytics_val": {"map": theirs["map"], "map50": theirs["map50"]},
        "ours": {k: m[k] for k in ("ultralytics_map", "ultralytics_map50", "map", "map50")},
        "ours_minus_theirs": {
            "ultralytics_map": m["ultralytics_map"] - theirs["map"],
            "ultralytics_map50": m["ultralytics_map50"] - theirs["map50"],
            "coco_map": m["map"] - theirs["map"],
            "coco_map50": m["map50"] - theirs["map50"],
        },
    }


def train_run(work: Path) -> Path:
    run = work / "run"
    sets = [a for s in TRAIN_SETS + [f"data.root={work / 'data'}"] for a in ("--set", s)]
    config = REPO / "configs" / "demo.yaml"
    cmd = [sys.executable, "-m", "yolo_resume", "train", "--config", str(config), "--run-dir", str(run), "-q", *sets]
    subprocess.run(cmd, check=True, cwd=work)
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a finished run (default: train one, see the module docstring)")
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from yolo_resume.checkpoint.ref import best_of, resolve
    from yolo_resume.config import load_config
    from yolo_resume.data import load_split

    work = args.dir or Path(tempfile.mkdtemp(prefix="val-agreement-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    run = args.run or train_run(work)
    infos = [i for i in resolve(str(run)).infos() if i.valid]
    best = best_of(infos)
    ckpt = Path(str(next(i for i in reversed(infos) if i.name in best).path))
    cfg = load_config(run / "config.yaml")
    names = json.loads((ckpt / "meta.json").read_text())["names"]
    records = load_split(cfg.data, "val").records
    result = compare(ckpt, records, names, cfg.model.imgsz, work / "compare")
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
