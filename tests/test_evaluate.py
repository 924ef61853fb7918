"""The two mAP figures: COCO's (pycocotools) and the ultralytics-style one `yolo val` prints."""

import pytest
import torch

from yolo_resume.evaluate import UltralyticsStyleAP

IMGSZ = 100


def _batch(boxes_xyxy: list[list[list[float]]], classes: list[list[int]]) -> dict:
    """A val batch in our collate layout: normalised xywh boxes, classes and batch_idx."""
    bboxes, cls, idx = [], [], []
    for i, (boxes, names) in enumerate(zip(boxes_xyxy, classes, strict=True)):
        for (x1, y1, x2, y2), c in zip(boxes, names, strict=True):
            bboxes.append([(x1 + x2) / 2 / IMGSZ, (y1 + y2) / 2 / IMGSZ, (x2 - x1) / IMGSZ, (y2 - y1) / IMGSZ])
            cls.append([float(c)])
            idx.append(float(i))
    return {
        "img": torch.zeros(len(boxes_xyxy), 3, IMGSZ, IMGSZ),
        "bboxes": torch.tensor(bboxes),
        "cls": torch.tensor(cls),
        "batch_idx": torch.tensor(idx),
    }


def _dets(rows: list[list[float]]) -> torch.Tensor:
    """NMS output rows: x1, y1, x2, y2, conf, cls."""
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 6)


GT = [[[10, 10, 50, 50], [60, 60, 90, 95]], [[20, 30, 70, 80]]]
GT_CLS = [[0, 1], [0]]


def test_perfect_detections_score_one():
    ap = UltralyticsStyleAP()
    ap.update(
        [_dets([[10, 10, 50, 50, 0.9, 0], [60, 60, 90, 95, 0.8, 1]]), _dets([[20, 30, 70, 80, 0.7, 0]])],
        _batch(GT, GT_CLS),
    )
    # 0.995, not 1: ultralytics appends a sentinel (recall 1, precision 0), so its 101-point envelope reads
    # precision 0 at recall 1, and the trapezoid rule loses half of the last 0.01 segment (COCOeval: 1.0).
    assert ap.result() == pytest.approx({"ultralytics_map": 0.995, "ultralytics_map50": 0.995}, abs=1e-6)


def test_wrong_class_scores_zero_and_loose_boxes_only_count_at_low_iou():
    wrong = UltralyticsStyleAP()
    wrong.update(
        [_dets([[10, 10, 50, 50, 0.9, 1], [60, 60, 90, 95, 0.8, 0]]), _dets([[20, 30, 70, 80, 0.7, 1]])],
        _batch(GT, GT_CLS),
    )
    assert wrong.result()["ultralytics_map50"] == pytest.approx(0.0, abs=1e-6)
    # Every box shifted by 4-6 px: IoU 0.57-0.63 with its target, a hit at 0.5 but not at 0.95.
    loose = UltralyticsStyleAP()
    loose.update(
        [_dets([[16, 16, 56, 56, 0.9, 0], [64, 64, 94, 99, 0.8, 1]]), _dets([[26, 36, 76, 86, 0.7, 0]])],
        _batch(GT, GT_CLS),
    )
    result = loose.result()
    assert result["ultralytics_map50"] == pytest.approx(0.995, abs=1e-6)
    assert 0.05 < result["ultralytics_map"] < 0.6


def test_missed_objects_and_false_positives_lower_the_figure():
    ap = UltralyticsStyleAP()
    # Image 0: its class-1 object is missed; a confident false positive of class 0 comes first.
    ap.update(
        [_dets([[0, 0, 5, 5, 0.95, 0], [10, 10, 50, 50, 0.9, 0]]), _dets([[20, 30, 70, 80, 0.7, 0]])],
        _batch(GT, GT_CLS),
    )
    result = ap.result()
    assert 0.0 < result["ultralytics_map50"] < 1.0
    assert result["ultralytics_map"] == pytest.approx(result["ultralytics_map50"], abs=1e-6)  # exact boxes


def test_images_without_detections_or_without_labels():
    ap = UltralyticsStyleAP()
    # image 0: labels, no detections (misses); image 1: detections, no labels (false positives)
    ap.update([_dets([]), _dets([[20, 30, 70, 80, 0.7, 0]])], _batch([GT[0], []], [GT_CLS[0], []]))
    assert ap.result() == {"ultralytics_map": 0.0, "ultralytics_map50": 0.0}


def test_agrees_with_ultralytics_validator_on_random_detections():
    """The same detections and labels through ultralytics' own DetectionValidator matching and DetMetrics."""
    from ultralytics.models.yolo.detect.val import DetectionValidator
    from ultralytics.utils import ops
    from ultralytics.utils.metrics import DetMetrics

    g = torch.Generator().manual_seed(0)
    validator = DetectionValidator.__new__(DetectionValidator)  # only its matching is used
    validator.iouv, validator.niou = torch.linspace(0.5, 0.95, 10), 10
    reference, ours = DetMetrics(names={i: str(i) for i in range(4)}), UltralyticsStyleAP()
    for b in range(6):
        boxes_xywh, classes, index, dets = [], [], [], []
        for i in range(3):
            n, m = int(torch.randint(0, 5, (1,), generator=g)), int(torch.randint(0, 8, (1,), generator=g))
            xy, wh = torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.3 + 0.05
            cls = torch.randint(0, 4, (n,), generator=g).float()
            boxes_xywh.append(torch.cat([xy, wh], 1))
            classes.append(cls[:, None])
            index.append(torch.full((n,), float(i)))
            near = torch.cat([xy - wh / 2, xy + wh / 2], 1) * IMGSZ + torch.randn(n, 4, generator=g) * 3
            corner = torch.rand(m, 2, generator=g) * IMGSZ * 0.7
            far = torch.cat([corner, corner + torch.rand(m, 2, generator=g) * 30 + 3], 1)
            pred_cls = torch.cat(
                [
                    torch.where(torch.rand(n, generator=g) < 0.7, cls, (cls + 1) % 4),
                    torch.randint(0, 4, (m,), generator=g).float(),
                ]
            )
            det = torch.cat([torch.cat([near, far]), torch.rand(n + m, 1, generator=g), pred_cls[:, None]], 1)
            dets.append(det[det[:, 4].argsort(descending=True)])  # NMS output is sorted by confidence
        batch = {
            "img": torch.zeros(3, 3, IMGSZ, IMGSZ),
            "bboxes": torch.cat(boxes_xywh),
            "cls": torch.cat(classes),
            "batch_idx": torch.cat(index),
        }
        ours.update(dets, batch)
        for i, det in enumerate(dets):
            mine = batch["batch_idx"] == i
            target = {"cls": batch["cls"][mine].squeeze(-1), "bboxes": ops.xywh2xyxy(batch["bboxes"][mine]) * IMGSZ}
            tp = validator._process_batch({"bboxes": det[:, :4], "conf": det[:, 4], "cls": det[:, 5]}, target)
            reference.update_stats(
                {
                    **tp,
                    "target_cls": target["cls"].numpy(),
                    "target_img": target["cls"].unique().numpy(),
                    "conf": det[:, 4].numpy(),
                    "pred_cls": det[:, 5].numpy(),
                    "im_name": f"{b}_{i}",
                }
            )
    reference.process()
    result = ours.result()
    assert 0.02 < result["ultralytics_map"] < result["ultralytics_map50"] < 0.9  # a non-trivial case
    assert result["ultralytics_map"] == pytest.approx(reference.box.map, abs=1e-9)
    assert result["ultralytics_map50"] == pytest.approx(reference.box.map50, abs=1e-9)
