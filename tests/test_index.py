"""The cached split index and the flat records (issue 13): a start whose files did not change reads one
file, a changed file invalidates it, a bad index file is rebuilt, and flat records are the list they replace."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from yolo_resume.config import AugmentConfig, DataConfig
from yolo_resume.data import build_datasets, load_split
from yolo_resume.data import check as check_mod
from yolo_resume.data import coco as coco_mod
from yolo_resume.data.coco import coco_gt
from yolo_resume.data.dataset import DetectionDataset
from yolo_resume.data.records import FlatRecords, ImageRecord, Split, dataset_fingerprint, fingerprint
from yolo_resume.distributed import Distributed
from yolo_resume.errors import DataError


def _image(path: Path, seed: int, wh: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (wh[1], wh[0], 3), dtype=np.uint8)
    cv2.imwrite(str(path), pixels)


def _yolo(root: Path, n: int = 12, split: str = "train") -> Path:
    for i in range(n):
        _image(root / "images" / split / f"i{i:02d}.jpg", i)
        if i % 4 != 3:  # some backgrounds
            rows = "".join(f"{(i + k) % 2} 0.{3 + k} 0.5 0.2 0.{1 + k}\n" for k in range(1 + i % 3))
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"i{i:02d}.txt").write_text(rows)
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(format="yolo", root=str(root), names=["p", "q"], **kw)


def _coco(root: Path, n: int = 6) -> DataConfig:
    images, anns = [], []
    for i in range(n):
        _image(root / "images" / "train" / f"c{i}.jpg", 100 + i)
        images.append({"id": 10 + i, "file_name": f"c{i}.jpg", "width": 40, "height": 30})
        for k in range(i % 3):
            anns.append({"id": len(anns) + 1, "image_id": 10 + i, "category_id": 1 + k % 2, "bbox": [2.0, 3, 10, 8]})
    anns.append({"id": len(anns) + 1, "image_id": 10, "category_id": 1, "bbox": [30, 20, 20, 20], "iscrowd": 1})
    anns.append({"id": len(anns) + 1, "image_id": 11, "category_id": 2, "bbox": [50, 3, 5, 5]})  # no area: dropped
    body = {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / "instances_train.json").write_text(json.dumps(body))
    return DataConfig(format="coco", root=str(root))


def _split_index(root: Path) -> Path:
    (found,) = (root / ".yolo-resume").glob("split-*.npz")
    return found


@pytest.fixture
def no_checks(monkeypatch):
    """Fail loudly when anything is verified or parsed: a start that must come from the index."""

    def refuse(*args, **kwargs):
        raise AssertionError("the index was not used: a file was read again")

    def arm():
        monkeypatch.setattr(check_mod, "verify_image", refuse)
        monkeypatch.setattr(coco_mod, "parse_coco", refuse)
        monkeypatch.setattr("yolo_resume.data.yolo.parse_label_file", refuse)

    return arm


def _as_lists(records) -> list[tuple]:
    return [
        (str(r.path), r.width, r.height, r.boxes.tolist(), r.cls.tolist(), r.image_id, r.file_size, r.mtime_ns)
        for r in records
    ]


# ----------------------------------------------------------------------------- the cached split index


def test_cached_start_reads_only_the_index_and_gives_the_same_split(tmp_path, no_checks):
    cfg = _cfg(_yolo(tmp_path))
    first = load_split(cfg, "train")
    assert isinstance(first.records, FlatRecords) and first.report.cached == 0 and _split_index(tmp_path).is_file()
    no_checks()
    again = load_split(cfg, "train")
    assert again.report.cached == 12 and again.records == first.records
    assert _as_lists(again.records) == _as_lists(first.records)
    assert (again.label_digest, again.label_files) == (first.label_digest, first.label_files)
    assert again.report.row() | {"from cache": 0, "seconds": 0} == first.report.row() | {"from cache": 0, "seconds": 0}
    assert fingerprint(again) == fingerprint(first)


def test_records_equal_the_per_image_loader_without_any_cache(tmp_path, monkeypatch):
    """The flat build gives, item for item, what one `ImageRecord` per image gave (`yolo.label_boxes`)."""
    from yolo_resume.data.yolo import label_boxes, parse_label_file

    root = _yolo(tmp_path)
    split = load_split(_cfg(root), "train")
    for rec in split.records:
        lab = rec.path.parents[2] / "labels" / "train" / (rec.path.stem + ".txt")
        rows = parse_label_file(lab.read_bytes(), lab, 2, None) if lab.is_file() else None
        boxes, cls = label_boxes(rows, rec.width, rec.height) if rows is not None else (np.zeros((0, 4)), [])
        assert rec.boxes.tobytes() == np.asarray(boxes, np.float32).tobytes() and rec.cls.tolist() == list(cls)
        assert (rec.file_size, rec.mtime_ns) == (rec.path.stat().st_size, rec.path.stat().st_mtime_ns)


@pytest.mark.parametrize("change", ["mtime", "size"])
def test_a_changed_label_invalidates_the_index_and_only_it_is_read_again(tmp_path, monkeypatch, change):
    cfg = _cfg(_yolo(tmp_path))
    first = load_split(cfg, "train")
    label = tmp_path / "labels" / "train" / "i05.txt"
    if change == "size":
        label.write_text("0 0.5 0.5 0.4 0.4\n1 0.5 0.5 0.1 0.1\n")
    else:  # same bytes length, other numbers, a later mtime
        text = label.read_text()
        label.write_text(text.replace("0.2", "0.3", 1))
        os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    seen = []
    real = check_mod.verify_image
    monkeypatch.setattr(check_mod, "verify_image", lambda p: seen.append(p.name) or real(p))
    again = load_split(cfg, "train")
    assert seen == ["i05.jpg"] and again.report.cached == 11
    i5 = [r.path.name for r in again.records].index("i05.jpg")
    assert again.records[i5].boxes.tolist() != first.records[i5].boxes.tolist()
    assert fingerprint(again) != fingerprint(first)
    seen.clear()
    assert load_split(cfg, "train").records == again.records and seen == []


def test_a_touched_image_invalidates_the_index(tmp_path, monkeypatch):
    cfg = _cfg(_yolo(tmp_path))
    load_split(cfg, "train")
    image = tmp_path / "images" / "train" / "i02.jpg"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    seen = []
    real = check_mod.verify_image
    monkeypatch.setattr(check_mod, "verify_image", lambda p: seen.append(p.name) or real(p))
    again = load_split(cfg, "train")
    assert seen == ["i02.jpg"] and again.records[2].mtime_ns == image.stat().st_mtime_ns


def test_an_added_image_invalidates_the_index(tmp_path):
    cfg = _cfg(_yolo(tmp_path))
    assert len(load_split(cfg, "train").records) == 12
    _image(tmp_path / "images" / "train" / "i99.jpg", 99)
    again = load_split(cfg, "train")
    assert len(again.records) == 13 and again.report.cached == 12


def test_a_removed_image_or_an_added_or_removed_label_invalidates_the_index(tmp_path):
    cfg = _cfg(_yolo(tmp_path))
    first = load_split(cfg, "train")
    (tmp_path / "images" / "train" / "i04.jpg").unlink()
    removed = load_split(cfg, "train")
    assert len(removed.records) == 11 and "i04.jpg" not in [r.path.name for r in removed.records]
    (tmp_path / "labels" / "train" / "i03.txt").write_text("1 0.5 0.5 0.2 0.2\n")  # a background gets a box
    added = load_split(cfg, "train")
    i3 = [r.path.name for r in added.records].index("i03.jpg")
    assert added.records[i3].cls.tolist() == [1] and fingerprint(added) != fingerprint(removed)
    (tmp_path / "labels" / "train" / "i05.txt").unlink()  # a labelled image becomes a background
    gone = load_split(cfg, "train")
    i5 = [r.path.name for r in gone.records].index("i05.jpg")
    assert len(gone.records[i5].cls) == 0 and fingerprint(gone) != fingerprint(added) != fingerprint(first)


def test_an_image_changed_in_a_subfolder_invalidates_the_index(tmp_path):
    root = _yolo(tmp_path)
    _image(root / "images" / "train" / "sub" / "s0.jpg", 50)
    first = load_split(_cfg(root), "train")
    assert [r.path.name for r in first.records][-1] == "s0.jpg"  # after i11.jpg: Path order
    image = root / "images" / "train" / "sub" / "s0.jpg"
    _image(image, 51, (44, 30))
    again = load_split(_cfg(root), "train")
    assert again.report.cached == 12 and again.records[-1].width == 44
    assert again.records[-1].file_size == image.stat().st_size


def test_bulk_stat_of_a_large_folder_equals_one_stat_per_file(tmp_path):
    """More files than one bulk-stat chunk, a dangling link among them and a name not there: each gets
    the (size, mtime_ns) os.stat gives it, (-1, -1) where there is no file, in the order asked."""
    from yolo_resume.data import yolo as yolo_mod

    n = 2 * yolo_mod._STAT_CHUNK + 7
    names = [f"f{i:05d}.txt" for i in range(n)]
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(b"x" * (i % 17))
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "nowhere.txt")
    asked = names[:5000] + ["dangling.txt", "absent.txt"] + names[5000:]
    got = yolo_mod.stat_names(str(tmp_path), asked)
    expected = [(os.stat(tmp_path / f).st_size, os.stat(tmp_path / f).st_mtime_ns) for f in names]
    assert got == expected[:5000] + [(-1, -1), (-1, -1)] + expected[5000:]
    assert yolo_mod.stat_names(str(tmp_path / "no-such-folder"), ["a.txt"]) == [(-1, -1)]
    # Paths across folders (runs of one folder, a folder met again, one that does not exist), in order.
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "s.txt").write_bytes(b"abc")
    paths = [str(tmp_path / names[3]), str(tmp_path / "sub" / "s.txt"), str(tmp_path / "gone" / "g.txt")]
    paths += [str(tmp_path / names[1]), str(tmp_path / "sub" / "absent.txt")]
    one_by_one = [(os.stat(p).st_size, os.stat(p).st_mtime_ns) if os.path.exists(p) else (-1, -1) for p in paths]
    assert yolo_mod.stat_paths(paths) == one_by_one and one_by_one[2] == one_by_one[4] == (-1, -1)


@pytest.mark.parametrize(
    "damage",
    [
        lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),  # truncated
        lambda p: p.write_bytes(b"not a zip at all"),
        lambda p: np.savez(p, meta=np.array([{"version": 1}], dtype=object)),  # a pickle: never loaded
        lambda p: _rewrite(p, path_offsets=np.array([0, 10**9])),  # offsets that do not fit
    ],
    ids=["truncated", "garbage", "pickle", "bad-offsets"],
)
def test_a_damaged_index_is_ignored_and_rebuilt(tmp_path, damage):
    cfg = _cfg(_yolo(tmp_path))
    first = load_split(cfg, "train")
    index = _split_index(tmp_path)
    damage(index)
    for cache in (tmp_path / ".yolo-resume").glob("index-*.npz"):
        cache.write_bytes(b"\0" * 100)  # the per-file entries too: everything is checked again
    again = load_split(cfg, "train")
    assert again.report.cached == 0 and again.records == first.records
    assert load_split(cfg, "train").report.cached == 12  # and the rebuilt index is used


def _rewrite(path: Path, **changes: np.ndarray) -> None:
    with np.load(path, allow_pickle=False) as archive:
        cols = {name: archive[name] for name in archive.files}
    cols |= {f"r_{name}": value for name, value in changes.items()}
    with open(path, "wb") as f:
        np.savez(f, **cols)


def test_index_of_other_settings_is_not_used_and_content_hashes_fill_flat_records(tmp_path):
    root = _yolo(tmp_path)
    stat = load_split(_cfg(root), "train")
    content = load_split(_cfg(root, fingerprint="content"), "train")
    assert all(len(r.content) == 64 for r in content.records)  # the stat index had no content hashes
    assert all(r.content == "" for r in stat.records)
    check_mod.fill_content_hashes(stat)  # what a resume of a content-fingerprinted checkpoint does
    assert fingerprint(stat, "content") == fingerprint(content, "content")


def test_coco_cached_start_parses_no_json_and_a_changed_json_invalidates(tmp_path, no_checks, monkeypatch):
    cfg = _coco(tmp_path)
    first = load_split(cfg, "train")
    assert [len(r.boxes) for r in first.records] == [0, 1, 2, 0, 1, 2]  # crowd and area-less boxes dropped
    assert first.report.dropped_boxes == 1 and first.report.labels == 4
    gt = coco_gt(first)
    assert sorted(gt.getImgIds()) == [r.image_id for r in first.records]
    no_checks()
    again = load_split(cfg, "train")
    assert again.records == first.records and again.report.cached == 6
    assert again.report.row() == first.report.row() | {"from cache": 6, "seconds": again.report.row()["seconds"]}
    monkeypatch.undo()
    path = tmp_path / "annotations" / "instances_train.json"
    body = json.loads(path.read_text())
    body["annotations"][0]["bbox"] = [1.0, 1.0, 5.0, 5.0]
    path.write_text(json.dumps(body))
    changed = load_split(cfg, "train")
    assert changed.records[1].boxes.tolist() == [[1.0, 1.0, 6.0, 6.0]] and changed.label_digest != first.label_digest
    assert changed.report.cached == 6  # the images' check entries still hold: only the JSON was read again
    body["images"][2]["width"] = 41
    path.write_text(json.dumps(body))
    with pytest.raises(DataError, match=r"c2.jpg` is 40x30 but .* says 41x30; fix the annotation"):
        load_split(cfg, "train")


def test_coco_boxes_are_bitwise_those_of_one_image_at_a_time(tmp_path):
    cfg = _coco(tmp_path)
    split = load_split(cfg, "train")
    data = coco_mod.parse_coco((tmp_path / "annotations" / "instances_train.json").read_bytes(), Path("x"))
    for rec, img in zip(split.records, data["images"], strict=True):
        anns = [a for a in data["annotations"] if a["image_id"] == img["id"] and not a["iscrowd"]]
        boxes, cls = coco_mod._targets(anns, {1: 0, 2: 1}, img)
        assert rec.boxes.tobytes() == boxes.tobytes() and rec.cls.tolist() == cls.tolist()


def test_a_non_zero_rank_reads_rank_zeros_index(tmp_path, no_checks, monkeypatch):
    """The trainer's `main_first(build_datasets)`: rank 0 builds, rank 1 (after it) checks nothing."""
    root = _yolo(tmp_path)
    _yolo(root, 4, "val")
    cfg = _cfg(root)
    rank0 = Distributed(0, 1).main_first(lambda: build_datasets(cfg, AugmentConfig(), 64, 0, 1))
    rank1 = Distributed(1, 2)
    monkeypatch.setattr(rank1, "decide", lambda decision: None)  # rank 0 is done: nothing to wait for
    no_checks()
    train, val = rank1.main_first(lambda: build_datasets(cfg, AugmentConfig(), 64, 0, 1))
    assert train.split.report.cached == 12 and val.split.report.cached == 4
    assert train.records == rank0[0].records and dataset_fingerprint(train.split, val.split, "stat") == (
        dataset_fingerprint(rank0[0].split, rank0[1].split, "stat")
    )
    assert train[(0, 3)]["img"].equal(rank0[0][(0, 3)]["img"])


