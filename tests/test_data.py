"""Data pipeline: loaders, errors, synthetic generator, deterministic items, sampler, collation."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from yolo_resume.config import AugmentConfig, DataConfig
from yolo_resume.data import (
    DetectionDataset,
    EpochBatchSampler,
    build_datasets,
    collate_fn,
    ensure_synthetic,
    generate_synthetic,
    load_split,
)
from yolo_resume.data import synthetic as synthetic_mod
from yolo_resume.data.synthetic import render_image
from yolo_resume.errors import DataError

IMGSZ = 64
NO_AUG = AugmentConfig(fliplr=0, hsv_h=0, hsv_s=0, hsv_v=0, scale=0, translate=0, mosaic=0, close_mosaic=0)


# ----------------------------------------------------------------------------- helpers


def write_png(path: Path, width: int, height: int, value: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((height, width, 3), value, np.uint8))


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def coco_dict(images, annotations, categories=None) -> dict:
    categories = categories or [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}]
    return {"images": images, "annotations": annotations, "categories": categories}


def make_coco(root: Path, split: str = "train") -> Path:
    """3 images (one negative, one non-square), category ids 1/5/9, a crowd box, an out-of-image box."""
    images = [
        {"id": 10, "file_name": "a.png", "width": 100, "height": 80},
        {"id": 11, "file_name": "b.png", "width": 60, "height": 60},
        {"id": 12, "file_name": "c.png", "width": 50, "height": 70},
    ]
    anns = [
        {"id": 1, "image_id": 10, "category_id": 5, "bbox": [10, 20, 30, 40], "area": 1200, "iscrowd": 0},
        {"id": 2, "image_id": 10, "category_id": 9, "bbox": [80, 60, 40, 40], "area": 1600, "iscrowd": 0},
        {"id": 3, "image_id": 10, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 1},
        {"id": 4, "image_id": 12, "category_id": 1, "bbox": [5, 5, 0, 10], "area": 0, "iscrowd": 0},
        {"id": 5, "image_id": 12, "category_id": 1, "bbox": [5, 6, 20, 30], "area": 600, "iscrowd": 0},
    ]
    for img in images:
        write_png(root / "images" / split / img["file_name"], img["width"], img["height"])
    write_json(root / "annotations" / f"instances_{split}.json", coco_dict(images, anns))
    return root


def make_yolo(root: Path, split: str = "train") -> Path:
    write_png(root / "images" / split / "a.png", 100, 50)
    write_png(root / "images" / split / "b.jpg", 40, 40)  # no label file: a negative
    write_png(root / "images" / split / "sub" / "c.png", 64, 32)
    labels = root / "labels" / split
    labels.mkdir(parents=True, exist_ok=True)
    (labels / "a.txt").write_text("1 0.5 0.5 0.2 0.4\n\n0 0.1 0.1 0.2 0.2\n")
    (labels / "sub").mkdir()
    (labels / "sub" / "c.txt").write_text("0 0.25 0.25 0.75 0.25 0.75 0.75\n")  # a polygon line
    return root


def items_equal(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a) and a.keys() == b.keys()


def batches_equal(a: dict, b: dict) -> bool:
    return items_equal(a, b)


def item_to_xyxy_pixels(item: dict) -> np.ndarray:
    xywh = item["bboxes"].numpy() * IMGSZ
    return np.concatenate([xywh[:, :2] - xywh[:, 2:] / 2, xywh[:, :2] + xywh[:, 2:] / 2], 1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate_synthetic(tmp_path_factory.mktemp("synth") / "ds", 24, 8, 3, 96, seed=0)


def synth_datasets(root: Path, aug: AugmentConfig, epochs: int = 10, seed: int = 0):
    return build_datasets(DataConfig(format="coco", root=str(root)), aug, IMGSZ, seed, epochs)


# ----------------------------------------------------------------------------- COCO


def test_coco_maps_categories_ignores_crowd_keeps_negatives(tmp_path):
    split = load_split(DataConfig(format="coco", root=str(make_coco(tmp_path))), "train")
    assert split.names == ["a", "b", "c"]
    assert split.class_to_category == [1, 5, 9]
    a, b, c = split.records
    assert (a.image_id, a.width, a.height) == (10, 100, 80)
    np.testing.assert_array_equal(a.cls, [1, 2])  # category 5 -> 1, 9 -> 2; the crowd box is not a target
    np.testing.assert_allclose(a.boxes, [[10, 20, 40, 60], [80, 60, 100, 80]])  # xywh -> xyxy, clipped
    assert len(b.boxes) == 0 and b.boxes.shape == (0, 4)  # negative kept
    np.testing.assert_allclose(c.boxes, [[5, 6, 25, 36]])  # zero-width box dropped
    assert a.boxes.dtype == np.float32 and a.cls.dtype == np.int64


def test_coco_gt_is_the_annotation_file_with_crowd(tmp_path):
    train, _ = build_datasets(
        DataConfig(format="coco", root=str(make_coco(make_coco(tmp_path), "val"))), NO_AUG, IMGSZ, 0, 1
    )
    gt = train.coco_gt()
    assert sorted(gt.getImgIds()) == [10, 11, 12]
    assert sorted(gt.getCatIds()) == [1, 5, 9]
    crowd = gt.loadAnns(3)[0]
    assert crowd["iscrowd"] == 1 and crowd["bbox"] == [0, 0, 50, 50]
    assert train.class_to_category == [1, 5, 9]


def test_coco_image_folder_options_and_names(tmp_path):
    make_coco(tmp_path)
    (tmp_path / "images" / "train").rename(tmp_path / "train")  # fallback: root/<split>
    split = load_split(DataConfig(format="coco", root=str(tmp_path), names=["x", "y", "z"]), "train")
    assert split.records[0].path == tmp_path / "train" / "a.png"
    assert split.names == ["x", "y", "z"]
    (tmp_path / "train").rename(tmp_path / "pics")
    cfg = DataConfig(format="coco", root=str(tmp_path), train_images="pics")
    assert load_split(cfg, "train").records[0].path == tmp_path / "pics" / "a.png"


def test_coco_fills_missing_optional_fields(tmp_path):
    write_png(tmp_path / "images" / "train" / "a.png", 20, 20)
    anns = [
        {"image_id": 1, "category_id": 3, "bbox": [1, 1, 5, 5]},
        {"image_id": 1, "category_id": 3, "bbox": [2, 2, 4, 4]},
    ]
    write_json(
        tmp_path / "annotations" / "instances_train.json",
        coco_dict([{"id": 1, "file_name": "a.png", "width": 20, "height": 20}], anns, [{"id": 3, "name": "q"}]),
    )
    train = DetectionDataset(load_split(DataConfig(format="coco", root=str(tmp_path)), "train"), IMGSZ)
    gt = train.coco_gt()
    assert [a["area"] for a in gt.loadAnns(gt.getAnnIds())] == [25.0, 16.0]
    assert len(train.records[0].boxes) == 2


# ----------------------------------------------------------------------------- YOLO


def test_yolo_layout(tmp_path):
    split = load_split(DataConfig(format="yolo", root=str(make_yolo(tmp_path)), names=["p", "q"]), "train")
    assert [r.path.name for r in split.records] == ["a.png", "b.jpg", "c.png"]
    a, b, c = split.records
    assert (a.width, a.height) == (100, 50)
    np.testing.assert_allclose(a.boxes, [[40, 15, 60, 35], [0, 0, 20, 10]], atol=1e-4)
    np.testing.assert_array_equal(a.cls, [1, 0])
    assert len(b.boxes) == 0
    np.testing.assert_allclose(c.boxes, [[16, 8, 48, 24]], atol=1e-4)
    assert split.class_to_category == [1, 2]
    gt = DetectionDataset(split, IMGSZ).coco_gt()
    ann = gt.loadAnns(gt.getAnnIds(imgIds=[a.image_id]))
    np.testing.assert_allclose([x["bbox"] for x in ann], [[40, 15, 20, 20], [0, 0, 20, 10]], atol=1e-4)
    assert [x["category_id"] for x in ann] == [2, 1]


def test_yolo_dataset_yaml_and_list_file(tmp_path):
    make_yolo(tmp_path / "ds")
    make_yolo(tmp_path / "ds", "val")
    (tmp_path / "ds" / "val.txt").write_text("./images/val/a.png\nimages/val/sub/c.png\n")
    yaml_file = tmp_path / "data.yaml"
    yaml_file.write_text("path: ds\ntrain: images/train\nval: val.txt\nnames: {0: p, 1: q}\n")
    train, val = build_datasets(DataConfig(format="yolo", root=str(yaml_file)), NO_AUG, IMGSZ, 0, 1)
    assert train.names == val.names == ["p", "q"]
    assert len(train) == 3
    assert [r.path.name for r in val.records] == ["a.png", "c.png"]
    assert len(val.records[1].boxes) == 1


# ----------------------------------------------------------------------------- errors


def _err_missing_root(tmp: Path):
    return DataConfig(format="coco", root=str(tmp / "nowhere")), "nowhere"


def _err_missing_annotation(tmp: Path):
    (tmp / "images" / "train").mkdir(parents=True)
    return DataConfig(format="coco", root=str(tmp)), "instances_train.json"


def _err_missing_image_folder(tmp: Path):
    make_coco(tmp)
    (tmp / "images" / "train").rename(tmp / "elsewhere")
    return DataConfig(format="coco", root=str(tmp)), "instances_train.json"


def _err_missing_image_file(tmp: Path):
    make_coco(tmp)
    (tmp / "images" / "train" / "b.png").unlink()
    return DataConfig(format="coco", root=str(tmp)), "b.png"


def _err_empty_coco(tmp: Path):
    (tmp / "images" / "train").mkdir(parents=True)
    write_json(tmp / "annotations" / "instances_train.json", coco_dict([], []))
    return DataConfig(format="coco", root=str(tmp)), "instances_train.json"


def _err_bad_json(tmp: Path):
    make_coco(tmp)
    (tmp / "annotations" / "instances_train.json").write_text('{"images": [')
    return DataConfig(format="coco", root=str(tmp)), "instances_train.json"


def _err_bad_bbox(tmp: Path):
    make_coco(tmp)
    path = tmp / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    data["annotations"][1]["bbox"] = [1, 2, 3]
    write_json(path, data)
    return DataConfig(format="coco", root=str(tmp)), "annotations[1]"


def _err_unknown_category(tmp: Path):
    make_coco(tmp)
    path = tmp / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    data["annotations"][0]["category_id"] = 7
    write_json(path, data)
    return DataConfig(format="coco", root=str(tmp)), "instances_train.json"


def _err_names_mismatch(tmp: Path):
    return DataConfig(format="coco", root=str(make_coco(tmp)), names=["only", "two"]), "instances_train.json"


def _err_label_line(tmp: Path):
    make_yolo(tmp)
    (tmp / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n1 0.5 oops 0.2 0.2\n")
    return DataConfig(format="yolo", root=str(tmp), names=["p", "q"]), "a.txt` line 2"


def _err_label_columns(tmp: Path):
    make_yolo(tmp)
    (tmp / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2\n")
    return DataConfig(format="yolo", root=str(tmp), names=["p", "q"]), "a.txt` line 1"


def _err_class_out_of_range(tmp: Path):
    make_yolo(tmp)
    (tmp / "labels" / "train" / "a.txt").write_text("2 0.5 0.5 0.2 0.2\n")
    return DataConfig(format="yolo", root=str(tmp), names=["p", "q"]), "a.txt` line 1"


def _err_not_normalized(tmp: Path):
    make_yolo(tmp)
    (tmp / "labels" / "train" / "a.txt").write_text("0 50 20 10 10\n")
    return DataConfig(format="yolo", root=str(tmp), names=["p", "q"]), "a.txt` line 1"


def _err_yolo_no_names(tmp: Path):
    return DataConfig(format="yolo", root=str(make_yolo(tmp))), str(tmp)


def _err_yolo_no_labels_at_all(tmp: Path):
    make_yolo(tmp)
    (tmp / "labels").rename(tmp / "annotations")
    return DataConfig(format="yolo", root=str(tmp), names=["p", "q"]), "a.txt"


def _err_yolo_empty(tmp: Path):
    (tmp / "images" / "train").mkdir(parents=True)
    return DataConfig(format="yolo", root=str(tmp), names=["p"]), str(tmp / "images" / "train")


def _err_yolo_missing_folder(tmp: Path):
    tmp.mkdir(exist_ok=True)
    return DataConfig(format="yolo", root=str(tmp), names=["p"]), str(tmp / "images" / "train")


def _err_bad_yaml(tmp: Path):
    (tmp / "d.yaml").write_text("names: [a, b\n")
    return DataConfig(format="yolo", root=str(tmp / "d.yaml")), "d.yaml"


def _err_corrupt_image(tmp: Path):
    make_yolo(tmp)
    (tmp / "images" / "train" / "a.png").write_bytes(b"not a png")
    return DataConfig(format="yolo", root=str(tmp), names=["p", "q"], on_bad_image="error"), "a.png"


def _err_synthetic_foreign_folder(tmp: Path):
    (tmp / "mine.txt").write_text("precious")
    return DataConfig(format="synthetic", root=str(tmp), num_train=2, num_val=1, image_size=32), str(tmp)


ERROR_CASES = [v for k, v in sorted(globals().items()) if k.startswith("_err_")]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c.__name__[5:] for c in ERROR_CASES])
def test_bad_data_raises_one_line_data_error(tmp_path, case):
    cfg, needle = case(tmp_path)
    with pytest.raises(DataError) as info:
        load_split(cfg, "train")
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_val_classes_must_match_train(tmp_path):
    make_coco(tmp_path)
    path = make_coco(tmp_path, "val") / "annotations" / "instances_val.json"
    data = json.loads(path.read_text())
    data["categories"][0]["name"] = "renamed"
    write_json(path, data)
    with pytest.raises(DataError, match="instances_val.json"):
        build_datasets(DataConfig(format="coco", root=str(tmp_path)), NO_AUG, IMGSZ, 0, 1)


def test_undecodable_image_at_item_time(tmp_path):
    make_coco(tmp_path)
    ds = DetectionDataset(load_split(DataConfig(format="coco", root=str(tmp_path)), "train"), IMGSZ)
    (tmp_path / "images" / "train" / "b.png").write_bytes(b"garbage")  # broken after the up-front check
    with pytest.raises(DataError, match="b.png"):
        ds[1]


# ----------------------------------------------------------------------------- synthetic


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic(tmp_path):
    a = _tree_bytes(generate_synthetic(tmp_path / "a", 6, 3, 6, 64, seed=3))
    b = _tree_bytes(generate_synthetic(tmp_path / "b", 6, 3, 6, 64, seed=3))
    c = _tree_bytes(generate_synthetic(tmp_path / "c", 6, 3, 6, 64, seed=4))
    assert len(a) == 6 + 3 + 3
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".png"))


def test_ensure_synthetic_reuses_and_regenerates(tmp_path, monkeypatch):
    calls = []
    real = synthetic_mod.generate_synthetic
    monkeypatch.setattr(synthetic_mod, "generate_synthetic", lambda *a, **k: calls.append(a) or real(*a, **k))
    cfg = DataConfig(format="synthetic", root=str(tmp_path / "ds"), num_train=4, num_val=2, image_size=48)
    root = ensure_synthetic(cfg)
    mtime = (root / "synthetic.json").stat().st_mtime_ns
    assert ensure_synthetic(cfg) == root and len(calls) == 1
    assert (root / "synthetic.json").stat().st_mtime_ns == mtime
    (tmp_path / ".ds.partial").mkdir()  # debris of a killed generation is ignored, then cleaned
    ensure_synthetic(dataclasses.replace(cfg, num_train=5))
    assert len(calls) == 2 and not (tmp_path / ".ds.partial").exists()
    assert len(list((root / "images" / "train").iterdir())) == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_synthetic_annotations(synth):
    data = json.loads((synth / "annotations" / "instances_train.json").read_text())
    assert [c["name"] for c in data["categories"]] == ["circle", "square", "triangle"]
    assert len(data["images"]) == 24
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 96 and y + h <= 96
        assert 0.1 * 96 <= max(w, h) <= 0.5 * 96 and 0 < ann["area"] <= w * h
    per_image = np.bincount([a["image_id"] for a in data["annotations"]], minlength=25)[1:]
    assert per_image.max() <= 4


def test_synthetic_boxes_are_tight_and_some_images_negative():
    counts = []
    for i in range(60):
        img, objects = render_image(np.random.default_rng(i), 48, 6)
        counts.append(len(objects))
        for _, (x1, y1, x2, y2), _ in objects:
            assert 0 < x1 < x2 < 48 and 0 < y1 < y2 < 48
    assert 0 in counts and max(counts) <= 4


# ----------------------------------------------------------------------------- items


def test_items_are_pure_functions_of_epoch_and_index(synth):
    aug = AugmentConfig(mosaic=0.5, close_mosaic=0)
    train, _ = synth_datasets(synth, aug)
    first = [train[(1, i)] for i in range(6)]
    np.random.seed(123), random.seed(5), torch.manual_seed(9)  # global RNGs must not matter
    again, _ = synth_datasets(synth, aug)
    assert all(items_equal(a, again[(1, i)]) for i, a in enumerate(first))
    assert all(items_equal(train[(1, i)], a) for i, a in reversed(list(enumerate(first))))
    other_epoch = [train[(2, i)] for i in range(6)]
    assert not any(torch.equal(a["img"], b["img"]) for a, b in zip(first, other_epoch, strict=True))
    other_seed, _ = synth_datasets(synth, aug, seed=1)
    assert not torch.equal(first[0]["img"], other_seed[(1, 0)]["img"])
    assert items_equal(train[3], train[(0, 3)])


def test_item_format(synth):
    train, val = synth_datasets(synth, AugmentConfig())
    for item in (train[(0, 0)], val[0]):
        assert item["img"].dtype == torch.uint8 and item["img"].shape == (3, IMGSZ, IMGSZ)
        assert item["cls"].dtype == torch.float32 and item["cls"].shape[1] == 1
        assert item["bboxes"].dtype == torch.float32 and item["bboxes"].shape == (len(item["cls"]), 4)
        assert item["ori_shape"] == (96, 96) and item["image_id"] == 1


def test_boxes_stay_valid_under_augmentation(synth):
    train, _ = synth_datasets(synth, AugmentConfig(mosaic=0.5, scale=0.9, translate=0.3, close_mosaic=0))
    seen = 0
    for epoch in range(3):
        for i in range(len(train)):
            item = train[(epoch, i)]
            xyxy = item_to_xyxy_pixels(item)
            assert (xyxy >= -1e-4).all() and (xyxy <= IMGSZ + 1e-4).all()
            assert (xyxy[:, 2:] - xyxy[:, :2] >= 2 - 1e-4).all()
            assert ((item["cls"] >= 0) & (item["cls"] < 3)).all()
            seen += len(xyxy)
    assert seen > 0


def test_close_mosaic_equals_no_mosaic(synth):
    with_mosaic, _ = synth_datasets(synth, AugmentConfig(mosaic=1.0, close_mosaic=2), epochs=5)
    without, _ = synth_datasets(synth, AugmentConfig(mosaic=0.0, close_mosaic=2), epochs=5)
    assert with_mosaic.mosaic_enabled(2) and not with_mosaic.mosaic_enabled(3)
    assert not items_equal(with_mosaic[(2, 0)], without[(2, 0)])
    assert all(items_equal(with_mosaic[(e, i)], without[(e, i)]) for e in (3, 4) for i in range(4))


def _rectangles_dataset(root: Path) -> Path:
    """Black images with one white rectangle each, away from the borders: where pixels are, boxes are."""
    images, anns = [], []
    for i, (w, h, box) in enumerate(
        [(96, 96, (20, 30, 61, 70)), (120, 80, (30, 15, 75, 60)), (70, 100, (12, 25, 50, 70))]
    ):
        img = np.zeros((h, w, 3), np.uint8)
        x1, y1, x2, y2 = box
        img[y1:y2, x1:x2] = 255
        (root / "images" / "train").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "images" / "train" / f"{i}.png"), img)
        images.append({"id": i + 1, "file_name": f"{i}.png", "width": w, "height": h})
        anns.append({"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1]})
    write_json(root / "annotations" / "instances_train.json", coco_dict(images, anns, [{"id": 1, "name": "r"}]))
    return root


@pytest.mark.parametrize("mosaic", [0.0, 1.0])
def test_boxes_follow_the_pixels(tmp_path, mosaic):
    split = load_split(DataConfig(format="coco", root=str(_rectangles_dataset(tmp_path))), "train")
    aug = AugmentConfig(hsv_h=0, hsv_s=0, hsv_v=0, mosaic=mosaic, close_mosaic=0, scale=0.5, translate=0.2)
    ds = DetectionDataset(split, IMGSZ, augment=aug, seed=0, epochs=10)
    checked, bright_total, uncovered = 0, 0, 0
    for epoch in range(8):
        for i in range(len(ds)):
            item = ds[(epoch, i)]
            bright = (item["img"].numpy() > 160).all(0)
            covered = np.zeros_like(bright)
            for x1, y1, x2, y2 in item_to_xyxy_pixels(item):
                # Each box is the bright rectangle's extent (to within the blur of the warp).
                x0, y0 = max(int(x1) - 2, 0), max(int(y1) - 2, 0)
                window = bright[y0 : int(y2) + 3, x0 : int(x2) + 3]
                covered[y0 : int(y2) + 3, x0 : int(x2) + 3] = True
                ys, xs = np.nonzero(window)
                found = np.array([xs.min() + x0, ys.min() + y0, xs.max() + 1 + x0, ys.max() + 1 + y0])
                np.testing.assert_allclose(found, [x1, y1, x2, y2], atol=1.01)
                checked += 1
            bright_total += bright.sum()
            uncovered += (bright & ~covered).sum()
    # ... and conversely rectangles rarely lose their box (only when mostly cut off by the border).
    assert checked > 20 and uncovered < 0.05 * bright_total


def test_horizontal_flip_mirrors_image_and_boxes(synth):
    plain, _ = synth_datasets(synth, dataclasses.replace(NO_AUG, fliplr=0.0))
    flipped, _ = synth_datasets(synth, dataclasses.replace(NO_AUG, fliplr=1.0))
    for i in range(4):
        a, b = plain[(0, i)], flipped[(0, i)]
        assert torch.equal(a["img"].flip(-1), b["img"])
        mirrored = a["bboxes"].clone()
        mirrored[:, 0] = 1 - mirrored[:, 0]
        torch.testing.assert_close(mirrored, b["bboxes"])


def test_val_letterbox_round_trips_to_original_boxes(tmp_path):
    make_coco(tmp_path)
    _, val = build_datasets(
        DataConfig(format="coco", root=str(make_coco(tmp_path, "val"))), AugmentConfig(), IMGSZ, 0, 1
    )
    for i, rec in enumerate(val.records):
        item = val[(i, i)]
        assert items_equal(item, val[(5, i)])  # val items do not depend on the epoch
        ratio, (padw, padh) = item["ratio_pad"]
        assert ratio == IMGSZ / max(rec.width, rec.height)
        xyxy = item_to_xyxy_pixels(item)
        back = (xyxy - [padw, padh, padw, padh]) / ratio
        np.testing.assert_allclose(back, rec.boxes, atol=1e-3)
        img = item["img"].numpy()
        if padw:  # the letterbox borders carry the pad value
            assert (img[:, :, : int(padw)] == 114).all() and (img[:, :, int(IMGSZ - padw) :] == 114).all()
        if padh:
            assert (img[:, : int(padh)] == 114).all()
            assert (img[:, int(padh) : int(padh) + 2, int(padw) : int(IMGSZ - padw)] == 90).all()


def test_collate_fn_format(synth):
    train, _ = synth_datasets(synth, AugmentConfig())
    items = [train[(0, i)] for i in range(4)]
    batch = collate_fn(items)
    n = sum(len(it["cls"]) for it in items)
    assert batch["img"].shape == (4, 3, IMGSZ, IMGSZ) and batch["img"].dtype == torch.uint8
    assert batch["cls"].shape == (n, 1) and batch["bboxes"].shape == (n, 4) and batch["batch_idx"].shape == (n,)
    assert batch["batch_idx"].dtype == torch.float32
    expected = [i for i, it in enumerate(items) for _ in range(len(it["cls"]))]
    assert batch["batch_idx"].tolist() == expected
    assert batch["image_id"] == [1, 2, 3, 4] and len(batch["ori_shape"]) == len(batch["ratio_pad"]) == 4


def test_fingerprint(tmp_path):
    make_yolo(tmp_path)
    cfg = DataConfig(format="yolo", root=str(tmp_path), names=["p", "q"])
    fp = DetectionDataset(load_split(cfg, "train"), IMGSZ).fingerprint()
    assert len(fp) == 64 and fp == DetectionDataset(load_split(cfg, "train"), IMGSZ).fingerprint()
    (tmp_path / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.2 0.41\n")
    fp2 = DetectionDataset(load_split(cfg, "train"), IMGSZ).fingerprint()
    cv2.imwrite(str(tmp_path / "images" / "train" / "b.jpg"), np.random.default_rng(0).integers(0, 255, (40, 40, 3)))
    fp3 = DetectionDataset(load_split(cfg, "train"), IMGSZ).fingerprint()
    assert len({fp, fp2, fp3}) == 3


_CHILD = """
import hashlib, sys
from yolo_resume.config import AugmentConfig, DataConfig
from yolo_resume.data import build_datasets
train, _ = build_datasets(DataConfig(format="coco", root=sys.argv[1]), AugmentConfig(mosaic=0.5), 64, 0, 10)
h = hashlib.sha256()
for i in range(len(train)):
    item = train[(2, i)]
    h.update(item["img"].numpy().tobytes() + item["bboxes"].numpy().tobytes() + item["cls"].numpy().tobytes())
