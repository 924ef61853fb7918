"""Issue 15: `val` and `predict` on a checkpoint, the paths a finished run prints, and the default
time-based save. On the session's reference run (`straight`); one training subprocess in all."""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import TOTAL_STEPS, cli, final_ckpt, tiny_overrides
from typer.testing import CliRunner

from yolo_resume.checkpoint.ref import resolve
from yolo_resume.cli import app
from yolo_resume.config import Config
from yolo_resume.errors import CheckpointError
from yolo_resume.predict import list_sources

ASSETS = Path(__import__("ultralytics").__file__).parent / "assets"


def invoke(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def copied_run(straight: Path, dest: Path, steps=(TOTAL_STEPS,)) -> Path:
    """A run folder with copies of the reference run's checkpoints: `val` writes into it, never into `straight`."""
    for step in steps:
        shutil.copytree(final_ckpt(straight / "run", step), final_ckpt(dest, step))
    return dest


def flipped(straight: Path, dest: Path) -> Path:
    """A copy of the final checkpoint with one byte of its tensors file changed."""
    ckpt = final_ckpt(copied_run(straight, dest))
    tensors = ckpt / "tensors.safetensors"
    with open(tensors, "r+b") as f:
        f.seek(tensors.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0x10]))
    return ckpt


def test_val_reproduces_the_runs_own_validation_and_writes_its_report(straight, tmp_path):
    run = copied_run(straight, tmp_path / "run")
    result = invoke("val", final_ckpt(run), "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    saved = json.loads(Path(report["report"]).read_text())
    assert Path(report["report"]).parent == run / "val" and saved["metrics"] == report["metrics"]
    # The same EMA weights, data, batch and thresholds as the training's validation of its last epoch: the
    # same numbers, to the last bit (evaluate.py's behaviour for training is unchanged).
    stored = json.loads((final_ckpt(run) / "meta.json").read_text())["metrics"]
    assert {k: report["metrics"][k] for k in ("map", "map50", "fitness")} == stored
    names = json.loads((final_ckpt(run) / "meta.json").read_text())["names"]
    assert [row["name"] for row in report["classes"]] == names
    assert sum(row["labels"] for row in report["classes"]) > 0
    assert report["weights"] == "ema" and report["split"] == "val" and report["images"] == 4
    for key in ("map", "map50", "ultralytics_map", "ultralytics_map50"):
        assert 0 <= report["metrics"][key] <= 1
    best = report["best_f1"]
    assert 0 <= best["conf"] <= 1 and 0 <= best["precision"] <= 1 and 0 <= best["recall"] <= 1
    # the validation pictures, in a folder named as the report
    from test_plots import assert_picture

    from yolo_resume.pictures import VAL_PICTURES

    folder = run / "val" / Path(report["report"]).stem
    assert sorted(Path(p).name for p in report["pictures"]) == sorted(VAL_PICTURES)
    for name in VAL_PICTURES:
        assert_picture(folder / name, (600, 600) if name.endswith(".png") else (128, 128))
    # the table mode prints the same figures
    table = invoke("val", final_ckpt(run), "--weights", "model", "--save-dir", tmp_path / "elsewhere")
    assert table.exit_code == 0, table.output
    assert "mAP@[.5:.95]" in table.stdout and "best F1" in table.stdout
    assert (tmp_path / "elsewhere" / f"{final_ckpt(run).name}-val-model.json").is_file()


def test_val_of_a_run_scores_its_best_checkpoint(straight, tmp_path):
    run = copied_run(straight, tmp_path / "run", steps=(4, 8, TOTAL_STEPS))
    result = invoke("val", run, "--json", "--batch", "3", "--conf", "0.01")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    from yolo_resume.checkpoint.ref import best_of

    infos = resolve(run).infos()
    assert Path(report["checkpoint"]).name in best_of(infos) and report["conf"] == 0.01


def test_val_refuses_a_test_split_the_dataset_lacks_and_bad_thresholds(straight, tmp_path):
    run = copied_run(straight, tmp_path / "run")
    result = invoke("val", final_ckpt(run), "--split", "test")
    assert result.exit_code == 2 and "synthetic dataset has no test split" in result.output
    result = invoke("val", final_ckpt(run), "--conf", "1.5")
    assert result.exit_code == 2 and "--conf must be" in result.output
    assert not (run / "val").exists()


@pytest.mark.parametrize("command", ["val", "predict"])
def test_a_corrupt_checkpoint_is_refused_as_resume_refuses_it(straight, tmp_path, command):
    ckpt = flipped(straight, tmp_path / "run")
    with pytest.raises(CheckpointError) as refused:  # what --resume's CheckpointRef.load says
        resolve(ckpt).one().load()
    args = [command, ckpt] + ([ASSETS / "bus.jpg", "--save-dir", tmp_path / "out"] if command == "predict" else [])
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(refused.value).split()[:4] == lines[0].removeprefix("error: ").split()[:4]
    assert not (tmp_path / "out").exists() and not (tmp_path / "run" / "val").exists()


def test_predict_draws_ultralytics_sample_images(straight, tmp_path):
    run = copied_run(straight, tmp_path / "run")
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    shutil.copy(ASSETS / "zidane.jpg", pictures)
    out = tmp_path / "out"
    result = invoke(
        "predict", final_ckpt(run), ASSETS / "bus.jpg", pictures, str(ASSETS / "*.jpg"), "--conf", "0",
        "--save-dir", out, "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["images"]
    # bus.jpg named twice (file and glob) is predicted once; the two zidane.jpg get two output names
    assert sorted(Path(r["output"]).name for r in rows) == ["bus.jpg", "zidane-2.jpg", "zidane.jpg"]
    saved = json.loads((out / "predictions.json").read_text())
    assert saved["images"] == rows and saved["conf"] == 0
    for row in rows:
        source, drawn = cv2.imread(row["image"]), cv2.imread(row["output"])
        assert drawn.shape == source.shape and (row["width"], row["height"]) == (source.shape[1], source.shape[0])
        assert row["detections"], "conf 0 keeps the barely trained model's boxes"
        for det in row["detections"]:
            x1, y1, x2, y2 = det["box_xyxy"]
            assert 0 <= x1 <= x2 <= row["width"] and 0 <= y1 <= y2 <= row["height"] and det["confidence"] >= 0
        # the boxes are drawn: pixels changed
        assert np.abs(drawn.astype(int) - source.astype(int)).max() > 100
    names = json.loads((final_ckpt(run) / "meta.json").read_text())["names"]
    assert {d["name"] for r in rows for d in r["detections"]} <= set(names)
    # without --save-dir: the run's predict/ folder
    result = invoke("predict", final_ckpt(run), ASSETS / "bus.jpg")
    assert result.exit_code == 0, result.output
    assert (run / "predict" / "bus.jpg").is_file() and "detections in" in result.stdout


def test_predict_sources_are_checked_before_the_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a.png").write_bytes(b"")
    assert list_sources([str(tmp_path / "a.png"), str(tmp_path / "*.png")]) == [tmp_path / "a.png"]
    for source, message in (
        (tmp_path / "missing.jpg", "does not exist"),
        (tmp_path / "empty", "holds no images"),
        (str(tmp_path / "*.jpg"), "matches no image file"),
    ):
        result = invoke("predict", tmp_path / "no-such-run", source)
        assert result.exit_code == 2 and message in result.output, result.output


def test_every_minutes_is_on_by_default():
    assert Config().ckpt.every_minutes == 10.0


def test_a_finished_run_prints_the_paths_a_user_wants_last(tmp_path):
    """The one training subprocess: 1 epoch of 4 images. Under a minute, so the 10-minute default adds
    no checkpoint (ckpt-N at the epoch end only); `ckpt.light_every_epochs: 1` adds the epoch's milestone."""
    extra = {"data.num_train": 4, "train.epochs": 1, "ckpt.keep_last": 3, "ckpt.light_every_epochs": 1}
    overrides = tiny_overrides(tmp_path / "data", **extra)
    result = cli("train", "--run-dir", "run", "-q", *[a for o in overrides for a in ("--set", o)], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    run = tmp_path / "run"
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("ckpt-")] == ["ckpt-000000001"]
    lines = result.stdout.strip().splitlines()[-7:]
    words = [line.split() for line in lines]
    ckpt = (run / "checkpoints" / "ckpt-000000001").resolve()
    assert [w[0] for w in words] == ["weights:", "weights:", "checkpoint:", "export:", "score:", "plot:", "extend:"]
    assert [Path(w[1]).resolve() for w in words[:2]] == [
        (run / n).resolve() for n in ("best.safetensors", "last.safetensors")
    ]
    assert Path(words[2][1]).resolve() == ckpt and "best, fitness" in lines[2]
    assert words[3][1:4] == ["yolo-resume", "ckpt", "export"] and Path(words[3][4]).resolve() == ckpt
    assert words[4][1:3] == ["yolo-resume", "val"] and Path(words[4][3]).resolve() == ckpt
    assert Path(words[5][1]).resolve() == (run / "results.png").resolve() and (run / "results.png").is_file()
    assert words[6][1:5] == ["yolo-resume", "train", "--resume", "--run-dir"]
    assert Path(words[6][5]).resolve() == run.resolve() and words[6][6:] == ["--epochs", "2"]
    # the light weights files: the final EMA weights, in the safetensors export's format, not checkpoints
    import safetensors
    import torch

    state, _ = resolve(ckpt).one().load()
    for name in ("best.safetensors", "last.safetensors", "weights/epoch-1.safetensors"):
        with safetensors.safe_open(run / name, "pt") as f:
            assert f.metadata()["format"] == "yolo-resume-weights" and f.metadata()["weights"] == "ema"
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        assert tensors.keys() == state["ema"]["weights"].keys()
        assert all(torch.equal(tensors[k], v) for k, v in state["ema"]["weights"].items())
    # retention and resume never see the light files: the run's only checkpoint is ckpt-1
    assert [info.name for info in resolve(run).infos()] == ["ckpt-000000001"]
    assert [p.name for p in (run / "weights").iterdir()] == ["epoch-1.safetensors"]
    assert not list(run.glob(".*.tmp-*"))


def test_per_class_figures_on_crafted_detections():
    """The per-class table on numbers that are not all zero (the tiny run's mAP is 0): class 0 found
    perfectly, class 1 missed; COCO per category and ultralytics per class agree on which is which."""
    import torch

    from yolo_resume.data.coco import coco_from_dict
    from yolo_resume.evaluate import UltralyticsStyleAP, coco_eval, coco_per_category

    imgsz = 64
    ul = UltralyticsStyleAP()
    batch = {
        "img": torch.zeros(1, 3, imgsz, imgsz),
        "bboxes": torch.tensor([[30 / imgsz, 30 / imgsz, 40 / imgsz, 40 / imgsz], [0.8, 0.8, 0.2, 0.2]]),
        "cls": torch.tensor([[0.0], [1.0]]),
        "batch_idx": torch.tensor([0.0, 0.0]),
    }
    ul.update([torch.tensor([[10.0, 10.0, 50.0, 50.0, 0.9, 0.0]])], batch)
    rows, at_best = ul.per_class()
    assert rows[0]["ap"] == pytest.approx(0.995) and rows[0]["precision"] == pytest.approx(1, abs=1e-3)
    assert rows[1] == {"ap": 0.0, "ap50": 0.0, "precision": 0.0, "recall": 0.0}
    # one detection at 0.9: F1 is flat below it, and ultralytics takes the first maximum (conf 0)
    assert at_best["recall"] == pytest.approx(0.5, abs=1e-3) and 0 <= at_best["conf"] <= 0.9

    gt = coco_from_dict(
        {
            "images": [{"id": 1, "width": 64, "height": 64, "file_name": "a.jpg"}],
            "categories": [{"id": 7, "name": "a"}, {"id": 9, "name": "b"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
                {"id": 2, "image_id": 1, "category_id": 9, "bbox": [45, 45, 12, 12], "area": 144, "iscrowd": 0},
            ],
        }
    )
    found = [{"image_id": 1, "category_id": 7, "bbox": [10, 10, 40, 40], "score": 0.9}]
    per_category = coco_per_category(coco_eval(gt, found, [1]))
    assert per_category == {7: pytest.approx({"ap": 1.0, "ap50": 1.0}), 9: {"ap": 0.0, "ap50": 0.0}}


def test_val_and_predict_take_a_remote_checkpoint(straight, url, endpoint, s3, tmp_path, monkeypatch):
    """A bare s3:// URL of a committed checkpoint (the reference run's final one, uploaded as a run's save
    uploads it), reached through the standard environment (AWS_ENDPOINT_URL): the same report as the local
    checkpoint's. (A corrupt remote checkpoint fails the same CheckpointRef.load as a local one, tested
    above and in test_remote_store; not repeated here: each download of the 49 MB checkpoint costs ~3 s.)"""
    from yolo_resume.checkpoint.object_store import ObjectStore

    name = final_ckpt(straight / "run").name
    store = ObjectStore(url, {"endpoint_url": endpoint})
    store._upload(name, final_ckpt(straight / "run"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    remote = f"{url}/{name}"
    result = invoke("val", remote, "--json", "--save-dir", tmp_path / "val")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["checkpoint"] == remote and Path(report["report"]).parent == tmp_path / "val"
    stored = json.loads((final_ckpt(straight / "run") / "meta.json").read_text())["metrics"]
    assert {k: report["metrics"][k] for k in ("map", "map50", "fitness")} == stored
    out = tmp_path / "out"
    result = invoke("predict", remote, ASSETS / "bus.jpg", "--conf", "0", "--save-dir", out, "--json")
    assert result.exit_code == 0, result.output
    assert [Path(r["output"]).name for r in json.loads(result.stdout)["images"]] == ["bus.jpg"]
    assert (out / "bus.jpg").is_file() and (out / "predictions.json").is_file()
