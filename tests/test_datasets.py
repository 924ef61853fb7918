"""Datasets as users bring them (issue 11): read as ultralytics reads them, checked before training, with a
cache; and provenance that means what it says (issue 12, items 11-12). Tiny datasets written by each test,
with the real photos shipped in the ultralytics package."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import ultralytics
from conftest import TINY, assert_same_as_straight, cli, tiny_overrides

from yolo_resume.config import Config, ConfigError, DataConfig, apply_overrides, load_config, resolve_paths
from yolo_resume.data import check as check_mod
from yolo_resume.data import load_split
from yolo_resume.data.coco import coco_gt
from yolo_resume.data.manifest import write_manifest
from yolo_resume.data.records import dataset_fingerprint, fingerprint, legacy_fingerprint
from yolo_resume.drift import BREAKING, Environment, code_drift, dataset_drift
from yolo_resume.errors import DataError
from yolo_resume.provenance import code_version, experiment_git, git_info

ASSETS = Path(ultralytics.__file__).parent / "assets"
BUS, ZIDANE = ASSETS / "bus.jpg", ASSETS / "zidane.jpg"  # 810x1080 and 1280x720 JPEG photos


# ----------------------------------------------------------------------------- helpers


def photo(dest: Path, src: Path = BUS) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def label(dest: Path, text: str | bytes) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    (dest.write_bytes if isinstance(text, bytes) else dest.write_text)(text)
    return dest


def yolo_split(root: Path, split: str, labels: dict[str, str | bytes | None]) -> Path:
    """images/<split>/<name>.jpg (photos, alternating) with labels/<split>/<name>.txt (None: none)."""
    for i, (name, text) in enumerate(labels.items()):
        photo(root / "images" / split / f"{name}.jpg", (BUS, ZIDANE)[i % 2])
        if text is not None:
            label(root / "labels" / split / f"{name}.txt", text)
    return root


def yolo_dataset(root: Path) -> Path:
    yolo_split(root, "train", {"a": "0 0.5 0.5 0.2 0.2\n", "b": "1 0.3 0.3 0.1 0.2\n"})
    return yolo_split(root, "val", {"c": "0 0.5 0.5 0.4 0.4\n"})


def write_yaml(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


def yolo_cfg(root: Path | str, **kw) -> DataConfig:
    return DataConfig(format="yolo", root=str(root), **kw)


def coco_json(path: Path, images: list[tuple[str, Path]], anns: list[dict], cats: list[dict]) -> Path:
    """A COCO file naming `images` ((file_name, source photo)); the photos' real sizes."""
    entries = []
    for i, (name, src) in enumerate(images, 1):
        h, w = cv2.imread(str(src)).shape[:2]
        entries.append({"id": i, "file_name": name, "width": w, "height": h})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": entries, "annotations": anns, "categories": cats}))
    return path


def ann(i: int, image_id: int, cat: int, bbox: list[float]) -> dict:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3], "iscrowd": 0}


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ----------------------------------------------------------------------------- the dataset YAML


def test_yaml_relative_path_is_read_from_the_working_directory(tmp_path, monkeypatch):
    yolo_dataset(tmp_path / "sets" / "toy")
    cfg = write_yaml(
        tmp_path / "cfgs" / "toy.yaml", "path: sets/toy\ntrain: images/train\nval: images/val\nnames: [p, q]\n"
    )
    monkeypatch.chdir(tmp_path)  # ultralytics: a relative `path` is relative to where you run
    split = load_split(yolo_cfg(cfg), "train")
    assert [r.path.name for r in split.records] == ["a.jpg", "b.jpg"] and split.base == tmp_path / "sets" / "toy"


def test_yaml_without_path_uses_its_folder_and_reads_names_as_a_mapping(tmp_path):
    yolo_dataset(tmp_path)
    cfg = write_yaml(tmp_path / "data.yaml", "train: images/train\nval: images/val\nnames: {0: p, 1: q}\n")
    assert load_split(yolo_cfg(cfg), "val").names == ["p", "q"]


def test_yaml_nc_disagreeing_with_names_is_an_error(tmp_path):
    yolo_dataset(tmp_path)
    cfg = write_yaml(tmp_path / "data.yaml", "train: images/train\nval: images/val\nnc: 3\nnames: [p, q]\n")
    with pytest.raises(DataError, match=r"`names` has 2 entries but `nc: 3`"):
        load_split(yolo_cfg(cfg), "train")


