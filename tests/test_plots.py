"""Issue 15: the pictures a run writes (labels, train batches, validation curves and matrix), each opened
and looked at; on the session's reference run (`straight`), no extra training."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from yolo_resume import pictures as pics

RUN_PICTURES = [
    pics.LABELS,
    *(pics.train_batch_name(i) for i in range(pics.TRAIN_BATCHES)),
    *pics.VAL_PICTURES,
]


def assert_picture(path: Path, min_size: tuple[int, int]) -> None:
    """A real picture: it opens, has at least `min_size` pixels and is not one flat colour."""
    with Image.open(path) as im:
        im.load()
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1], (path, im.size)
        assert np.asarray(im.convert("L"), np.float32).std() > 1.0, f"{path} is blank"


def test_a_training_run_writes_every_picture(straight):
    run = straight / "run"
    for name in RUN_PICTURES:
        # the figures are drawn at 100 dpi (>= 600 px); the batch grids are 2x2 tiles of the 64-px images
        assert_picture(run / name, (600, 600) if name.endswith(".png") else (128, 128))
    assert not list(run.glob(".*.tmp-*")), "a temporary picture was left behind"
    # 3 epochs, under the default ckpt.light_every_epochs (5): no milestone weights file
    assert not (run / "weights").exists()


def test_train_batches_are_the_pure_items_so_a_resume_draws_the_same(straight, tmp_path):
    """train_batch1.jpg drawn again from (seed, epoch 0, batch 1)'s items, as a run resumed at step 1
    draws it, is the reference run's file byte for byte."""
    from yolo_resume.config import load_config
    from yolo_resume.data import EpochBatchSampler, build_datasets, collate_fn

    cfg = load_config(straight / "run" / "config.yaml")
    train, _ = build_datasets(cfg.data, cfg.augment, cfg.model.imgsz, cfg.train.seed, cfg.train.epochs)
    sampler = EpochBatchSampler(len(train), cfg.train.batch, seed=cfg.train.seed)
    sampler.set_epoch(0, start_batch=1)
    batch = collate_fn([train[key] for key in next(iter(sampler))])
    drawn = pics.draw_batch(pics.BatchPicture.of_labels(batch), train.names, tmp_path / "again.jpg")
    reference = straight / "run" / pics.train_batch_name(1)
    assert drawn.read_bytes() == reference.read_bytes()
    assert (straight / "run" / pics.train_batch_name(0)).read_bytes() != reference.read_bytes()


def test_existing_or_later_batches_are_not_redrawn(tmp_path):
    drawn = []
    writer = pics.RunPictures(tmp_path, ["a"], notice=drawn.append)
    (tmp_path / pics.train_batch_name(0)).write_bytes(b"kept")
    batch = {
        "img": torch.zeros(2, 3, 32, 32, dtype=torch.uint8),
        "cls": torch.zeros(0, 1),
        "bboxes": torch.zeros(0, 4),
        "batch_idx": torch.zeros(0),
    }
    for epoch, index in ((0, 0), (0, pics.TRAIN_BATCHES), (1, 1)):
        writer.train_batch(epoch, index, batch)
    writer.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [pics.train_batch_name(0)] and not drawn
    assert (tmp_path / pics.train_batch_name(0)).read_bytes() == b"kept"


def test_a_picture_that_cannot_be_drawn_is_one_notice_never_a_crash(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    notices = []
    writer = pics.RunPictures(blocker, ["a", "b"], notice=notices.append)

    class Record:  # a split record: boxes in pixels, classes
        boxes, cls, width, height = np.float32([[2, 2, 10, 12]]), np.int64([1]), 16, 16

    writer.labels([Record()])
    writer.close()  # returns: the failure was reported, not raised
    assert len(notices) == 1 and notices[0].startswith(f"could not draw {pics.LABELS}: ")
    assert "\n" not in notices[0] and "not-a-folder" in notices[0]
    writer.labels([Record()])  # the worker survived the failure: the next job runs (and fails) too
    writer.close()
    assert len(notices) == 2


def test_validation_pictures_show_the_crafted_detections(tmp_path):
    """Class 0 found, class 1 missed: the matrix counts it, the curves and both batch grids are drawn."""
    imgsz = 64
    val = pics.ValPictures(["a", "b"], epoch=3)
    image = torch.zeros(1, 3, imgsz, imgsz, dtype=torch.uint8)
    image[:, :, 10:50, 10:50] = 200
    batch = {
        "img": image,
        "bboxes": torch.tensor([[30 / imgsz, 30 / imgsz, 40 / imgsz, 40 / imgsz], [0.8, 0.8, 0.2, 0.2]]),
        "cls": torch.tensor([[0.0], [1.0]]),
        "batch_idx": torch.tensor([0.0, 0.0]),
    }
    from yolo_resume.evaluate import UltralyticsStyleAP

    dets = [torch.tensor([[10.0, 10.0, 50.0, 50.0, 0.9, 0.0]])]
    ul = UltralyticsStyleAP()
    ul.update(dets, batch)
    val.update(dets, batch)
    val.stats = ul.arrays()
    # [predicted, true]: a found, b missed (predicted background)
    assert val.matrix.matrix.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 0]]
    assert val.first_preds is not None and val.first_preds.conf.tolist() == pytest.approx([0.9])
    written = val.draw(tmp_path)
    assert sorted(p.name for p in written) == sorted(pics.VAL_PICTURES)
    for path in written:
        assert_picture(path, (600, 600) if path.suffix == ".png" else (64, 64))
    labels, preds = (np.asarray(Image.open(tmp_path / n)) for n in (pics.VAL_LABELS, pics.VAL_PRED))
    assert np.abs(labels.astype(int) - preds.astype(int)).max() > 50  # two boxes drawn vs one


def test_split_labels_are_normalised_xywh():
    class Record:
        def __init__(self, boxes, cls, width=100, height=50):
            self.boxes, self.cls, self.width, self.height = (
                np.float32(boxes).reshape(-1, 4),
                np.int64(cls),
                width,
                height,
            )

    boxes, cls = pics.split_labels([Record([[0, 0, 50, 50]], [2]), Record([], []), Record([[50, 25, 100, 50]], [0])])
    assert boxes.tolist() == [[0.25, 0.5, 0.5, 1.0], [0.75, 0.75, 0.5, 0.5]] and cls.tolist() == [2, 0]
