"""mAP of a detector, two ways from one forward pass over the val split.

- `map`, `map50` (the figures `best` is chosen by): COCO's own definition. Ultralytics NMS (one label per
  box), then pycocotools COCOeval in original image coordinates, which keeps the 100 highest-scoring
  detections per image and samples the precision envelope at 101 recall points.
- `ultralytics_map`, `ultralytics_map50`: the metric `yolo val` / `yolo train` print. Multi-label NMS (a box
  may count for several classes), up to `eval.max_det` (300) detections per image, ultralytics' greedy
  matching (`BaseValidator.match_predictions`) and `ap_per_class` (101-point interpolation of the envelope
  by the trapezoid rule). On the same detections it equals ultralytics' `DetMetrics` (tested to 1e-9); for
  the same weights on square images it was within 0.005 of `yolo val` (BENCHMARKS.md); on others
  ultralytics validates rectangular batches (less padding), so its inputs, and its figure, differ a little.
"""

from __future__ import annotations

import contextlib
import io
from typing import TYPE_CHECKING

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval
from ultralytics.engine.validator import BaseValidator
from ultralytics.utils.metrics import ap_per_class, box_iou, smooth
from ultralytics.utils.nms import non_max_suppression

from .config import EvalConfig

if TYPE_CHECKING:
    from .pictures import ValPictures


def fitness(metrics: dict[str, float]) -> float:
    """The number `best` is chosen by (the ultralytics weighting of mAP@.5 and mAP@.5:.95)."""
    return 0.1 * metrics.get("map50", 0.0) + 0.9 * metrics.get("map", 0.0)


def to_original_xywh(boxes: np.ndarray, ratio_pad, ori_shape) -> np.ndarray:
    """Letterboxed xyxy -> original-image xywh (the COCO result format)."""
    ratio, (padw, padh) = ratio_pad
    ratio = float(np.mean(ratio)) if isinstance(ratio, (tuple, list)) else float(ratio)
    out = boxes.copy()
    out[:, [0, 2]] = ((out[:, [0, 2]] - padw) / ratio).clip(0, ori_shape[1])
    out[:, [1, 3]] = ((out[:, [1, 3]] - padh) / ratio).clip(0, ori_shape[0])
    out[:, 2:] -= out[:, :2]
    return out


IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)


def image_truth(batch: dict, i: int, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Image `i` of a collated batch: its classes and its boxes as letterboxed-pixel xyxy (CPU float)."""
    mine = batch["batch_idx"] == i
    xywh = batch["bboxes"][mine].float().cpu() * scale
    xyxy = torch.cat([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)
    return batch["cls"][mine].view(-1).cpu(), xyxy


class UltralyticsStyleAP:
    """Ultralytics' validation metric over letterboxed boxes, built from its own matching and AP functions."""

    def __init__(self) -> None:
        self.stats: dict[str, list[np.ndarray]] = {"tp": [], "conf": [], "pred_cls": [], "target_cls": []}
        self._matcher = type("Matcher", (), {"iouv": IOU_THRESHOLDS})()  # what match_predictions reads

    def update(self, dets: list[torch.Tensor], batch: dict) -> None:
        height, width = batch["img"].shape[2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        for i, det in enumerate(dets):
            det = det.float().cpu()
            true_cls, true_xyxy = image_truth(batch, i, scale)
            if len(det) and len(true_cls):
                iou = box_iou(true_xyxy, det[:, :4])
                tp = BaseValidator.match_predictions(self._matcher, det[:, 5], true_cls, iou).numpy()
            else:
                tp = np.zeros((len(det), len(IOU_THRESHOLDS)), bool)
            self.stats["tp"].append(tp)
            self.stats["conf"].append(det[:, 4].numpy())
            self.stats["pred_cls"].append(det[:, 5].numpy())
            self.stats["target_cls"].append(true_cls.numpy())

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) if v else np.zeros(0) for k, v in self.stats.items()}

    def result(self) -> dict[str, float]:
        stats = self.arrays()
        if not len(stats["tp"]) or not len(stats["target_cls"]):
            return {"ultralytics_map": 0.0, "ultralytics_map50": 0.0}
        ap = ap_per_class(stats["tp"], stats["conf"], stats["pred_cls"], stats["target_cls"])[5]
        return {"ultralytics_map": float(ap.mean()), "ultralytics_map50": float(ap[:, 0].mean())}

    def per_class(self) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
        """Per labelled class: ultralytics AP@.5:.95, AP@.5, precision and recall at the confidence that
        maximises the mean F1 (ultralytics' rule: the smoothed mean F1 curve's argmax); and that
        confidence with the mean precision, recall and F1 there (what `yolo val` prints as P and R)."""
        stats = self.arrays()
        if not len(stats["tp"]) or not len(stats["target_cls"]):
            return {}, {"conf": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}
        _, _, p, r, f1, ap, classes, _, _, f1_curve, x, _ = ap_per_class(
            stats["tp"], stats["conf"], stats["pred_cls"], stats["target_cls"]
        )
        best = int(smooth(f1_curve.mean(0), 0.1).argmax())
        rows = {
            int(c): {
                "ap": float(ap[i].mean()),
                "ap50": float(ap[i, 0]),
                "precision": float(p[i]),
                "recall": float(r[i]),
            }
            for i, c in enumerate(classes)
        }
        at_best = {
            "conf": float(x[best]),
            "precision": float(p.mean()),
            "recall": float(r.mean()),
            "f1": float(f1.mean()),
        }
        return rows, at_best