def test_yaml_nc_without_names_gives_ultralytics_placeholder_names(tmp_path):
    yolo_dataset(tmp_path)
    cfg = write_yaml(tmp_path / "data.yaml", "train: images/train\nval: images/val\nnc: 2\n")
    assert load_split(yolo_cfg(cfg), "train").names == ["class_0", "class_1"]


def test_yaml_validation_key_is_read_as_val_and_said(tmp_path):
    yolo_split(tmp_path, "train", {"a": "0 0.5 0.5 0.2 0.2\n"})
    yolo_split(tmp_path, "valid", {"v": "0 0.5 0.5 0.2 0.2\n"})
    cfg = write_yaml(tmp_path / "data.yaml", "train: images/train\nvalidation: images/valid\nnames: [p]\n")
    from yolo_resume.data.yolo import read_dataset_yaml

    meta = read_dataset_yaml(cfg)
    assert meta.splits["val"] == [tmp_path / "images" / "valid"] and "validation" in meta.notes[0]
    assert [r.path.name for r in load_split(yolo_cfg(cfg), "val").records] == ["v.jpg"]


def test_yaml_without_val_is_an_error_not_a_silent_default(tmp_path):
    yolo_dataset(tmp_path)  # images/val exists: ultralytics still refuses a YAML without `val:`
    cfg = write_yaml(tmp_path / "data.yaml", "train: images/train\nnames: [p, q]\n")
    with pytest.raises(DataError, match=r"no `val:` key"):
        load_split(yolo_cfg(cfg), "val")


def test_roboflow_yolo_export_parent_paths_fall_back_as_ultralytics(tmp_path):
    root = tmp_path / "export"
    for split in ("train", "valid"):
        photo(root / split / "images" / "x.jpg")
        label(root / split / "labels" / "x.txt", "0 0.5 0.5 0.2 0.2\n")
    cfg = write_yaml(root / "data.yaml", "train: ../train/images\nval: ../valid/images\nnc: 1\nnames: ['car']\n")
    split = load_split(yolo_cfg(cfg), "val")
    assert split.records[0].path == root / "valid" / "images" / "x.jpg" and len(split.records[0].boxes) == 1


