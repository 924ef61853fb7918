"""COCO mAP of a detector: ultralytics NMS, then pycocotools COCOeval in original image coordinates."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import torch
from pycocotools.cocoeval import COCOeval
from ultralytics.utils.nms import non_max_suppression

from .config import EvalConfig


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


@torch.no_grad()
def predict_coco(model: torch.nn.Module, loader, class_to_category: list[int], device, cfg: EvalConfig) -> list:
    """Detections for every image of `loader`, as COCO result dicts."""
    was_training = model.training
    model.eval()
    results = []
    for batch in loader:
        img = batch["img"].to(device, non_blocking=True).float() / 255
        preds = model(img)
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


def coco_map(coco_gt, results: list, image_ids: list[int]) -> dict[str, float]:
    """mAP@[.5:.95] and mAP@.5 from pycocotools (its printout silenced)."""
    if not results:
        return {"map": 0.0, "map50": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(results)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(float(s), 0.0) for s in evaluator.stats[:2]]  # -1 means "no ground truth"
    return {"map": stats[0], "map50": stats[1]}


def evaluate(model: torch.nn.Module, loader, dataset, device, cfg: EvalConfig) -> dict[str, float]:
    results = predict_coco(model, loader, dataset.class_to_category, device, cfg)
    image_ids = [int(r.image_id) for r in dataset.records]
    metrics = coco_map(dataset.coco_gt(), results, image_ids)
    metrics["fitness"] = fitness(metrics)
    return metrics
