"""Checkpoint cost on the real state of a YOLOv5s run (model + EMA + AdamW state + counters + RNG).

Measured in one process, on one disk, against baselines taken in the same run:
- stall: how long the training thread is blocked by an async save, vs a plain synchronous torch.save;
- write throughput: bytes committed / wall time (incl. fsync) vs a raw write + fsync of the same bytes;
- load + verify: full SHA-256 verification and load, vs torch.load of the torch.save file (weights_only=False, as the numpy RNG state needs; unverified).

Usage: python scripts/bench_checkpoint.py [--repeats 5] [--dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from ultralytics.utils.torch_utils import ModelEMA

from yolo_resume.checkpoint.format import load_checkpoint, write_checkpoint
from yolo_resume.checkpoint.manager import CheckpointManager
from yolo_resume.config import TrainConfig
from yolo_resume.model import build_model, compute_loss
from yolo_resume.optim import build_optimizer
from yolo_resume.seeding import rng_state


def training_state() -> dict:
    """The state a YOLOv5s (80 classes) run checkpoints after a few AdamW steps."""
    torch.manual_seed(0)
    model = build_model("yolov5s.yaml", 80, [str(i) for i in range(80)], TrainConfig())
    ema = ModelEMA(model)
    opt = build_optimizer(model, TrainConfig(optimizer="AdamW", lr0=0.001))
    batch = {
        "img": torch.rand(2, 3, 64, 64),
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[1.0], [2.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.4, 0.4, 0.2, 0.5]]),
    }
    for _ in range(2):
        loss, _ = compute_loss(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
    return {
        "model": model.state_dict(),
        "ema": {"weights": ema.ema.state_dict(), "updates": ema.updates},
        "optimizer": opt.state_dict(),
        "train_state": {"epoch": 3, "step_in_epoch": 17, "global_step": 1234, "history": []},
        "rng": rng_state(),
    }


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(root: Path, repeats: int) -> dict:
    state = training_state()
    rows: dict[str, list[float]] = {k: [] for k in ("torch_save", "stall_async", "commit", "raw_write",
                                                   "load_verify", "torch_load")}
    nbytes = 0
    for i in range(repeats):
        # Baseline 1: what ultralytics does each epoch, a synchronous torch.save (no fsync).
        pt = root / f"baseline-{i}.pt"
        rows["torch_save"].append(timed(lambda pt=pt: torch.save(state, pt)))
        rows["torch_load"].append(timed(lambda pt=pt: torch.load(pt, weights_only=False)))

        # Ours, as the trainer calls it: the training thread pays only for the snapshot.
        manager = CheckpointManager(root / f"async-{i}", keep_last=100, async_save=True)
        meta = {"global_step": 1000 + i}
        rows["stall_async"].append(timed(lambda m=manager, meta=meta: m.save(state, meta)))
        manager.wait()
        assert all(r.error is None for r in manager.poll())

        # Ours, the commit alone (encode + hash + write + fsync + rename + fsync dir).
        rows["commit"].append(timed(lambda i=i: write_checkpoint(root, f"sync-{i}", state, {"global_step": i})))
        nbytes = folder_bytes(root / f"sync-{i}")

        # Baseline 2: the disk itself, writing and fsyncing the same number of bytes.
        blob = os.urandom(nbytes)
        raw = root / f"raw-{i}.bin"

        def raw_write(raw=raw, blob=blob):
            with open(raw, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())

        rows["raw_write"].append(timed(raw_write))
        rows["load_verify"].append(timed(lambda i=i: load_checkpoint(root / f"sync-{i}")))
        for p in (pt, raw):
            p.unlink()
        shutil.rmtree(root / f"sync-{i}")
        shutil.rmtree(root / f"async-{i}")
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "bytes": nbytes,
        "median_s": med,
        "stall_vs_torch_save": med["stall_async"] / med["torch_save"],
        "write_throughput_MBps": nbytes / med["commit"] / 1e6,
        "raw_throughput_MBps": nbytes / med["raw_write"] / 1e6,
        "throughput_vs_raw": med["raw_write"] / med["commit"],
        "load_verify_vs_torch_load": med["load_verify"] / med["torch_load"],
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}, "
        f"torch {torch.__version__}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="Folder on the disk to measure (default: ./runs).")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    base = args.dir or Path("runs")
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix="bench-ckpt-") as tmp:
        result = bench(Path(tmp), args.repeats)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
