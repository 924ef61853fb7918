import logging
import os
import socket
import sys
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", str(Path(__file__).resolve().parents[1] / ".ultralytics"))

import yolo_resume  # noqa: E402,F401  (pins OMP_NUM_THREADS before any test imports ultralytics)

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


# -- the shared reference run of the resume and checkpoint-store tests ----------------------------
# 16 images / batch 4 = 4 batches per epoch; nbs 8 = 2 batches per optimizer step, so odd steps
# leave accumulated gradients pending; mosaic on so augmentation is exercised.
TINY = {"data.num_train": 16, "train.epochs": 3, "ckpt.every_steps": 1}
TOTAL_STEPS = 12


def sets(data_root, **extra):
    return [arg for item in tiny_overrides(data_root, **{**TINY, **extra}) for arg in ("--set", item)]


def final_ckpt(run: Path, step: int = TOTAL_STEPS) -> Path:
    return run / "checkpoints" / f"ckpt-{step:09d}"


def step_rows(run: Path, after: int = 0) -> list[list[str]]:
    import csv

    with open(run / "steps.csv") as f:
        rows = list(csv.reader(f))[1:]
    return [r for r in rows if int(r[0]) > after]


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build) -> Path:
    """A folder `build(folder)` fills once per test session, shared by all pytest-xdist workers.

    Under xdist each worker has its own base temp folder inside one shared parent; the first worker
    to take the lock builds the folder there and the others wait and reuse it, so an expensive
    reference run is trained once, not once per worker."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            done.touch()
    return folder


def _train_straight(work: Path) -> None:
    result = cli("train", "--run-dir", "run", "-q", *sets(work / "data"), cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="session")
def straight(tmp_path_factory):
    """The uninterrupted reference run, with a checkpoint after every step (trained once per session)."""
    return built_once(tmp_path_factory, "straight", _train_straight)


def assert_same_as_straight(straight: Path, run: Path, resumed_at: int = 0) -> None:
    from yolo_resume.checkpoint.format import read_meta

    assert read_meta(final_ckpt(run))["digests"] == read_meta(final_ckpt(straight / "run"))["digests"]
    assert step_rows(run, resumed_at) == step_rows(straight / "run", resumed_at)
    assert len(step_rows(run, resumed_at)) == TOTAL_STEPS - resumed_at


def copy_checkpoints(straight: Path, dest_run: Path, steps) -> Path:
    """A run folder holding copies of some of the reference run's checkpoints (and its data)."""
    import shutil

    (dest_run / "checkpoints").mkdir(parents=True)
    for step in steps:
        shutil.copytree(final_ckpt(straight / "run", step), final_ckpt(dest_run, step))
    return dest_run


# -- a real S3-protocol server (moto) on 127.0.0.1, for the object-store tests -------------------
# Distinctive values, so that finding them anywhere proves a leak.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "AKIAYOLORESUMEPROBE7",
    "AWS_SECRET_ACCESS_KEY": "yolo/Resume+SECRET+probe/0123456789abcdef",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def endpoint():
    """A moto S3 server on a free local port; credentials in the environment (inherited by `cli()`)."""
    saved = {key: os.environ.get(key) for key in (*CREDENTIALS, "AWS_ENDPOINT_URL", "AWS_PROFILE")}
    os.environ.update(CREDENTIALS)
    for key in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        os.environ.pop(key, None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3(endpoint):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)


@pytest.fixture
def url(s3):
    """A fresh bucket per test; checkpoints under its prefix `x`."""
    bucket = f"ckpt-{uuid.uuid4().hex[:12]}"
    s3.mkdir(bucket)
    return f"s3://{bucket}/x"