print(train.fingerprint(), h.hexdigest())
"""


def test_items_and_fingerprint_identical_in_a_fresh_process(synth):
    import hashlib

    train, _ = synth_datasets(synth, AugmentConfig(mosaic=0.5))
    h = hashlib.sha256()
    for i in range(len(train)):
        item = train[(2, i)]
        h.update(item["img"].numpy().tobytes() + item["bboxes"].numpy().tobytes() + item["cls"].numpy().tobytes())
    env = {"YOLO_OFFLINE": "1", "PYTHONHASHSEED": "77", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(synth)], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.split() == [train.fingerprint(), h.hexdigest()]


# ----------------------------------------------------------------------------- sampler


def _epoch_indices(sampler: EpochBatchSampler, epoch: int, start_batch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, start_batch)
    batches = list(sampler)
    assert all(e == epoch for batch in batches for e, _ in batch)
    return [[i for _, i in batch] for batch in batches]


def test_sampler_order_is_a_pure_per_epoch_permutation():
    sampler = EpochBatchSampler(23, 5, seed=7)
    orders = [sum(_epoch_indices(sampler, e), []) for e in range(3)]
    assert all(sorted(o) == list(range(23)) for o in orders)
    assert orders[0] != orders[1] != orders[2]
    assert sum(_epoch_indices(EpochBatchSampler(23, 5, seed=7), 1), []) == orders[1]
    assert sum(_epoch_indices(EpochBatchSampler(23, 5, seed=8), 1), []) != orders[1]
    assert sum(_epoch_indices(EpochBatchSampler(23, 5, seed=7, shuffle=False), 1), []) == list(range(23))


def test_sampler_start_batch_and_len():
    sampler = EpochBatchSampler(23, 5, seed=0)
    full = _epoch_indices(sampler, 4)
    assert sampler.batches_per_epoch() == len(full) == 5 and [len(b) for b in full] == [5, 5, 5, 5, 3]
    for k in range(6):
        assert _epoch_indices(sampler, 4, k) == full[k:]
        assert len(sampler) == 5 - k
    dropped = EpochBatchSampler(23, 5, seed=0, drop_last=True)
    assert _epoch_indices(dropped, 4) == full[:4] and dropped.batches_per_epoch() == 4
    with pytest.raises(ValueError):
        sampler.set_epoch(0, 6)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), bs=st.integers(1, 9), ws=st.integers(1, 4), epoch=st.integers(0, 5))
def test_sampler_rank_split(n, bs, ws, epoch):
    ranks = [_epoch_indices(EpochBatchSampler(n, bs, 3, rank=r, world_size=ws), epoch) for r in range(ws)]
    assert len({len(b) for b in ranks}) == 1  # every rank runs the same number of batches
    flat = [i for batches in ranks for batch in batches for i in batch]
    assert sorted(set(flat)) == list(range(n))  # covering
    assert len(flat) == -(-n // ws) * ws  # padded by wrapping only up to a multiple of world_size
    if n % ws == 0:
        assert len(flat) == len(set(flat)) == n  # disjoint
    # global batch b holds the same samples whatever the world size
    single = _epoch_indices(EpochBatchSampler(n, bs * ws, 3), epoch)
    if n % (bs * ws) == 0:
        for b, batch in enumerate(single):
            assert sorted(batch) == sorted(i for r in ranks for i in r[b])


def test_dataloader_workers_do_not_change_the_stream(synth):
    train, _ = synth_datasets(synth, AugmentConfig(mosaic=0.5, close_mosaic=0))

    def stream(workers: int, epoch: int, start: int = 0) -> list[dict]:
        sampler = EpochBatchSampler(len(train), 5, seed=0)
        sampler.set_epoch(epoch, start)
        loader = DataLoader(train, batch_sampler=sampler, collate_fn=collate_fn, num_workers=workers)
        return list(loader)

    serial, parallel = stream(0, 1), stream(2, 1)
    assert len(serial) == 5
    assert all(batches_equal(a, b) for a, b in zip(serial, parallel, strict=True))
    resumed = stream(2, 1, start=3)
    assert all(batches_equal(a, b) for a, b in zip(serial[3:], resumed, strict=True))