# ----------------------------------------------------------------------------- flat records


def _list_records() -> list[ImageRecord]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(7):
        k = i % 3
        boxes = rng.uniform(0, 50, (k, 4)).astype(np.float32)
        out.append(ImageRecord(Path(f"/d/images/é{i}.jpg"), 60 + i, 40, boxes, np.arange(k), i + 1, 100 * i, 7 * i))
    out[2].content = "ab" * 32
    return out


def test_flat_records_behave_like_the_list():
    records = _list_records()
    flat = FlatRecords.from_records(records)
    assert len(flat) == len(records) and flat == records and flat == list(flat)
    assert _as_lists(flat) == _as_lists(records) and _as_lists([flat[-1]]) == _as_lists(records[-1:])
    assert _as_lists(flat[1:4]) == _as_lists(records[1:4])
    assert isinstance(flat[0].path, Path) and flat[0].path == Path("/d/images/é0.jpg")
    assert flat[2].content == "ab" * 32 and flat[0].content == ""
    with pytest.raises(IndexError):
        flat[7]
    with pytest.raises(ValueError):
        flat[1].boxes[0, 0] = 1.0  # items are views of shared, read-only columns
    flat.set_content(0, "cd" * 32)
    assert flat[0].content == "cd" * 32
    base = Path("/d")
    as_list = Split(["a"], records, [1], base, "x")
    as_flat = Split(["a"], FlatRecords.from_records(records), [1], base, "x")
    assert fingerprint(as_list) == fingerprint(as_flat) and fingerprint(as_list, "content") == fingerprint(
        as_flat, "content"
    )
    again = FlatRecords(flat.columns())
    assert again == flat and FlatRecords.from_records([]) == []


