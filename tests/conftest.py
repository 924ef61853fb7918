import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(__file__).resolve().parents[1] / ".ultralytics"))

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(data_root: Path, **extra) -> list[str]:
    """The tiny CPU config the end-to-end tests train: yolov5n, imgsz 64, a few images."""
    base = {
        "data.root": str(data_root),
        "data.num_train": 12,
        "data.num_val": 4,
        "data.image_size": 64,
        "model.cfg": "yolov5n.yaml",
        "model.imgsz": 64,
        "train.epochs": 2,
        "train.batch": 4,
        "train.nbs": 8,
        "train.workers": 0,
        "train.warmup_epochs": 0.5,
        "augment.mosaic": 0.5,
        "augment.close_mosaic": 1,
        "eval.every_epochs": 1,
        "ckpt.keep_last": 50,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600):
    """Run `python -m yolo_resume ...` in a fresh process."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "yolo_resume", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path
