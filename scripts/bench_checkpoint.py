"""Checkpoint cost on the real state of a YOLOv5s run (model + EMA + AdamW state + counters + RNG).

Measured in one process, on one disk, against baselines taken in the same run:
- stall: how long the training thread is blocked by an async save, vs a plain synchronous torch.save;
- write throughput: bytes committed / wall time (incl. fsync) vs a raw write + fsync of the same bytes;
- load + verify: full SHA-256 verification and load, vs torch.load of the torch.save file
  (weights_only=False, which the numpy RNG state needs; no verification at all).

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


class MiniTrainer:
    """YOLOv5s (80 classes) + EMA + AdamW, stepping like the Trainer: forward, wait_snapshot, backward,
    optimizer step, EMA update."""

    def __init__(self, imgsz: int = 64, batch: int = 2):
        torch.manual_seed(0)
        self.model = build_model("yolov5s.yaml", 80, [str(i) for i in range(80)], TrainConfig())
        self.ema = ModelEMA(self.model)
        self.opt = build_optimizer(self.model, TrainConfig(optimizer="AdamW", lr0=0.001))
        self.batch = {
            "img": torch.rand(batch, 3, imgsz, imgsz),
            "batch_idx": torch.arange(batch, dtype=torch.float32),
            "cls": torch.ones(batch, 1),
            "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]]).repeat(batch, 1),
        }
        self.buffers = {name for name, _ in self.model.named_buffers()}

    def step(self, manager: CheckpointManager | None = None) -> None:
        loss, _ = compute_loss(self.model, self.batch)
        if manager is not None:
            manager.wait_snapshot()
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model)

    def state(self) -> dict:
        """What the Trainer hands to a save (buffers copied, the rest by reference)."""
        model = {k: v.clone() if k in self.buffers else v for k, v in self.model.state_dict().items()}
        return {
            "model": model,
            "ema": {"weights": self.ema.ema.state_dict(), "updates": self.ema.updates},
            "optimizer": self.opt.state_dict(),
            "train_state": {"epoch": 3, "step_in_epoch": 17, "global_step": 1234, "history": []},
            "rng": rng_state(),
        }


def training_state() -> dict:
    trainer = MiniTrainer()
    for _ in range(2):
        trainer.step()
    return trainer.state()


def bench_stall(root: Path, repeats: int) -> dict:
    """Training-thread time blocked by an async save (the save() call plus any wait for the copy
    before backward), and the extra wall time of a 6-step window holding one save (which also counts
    the CPU the background commit takes from training on this 2-core machine)."""
    trainer = MiniTrainer(imgsz=128, batch=8)
    for _ in range(2):
        trainer.step()
    blocked, window_with, window_without = [], [], []
    for i in range(repeats):
        manager = CheckpointManager(root / f"stall-{i}", keep_last=100, async_save=True)
        start = time.perf_counter()
        for _ in range(6):
            trainer.step()
        window_without.append(time.perf_counter() - start)
        os.sync()
        start = time.perf_counter()
        t0 = time.perf_counter()
        manager.save(trainer.state(), {"global_step": i})
        save_call = time.perf_counter() - t0
        loss, _ = compute_loss(trainer.model, trainer.batch)
        t1 = time.perf_counter()
        manager.wait_snapshot()
        blocked.append(save_call + time.perf_counter() - t1)
        loss.backward()
        trainer.opt.step()
        trainer.opt.zero_grad(set_to_none=True)
        trainer.ema.update(trainer.model)
        for _ in range(5):
            trainer.step()
        manager.wait()  # counted: if the commit outlives the window, its rest is stall too
        window_with.append(time.perf_counter() - start)
        assert all(r.error is None for r in manager.poll())
        shutil.rmtree(root / f"stall-{i}")
    return {"blocked": blocked, "window_with": window_with, "window_without": window_without}


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
    rows: dict[str, list[float]] = {k: [] for k in ("torch_save", "commit", "raw_write", "load_verify", "torch_load")}
    nbytes = 0
    for i in range(repeats):
        # Baseline 1: what ultralytics does each epoch, a synchronous torch.save (no fsync).
        pt = root / f"baseline-{i}.pt"
        os.sync()  # every timed write starts from a clean page cache
        rows["torch_save"].append(timed(lambda pt=pt: torch.save(state, pt)))
        rows["torch_load"].append(timed(lambda pt=pt: torch.load(pt, weights_only=False)))

        # Ours, the commit alone (encode + hash + write + fsync + rename + fsync dir).
        os.sync()
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

        os.sync()
        rows["raw_write"].append(timed(raw_write))
        rows["load_verify"].append(timed(lambda i=i: load_checkpoint(root / f"sync-{i}")))
        for p in (pt, raw):
            p.unlink()
        shutil.rmtree(root / f"sync-{i}")
    rows |= bench_stall(root, repeats)
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {
        "bytes": nbytes,
        "median_s": med,
        "blocked_vs_torch_save": med["blocked"] / med["torch_save"],
        "extra_window_time_vs_torch_save": (med["window_with"] - med["window_without"]) / med["torch_save"],
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