def test_dataset_items_are_the_same_from_flat_and_list_records(tmp_path):
    split = load_split(_cfg(_yolo(tmp_path)), "train")
    as_list = Split(split.names, list(split.records), split.class_to_category, split.base, split.label_digest)
    flat_ds = DetectionDataset(split, 64, augment=AugmentConfig(), seed=3, epochs=2)
    list_ds = DetectionDataset(as_list, 64, augment=AugmentConfig(), seed=3, epochs=2)
    for key in [(0, 0), (1, 5), (0, 11)]:
        a, b = flat_ds[key], list_ds[key]
        assert a["img"].equal(b["img"]) and a["bboxes"].equal(b["bboxes"]) and a["image_id"] == b["image_id"]


def test_exif_rotated_jpeg_reports_the_decoded_size_from_one_open(tmp_path):
    from PIL import Image

    path = tmp_path / "r.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: cv2 decodes it 30x40
    Image.new("RGB", (40, 30)).save(path, exif=exif)
    info = check_mod.verify_image(path)
    assert (info.width, info.height, info.raw_width, info.raw_height) == (30, 40, 40, 30)
    assert cv2.imread(str(path)).shape[:2] == (40, 30)
    Image.new("RGB", (40, 30)).save(tmp_path / "p.png")
    assert check_mod.verify_image(tmp_path / "p.png").width == 40


def test_check_coco_images_still_checks_a_list_of_records(tmp_path):
    """The public per-record check (kept for callers of 0.3) gives what the loader's columns give."""
    cfg = _coco(tmp_path)
    split = load_split(cfg, "train")
    records = [ImageRecord(r.path, r.width, r.height, r.boxes, r.cls, r.image_id) for r in split.records]
    kept, report = check_mod.check_coco_images(
        tmp_path, tmp_path / "annotations" / "instances_train.json", records, "train", "skip", "stat"
    )
    assert _as_lists(kept) == _as_lists(split.records) and report.cached == 6