def test_yaml_splits_as_a_list_of_folders_and_a_list_file_with_bom(tmp_path):
    yolo_split(tmp_path, "a", {"x": "0 0.5 0.5 0.2 0.2\n"})
    yolo_split(tmp_path, "b", {"y": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "val.txt").write_bytes("\ufeff./images/a/x.jpg\r\nimages/b/y.jpg\r\n".encode())
    cfg = write_yaml(tmp_path / "d.yaml", f"path: {tmp_path}\ntrain: [images/a, images/b]\nval: val.txt\nnames: [p]\n")
    assert [r.path.name for r in load_split(yolo_cfg(cfg), "train").records] == ["x.jpg", "y.jpg"]
    assert [r.path.name for r in load_split(yolo_cfg(cfg), "val").records] == ["x.jpg", "y.jpg"]


def test_pose_labels_are_boxes_by_kpt_shape(tmp_path):
    row = "0 0.5 0.5 0.2 0.4 " + " ".join(["0.9 0.1"] * 17)  # 17 keypoints far outside the box
    yolo_split(tmp_path, "train", {"a": row + "\n"})
    yolo_split(tmp_path, "val", {"b": row + "\n"})
    cfg = write_yaml(tmp_path / "d.yaml", "train: images/train\nval: images/val\nkpt_shape: [17, 2]\nnames: [person]\n")
    rec = load_split(yolo_cfg(cfg), "train").records[0]
    w, h = rec.width, rec.height
    np.testing.assert_allclose(rec.boxes[0], [0.4 * w, 0.3 * h, 0.6 * w, 0.7 * h], rtol=1e-5)


# ----------------------------------------------------------------------------- label rules


def test_label_with_bom_and_crlf_is_read(tmp_path):
    yolo_split(tmp_path, "train", {"a": b"\xef\xbb\xbf0 0.5 0.5 0.2 0.2\r\n1 0.3 0.3 0.1 0.1\r\n"})
    assert load_split(yolo_cfg(tmp_path, names=["p", "q"]), "train").records[0].cls.tolist() == [0, 1]


def test_upper_case_txt_labels_are_refused_not_trained_as_backgrounds(tmp_path):
    yolo_split(tmp_path, "train", {"a": "0 0.5 0.5 0.2 0.2\n", "b": None, "c": None})
    for name in ("b", "c"):
        label(tmp_path / "labels" / "train" / f"{name}.TXT", "0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match=r"2 label file\(s\) end in `\.TXT`.*Rename them"):
        load_split(yolo_cfg(tmp_path, names=["p"]), "train")


def test_duplicate_rows_are_removed_from_training_and_ground_truth(tmp_path):
    yolo_split(tmp_path, "val", {"a": "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n0 0.2 0.2 0.1 0.1\n"})
    split = load_split(DataConfig(format="yolo", root=str(tmp_path), names=["p"]), "val")
    assert len(split.records[0].boxes) == 2 and split.report.duplicates == 1
    assert len(coco_gt(split).getAnnIds()) == 2  # a perfect detector scores 1.0, not 0.85


def test_zero_width_coco_box_is_dropped_from_ground_truth_as_from_training(tmp_path):
    photo(tmp_path / "images" / "val" / "a.jpg")
    anns = [ann(1, 1, 1, [10, 10, 0, 50]), ann(2, 1, 1, [10, 10, 100, 50])]
    coco_json(tmp_path / "annotations" / "instances_val.json", [("a.jpg", BUS)], anns, [{"id": 1, "name": "p"}])
    split = load_split(DataConfig(format="coco", root=str(tmp_path)), "val")
    assert len(split.records[0].boxes) == 1 and coco_gt(split).getAnnIds() == [2]


def test_hidden_files_and_unsupported_formats_are_not_images(tmp_path):
    yolo_dataset(tmp_path)
    photo(tmp_path / "images" / "train" / ".ipynb_checkpoints" / "a-checkpoint.jpg")
    (tmp_path / "images" / "train" / "._a.jpg").write_bytes(b"\x00\x05\x16\x07AppleDouble")  # macOS metadata
    (tmp_path / "images" / "train" / "phone.heic").write_bytes(b"\x00" * 64)
    split = load_split(yolo_cfg(tmp_path, names=["p", "q"]), "train")
    assert [r.path.name for r in split.records] == ["a.jpg", "b.jpg"]
    skipped = {why: files for why, files in split.report.skipped.items()}
    assert sorted(f for files in skipped.values() for f in files) == [
        "images/train/._a.jpg",
        "images/train/.ipynb_checkpoints/a-checkpoint.jpg",
        "images/train/phone.heic",
    ]
    assert any("ignored" in w and "heic" in w for w in split.report.warnings())


# ----------------------------------------------------------------------------- the up-front check


def test_data_check_skips_a_truncated_jpeg_by_name_and_prints_the_summary(tmp_path):
    yolo_split(tmp_path / "d", "train", {"a": "0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n", "b": "1 0.5 0.5 0.1 0.1\n"})
    yolo_split(tmp_path / "d", "train", {"c": None})
    yolo_split(tmp_path / "d", "val", {"v": "0 0.5 0.5 0.2 0.2\n"})
    truncate(tmp_path / "d" / "images" / "train" / "b.jpg")
    write_yaml(tmp_path / "cfg.yaml", f"data: {{format: yolo, root: {tmp_path / 'd'}, names: [p, q]}}\n")
    result = cli("data", "check", "cfg.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped 1 image(s)" in result.stderr and "images/train/b.jpg` (truncated JPEG" in result.stderr
    assert "removed 1 duplicate label row(s)" in result.stderr
    table = {
        line.split("│")[1].strip(): line.split("│")[2].strip() for line in result.stdout.splitlines() if "│" in line
    }
    assert table["images"] == "2" and table["backgrounds"] == "1" and table["bad images"] == "1"
    assert table["boxes: p"] == "1" and table["duplicates removed"] == "1"


def test_data_check_refuses_a_bad_image_with_on_bad_image_error(tmp_path):
    yolo_dataset(tmp_path / "d")
    truncate(tmp_path / "d" / "images" / "val" / "c.jpg")
    write_yaml(tmp_path / "cfg.yaml", f"data: {{format: yolo, root: {tmp_path / 'd'}, names: [p, q]}}\n")
    result = cli("data", "check", "cfg.yaml", "--set", "data.on_bad_image=error", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "images/val/c.jpg` (truncated JPEG" in result.stderr and "replace or remove" in result.stderr


def test_check_is_cached_and_a_changed_file_is_the_only_one_read_again(tmp_path, monkeypatch):
    yolo_split(tmp_path, "train", {f"i{k}": "0 0.5 0.5 0.2 0.2\n" for k in range(40)})
    seen = []
    real = check_mod.verify_image
    monkeypatch.setattr(check_mod, "verify_image", lambda p: seen.append(p.name) or real(p))
    cfg = yolo_cfg(tmp_path, names=["p"])
    first = load_split(cfg, "train")
    assert len(seen) == 40 and first.report.cached == 0 and Path(first.report.cache_file).is_file()
    seen.clear()
    again = load_split(cfg, "train")
    assert seen == [] and again.report.cached == 40
    assert [r.boxes.tolist() for r in again.records] == [r.boxes.tolist() for r in first.records]
    label(tmp_path / "labels" / "train" / "i7.txt", "0 0.5 0.5 0.4 0.4\n")
    changed = load_split(cfg, "train")
    i7 = [r.path.name for r in first.records].index("i7.jpg")
    assert seen == ["i7.jpg"] and changed.records[i7].boxes.tolist() != first.records[i7].boxes.tolist()


# ----------------------------------------------------------------------------- COCO exports


def test_roboflow_coco_export_loads_without_folders_and_drops_the_placeholder_category(tmp_path):
    cats = [
        {"id": 0, "name": "vehicles", "supercategory": "none"},
        {"id": 1, "name": "bus", "supercategory": "vehicles"},
    ]
    for split in ("train", "valid"):
        photo(tmp_path / split / "x.jpg")
        coco_json(tmp_path / split / "_annotations.coco.json", [("x.jpg", BUS)], [ann(1, 1, 1, [10, 10, 50, 50])], cats)
    split = load_split(DataConfig(format="coco", root=str(tmp_path)), "val")
    assert split.names == ["bus"] and split.class_to_category == [1]
    assert split.records[0].path == tmp_path / "valid" / "x.jpg" and split.records[0].cls.tolist() == [0]
    assert any("placeholder" in note for note in split.report.warnings())


def test_cvat_coco_export_finds_its_images_folder(tmp_path):
    photo(tmp_path / "images" / "frame_000001.jpg")
    cats = [{"id": 1, "name": "person", "supercategory": ""}]
    coco_json(tmp_path / "annotations" / "instances_default.json", [("frame_000001.jpg", BUS)], [], cats)
    split = load_split(
        DataConfig(format="coco", root=str(tmp_path), train="annotations/instances_default.json"), "train"
    )
    assert split.records[0].path == tmp_path / "images" / "frame_000001.jpg"


def test_label_studio_coco_export_resolves_file_names_next_to_the_json(tmp_path):
    photo(tmp_path / "images" / "1a2b-bus.jpg")
    cats = [{"id": 0, "name": "bus"}]
    coco_json(tmp_path / "result.json", [("images/1a2b-bus.jpg", BUS)], [ann(1, 1, 0, [5, 5, 40, 40])], cats)
    split = load_split(DataConfig(format="coco", root=str(tmp_path), train="result.json"), "train")
    assert split.records[0].path == tmp_path / "images" / "1a2b-bus.jpg" and split.names == ["bus"]


# ----------------------------------------------------------------------------- settings


def test_a_bad_setting_stops_the_run_before_training_with_one_line(tmp_path):
    result = cli("train", "--set", "eval.iou=2", "--run-dir", "run", "-q", cwd=tmp_path)
    assert (
        result.returncode == 2 and result.stderr.strip() == "error: config key `eval.iou` must be > 0 and <= 1, got 2"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("item", ["train.lr0=.nan", "augment.mosaic=1.5", "eval.conf=-0.1", "train.momentum=1"])
def test_out_of_range_or_nan_settings_are_refused(item):
    with pytest.raises(ConfigError, match=item.split("=")[0]):
        apply_overrides(Config(), [item])


def test_relative_paths_are_resolved_once_against_the_working_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "net.yaml").write_text("nc: 1\n")
    cfg = apply_overrides(Config(), ["data.root=datasets/x", "ckpt.dir=ck", "model.cfg=m/net.yaml"])
    resolve_paths(cfg, tmp_path)
    assert (cfg.data.root, cfg.ckpt.dir, cfg.model.cfg) == (
        str(tmp_path / "datasets" / "x"),
        str(tmp_path / "ck"),
        str(tmp_path / "m" / "net.yaml"),
    )
    remote = resolve_paths(apply_overrides(Config(), ["ckpt.dir=s3://b/x", "model.cfg=yolov5n.yaml"]), tmp_path)
    assert (remote.ckpt.dir, remote.model.cfg) == ("s3://b/x", "yolov5n.yaml")


# ----------------------------------------------------------------------------- fingerprint and drift


def test_stat_fingerprint_sees_a_same_size_edit(tmp_path):
    yolo_dataset(tmp_path)
    cfg = yolo_cfg(tmp_path, names=["p", "q"])
    before = fingerprint(load_split(cfg, "train"))
    image = tmp_path / "images" / "train" / "a.jpg"
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other pixels
    image.write_bytes(bytes(data))
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    assert fingerprint(load_split(cfg, "train")) != before


def test_content_fingerprint_ignores_a_touch_and_sees_an_edit(tmp_path):
    yolo_dataset(tmp_path)
    cfg = yolo_cfg(tmp_path, names=["p", "q"], fingerprint="content")
    before = fingerprint(load_split(cfg, "train"), "content")
    image = tmp_path / "images" / "train" / "a.jpg"
    os.utime(image, ns=(0, 10**18))  # copied without its times: the content did not change
    assert fingerprint(load_split(cfg, "train"), "content") == before
    image.write_bytes(image.read_bytes()[:-10] + b"\0" * 8 + b"\xff\xd9")
    assert fingerprint(load_split(cfg, "train"), "content") != before


def _environment(train, val, scheme="stat", manifest=None) -> Environment:
    values = {"dataset_fingerprint": dataset_fingerprint(train, val, scheme), "dataset_manifest": manifest}
    return Environment(
        values,
        fingerprint_in=lambda s: dataset_fingerprint(train, val, s),
        legacy_fingerprint=lambda: ":".join(
            legacy_fingerprint(x, check_mod.legacy_label_digest(x)) for x in (train, val)
        ),
    )


def test_a_checkpoint_of_yolo_resume_0_2_compares_like_with_like(tmp_path):
    yolo_dataset(tmp_path)
    cfg = yolo_cfg(tmp_path, names=["p", "q"])
    train, val = load_split(cfg, "train"), load_split(cfg, "val")
    stored = "9c0ffee0" * 8 + ":" + "0ddba11a" * 8  # 0.2's format, and that of 0.2's formula on this data:
    import hashlib

    def old(split):  # yolo-resume 0.2's records.fingerprint over its label digest, written out
        labels = hashlib.sha256()
        for r in split.records:
            raw = (tmp_path / "labels" / r.path.parent.name / (r.path.stem + ".txt")).read_bytes()
            labels.update(f"{r.path.relative_to(tmp_path).as_posix()}\0{len(raw)}\0".encode() + raw)
        files = sorted((r.path.relative_to(tmp_path).as_posix(), r.file_size) for r in split.records)
        blob = json.dumps({"files": files, "labels": labels.hexdigest(), "names": split.names}, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    stored = f"{old(train)}:{old(val)}"
    assert dataset_drift({"dataset_fingerprint": stored}, _environment(train, val)) == []
    assert dataset_drift({"dataset_fingerprint": stored[::-1]}, _environment(train, val))[0].kind == BREAKING


def test_refused_resume_names_the_changed_files_and_how_to_go_on(tmp_path):
    yolo_dataset(tmp_path / "d")
    cfg = yolo_cfg(tmp_path / "d", names=["p", "q"])
    train, val = load_split(cfg, "train"), load_split(cfg, "val")
    env = _environment(train, val)
    stored = {**env, "dataset_manifest": str(write_manifest(tmp_path / "run", env["dataset_fingerprint"], train, val))}
    photo(tmp_path / "d" / "images" / "train" / "a.jpg", ZIDANE)  # the user replaced a broken image
    train = load_split(cfg, "train")
    now = dict(_environment(train, val))
    now["dataset_manifest"] = str(write_manifest(tmp_path / "run", now["dataset_fingerprint"], train, val))
    (drift,) = dataset_drift(stored, _environment(train, val, manifest=now["dataset_manifest"]))
    assert drift.kind == BREAKING and "train: 1 image changed (images/train/a.jpg)" in drift.note
    assert "--allow-drift" in drift.note


def _repo(path: Path) -> Path:
    path.mkdir(parents=True)
    for args in (
        ["init", "-q"],
        ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x"],
    ):
        subprocess.run(["git", *args], cwd=path, check=True, capture_output=True)
    return path


def test_git_provenance_is_the_config_files_repo_wherever_the_command_runs(tmp_path, monkeypatch):
    exp = _repo(tmp_path / "exp")
    (exp / "cfg.yaml").write_text("train: {epochs: 1}\n")
    monkeypatch.chdir(tmp_path)  # not a repo
    info = experiment_git(exp / "cfg.yaml")
    assert info["repo"] == str(exp) and len(info["commit"]) == 40
    assert set(code_version()) == {"version", "commit", "dirty"} and code_version()["version"]


def test_resume_from_another_directory_compares_the_stored_repo_not_the_cwd(tmp_path, monkeypatch):
    exp = _repo(tmp_path / "exp")
    meta = {"git": git_info(exp), "code": code_version()}
    monkeypatch.chdir(tmp_path)  # outside any repo: 0.2 reported "code changed" here
    assert code_drift(meta, {"git": git_info(), "code": code_version()}) == []
    subprocess.run(
        ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "y"], cwd=exp
    )
    (drift,) = code_drift(meta, {"git": git_info(), "code": code_version()})
    assert str(exp) in drift.what


# ----------------------------------------------------------------------------- validation after the epoch


def test_a_failing_validation_keeps_its_epoch_and_the_resume_is_exact(straight, tmp_path, monkeypatch):
    from yolo_resume.trainer import Trainer

    monkeypatch.chdir(tmp_path)
    overrides = tiny_overrides(straight / "data", **{**TINY, "ckpt.every_steps": 0})
    trainer = Trainer(load_config(None, overrides), tmp_path / "run", quiet=True)

    def broken():
        raise RuntimeError("validation ran out of memory")

    monkeypatch.setattr(trainer, "validate", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        trainer.fit()
    (saved,) = trainer.ckpt.list()
    state, meta = saved.ref.load()
    assert (
        meta["epoch"] == 1 and state["train_state"]["pending_eval"] and "map" not in state["train_state"]["history"][0]
    )

    resumed = Trainer(load_config(None, overrides), tmp_path / "run", quiet=True)
    resumed.resume(resumed.ckpt.latest_valid())
    assert resumed.fit() == 0
    assert_same_as_straight(straight, tmp_path / "run", resumed_at=4)

    def maps(run: Path) -> list[tuple[str, str]]:
        with open(run / "results.csv") as f:
            return [(row["epoch"], row["map"]) for row in csv.DictReader(f)]

    assert maps(tmp_path / "run") == maps(straight / "run") and len(maps(straight / "run")) == 3


def test_boxes_of_a_whole_split_at_once_are_bitwise_those_of_one_image_at_a_time():
    from yolo_resume.data.check import all_label_boxes
    from yolo_resume.data.yolo import Labels, label_boxes

    rng = np.random.default_rng(0)
    rows = [np.c_[rng.integers(0, 3, n), rng.uniform(-0.01, 1.01, (n, 4))] for n in (3, 0, 5, 1, 7)]
    sizes = [[810, 1080], [64, 48], [1280, 720], [5, 3], [333, 777]]
    for (boxes, cls, _), r, (w, h) in zip(all_label_boxes(rows, sizes), rows, sizes, strict=True):
        ref_boxes, ref_cls = label_boxes(Labels(r), w, h)
        assert boxes.dtype == ref_boxes.dtype and boxes.tobytes() == ref_boxes.tobytes()
        assert cls.tolist() == ref_cls.tolist()