@torch.no_grad()
def predict_coco(
    model: torch.nn.Module,
    loader,
    class_to_category: list[int],
    device,
    cfg: EvalConfig,
    ul: UltralyticsStyleAP,
    pictures: ValPictures | None = None,
) -> list:
    """Detections for every image of `loader`, as COCO result dicts; `ul` gets the multi-label ones, and so
    does `pictures` (the confusion matrix and the first batch's picture: the detections the metric scores)."""
    was_training = model.training
    model.eval()
    results = []
    for batch in loader:
        img = batch["img"].to(device, non_blocking=True).float() / 255
        preds = model(img)
        preds = preds[0] if isinstance(preds, (list, tuple)) else preds
        # clone: some ultralytics versions convert the boxes of the tensor they are given in place
        multi = non_max_suppression(preds.clone(), cfg.conf, cfg.iou, multi_label=True, max_det=cfg.max_det)
        ul.update(multi, batch)
        if pictures is not None:
            pictures.update(multi, batch)
        dets = non_max_suppression(preds, cfg.conf, cfg.iou, max_det=cfg.max_det)
        for det, image_id, ratio_pad, ori_shape in zip(
            dets, batch["image_id"], batch["ratio_pad"], batch["ori_shape"], strict=True
        ):
            det = det.float().cpu().numpy()
            if not len(det):
                continue
            xywh = to_original_xywh(det[:, :4], ratio_pad, ori_shape)
            for box, score, cls in zip(xywh, det[:, 4], det[:, 5].astype(int), strict=True):
                results.append(
                    {
                        "image_id": int(image_id),
                        "category_id": int(class_to_category[cls]),
                        "bbox": [round(float(v), 3) for v in box],
                        "score": round(float(score), 5),
                    }
                )
    model.train(was_training)
    return results


def coco_eval(coco_gt, results: list, image_ids: list[int]) -> COCOeval | None:
    """The summarized pycocotools evaluation (its printout silenced); None without detections."""
    if not results:
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator


def coco_map(coco_gt, results: list, image_ids: list[int]) -> dict[str, float]:
    """mAP@[.5:.95] and mAP@.5 from pycocotools."""
    return _map_of(coco_eval(coco_gt, results, image_ids))


def _map_of(evaluator: COCOeval | None) -> dict[str, float]:
    if evaluator is None:
        return {"map": 0.0, "map50": 0.0}
    stats = [max(float(s), 0.0) for s in evaluator.stats[:2]]  # -1 means "no ground truth"
    return {"map": stats[0], "map50": stats[1]}


def coco_per_category(evaluator: COCOeval | None) -> dict[int, dict[str, float]]:
    """COCO AP@[.5:.95] and AP@.5 per category id (area all, 100 detections: what `stats[0:2]` average);
    a category without ground truth is left out (COCO marks its precision -1)."""
    if evaluator is None:
        return {}
    precision = evaluator.eval["precision"]  # [IoU threshold, recall point, category, area, max dets]
    rows = {}
    for k, cat_id in enumerate(evaluator.params.catIds):
        p = precision[:, :, k, 0, -1]
        if (p > -1).any():
            p50 = p[0][p[0] > -1]
            rows[int(cat_id)] = {"ap": float(p[p > -1].mean()), "ap50": float(p50.mean()) if len(p50) else 0.0}
    return rows


def evaluate_detailed(
    model: torch.nn.Module, loader, dataset, device, cfg: EvalConfig, pictures: ValPictures | None = None
) -> dict:
    """What `evaluate` returns (from the same detections) plus a per-class table and the precision and
    recall at the best-F1 confidence: the report of `yolo-resume val`."""
    ul = UltralyticsStyleAP()
    results = predict_coco(model, loader, dataset.class_to_category, device, cfg, ul, pictures)
    if pictures is not None:
        pictures.stats = ul.arrays()
    image_ids = [int(r.image_id) for r in dataset.records]
    evaluator = coco_eval(dataset.coco_gt(), results, image_ids)
    metrics = _map_of(evaluator)
    metrics["fitness"] = fitness(metrics)
    metrics |= ul.result()
    coco_rows, (ul_rows, at_best) = coco_per_category(evaluator), ul.per_class()
    all_cls = np.concatenate([np.asarray(r.cls, np.int64).reshape(-1) for r in dataset.records])
    labels = np.bincount(all_cls, minlength=len(dataset.names))
    classes = []
    for c, name in enumerate(dataset.names):
        coco_row = coco_rows.get(int(dataset.class_to_category[c]), {})
        ul_row = ul_rows.get(c, {})
        classes.append(
            {
                "class": c,
                "name": name,
                "labels": int(labels[c]),
                "ap": coco_row.get("ap", 0.0),
                "ap50": coco_row.get("ap50", 0.0),
                "ultralytics_ap": ul_row.get("ap", 0.0),
                "precision": ul_row.get("precision", 0.0),
                "recall": ul_row.get("recall", 0.0),
            }
        )
    return {
        "metrics": metrics,
        "best_f1": at_best,
        "classes": classes,
        "images": len(dataset),
        "detections": len(results),
    }


def evaluate(
    model: torch.nn.Module, loader, dataset, device, cfg: EvalConfig, pictures: ValPictures | None = None
) -> dict[str, float]:
    """The metrics training records; `pictures` (optional) collects what the validation pictures show."""
    ul = UltralyticsStyleAP()
    results = predict_coco(model, loader, dataset.class_to_category, device, cfg, ul, pictures)
    if pictures is not None:
        pictures.stats = ul.arrays()
    image_ids = [int(r.image_id) for r in dataset.records]
    metrics = coco_map(dataset.coco_gt(), results, image_ids)
    metrics["fitness"] = fitness(metrics)
    return metrics | ul.result()
