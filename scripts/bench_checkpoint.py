"""Checkpoint cost on the real state of a YOLOv5s run (model + EMA + AdamW state + counters + RNG).

Measured in one process, on one disk, against baselines taken in the same run:
- stall: how long the training thread is blocked by an async save, vs a plain synchronous torch.save;
- commit throughput: bytes committed / wall time (encode + checksum + write + fsync + rename + dir fsync)
  vs a raw write + fsync of the same number of bytes on the same disk, each commit next to its own raw
  write (interleaved), medians; once for the commit alone (`format.write_checkpoint`) and once for a
  save (`CheckpointManager` also computes the tensor digests of meta.json first);
- both for every checksum the format reads: XXH3-128 (what new checkpoints use) and SHA-256 (what
  format version 1 used), so one run gives the before/after and the share of the tensor digests;
- load + verify: full verification (checksums, header) and load, vs torch.load of the torch.save file
  (weights_only=False, which the numpy RNG state needs; no verification at all).

Usage: python scripts/bench_checkpoint.py [--repeats 5] [--dir DIR] [--json OUT] [--no-stall]
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
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from ultralytics.utils.torch_utils import ModelEMA

from yolo_resume.checkpoint import format as fmt
from yolo_resume.checkpoint.format import load_checkpoint, tensor_digests, write_checkpoint
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


@contextmanager
def writing_with(checksum: str) -> Iterator[None]:
    """New checkpoints use `format.CHECKSUM`; swapping it lets one run time every algorithm the format
    reads (a manifest names its algorithm, so each checkpoint written here verifies and loads)."""
    default = fmt.CHECKSUM
    fmt.CHECKSUM = fmt.CHECKSUMS[checksum]
    try:
        yield
    finally:
        fmt.CHECKSUM = default


def raw_write_time(path: Path, nbytes: int) -> float:
    """The disk itself: write and fsync `nbytes` random bytes to a new file."""
    blob = os.urandom(nbytes)

    def write() -> None:
        with open(path, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())

    os.sync()  # every timed write starts from a clean page cache
    seconds = timed(write)
    path.unlink()
    return seconds


def bench_commits(root: Path, state: dict, repeats: int, rows: dict[str, list[float]]) -> int:
    """Per checksum: the commit alone, a save (tensor digests + commit), the digests alone, load + verify,
    and a raw write + fsync of the same bytes beside each timed write. Returns the bytes per checkpoint."""
    nbytes = 0
    for i in range(repeats):
        for name in fmt.CHECKSUMS:
            with writing_with(name):
                os.sync()
                ckpt = root / f"commit-{name}-{i}"
                rows[f"commit_{name}"].append(timed(lambda c=ckpt: write_checkpoint(root, c.name, state, {})))
                nbytes = folder_bytes(ckpt)
                rows[f"raw_for_commit_{name}"].append(raw_write_time(root / "raw.bin", nbytes))
                rows[f"load_verify_{name}"].append(timed(lambda c=ckpt: load_checkpoint(c)))
                shutil.rmtree(ckpt)

                def save(name=name, i=i) -> None:  # what CheckpointManager._commit does, minus retention
                    meta = {"global_step": i, "digests": tensor_digests(state, algorithm=name)}
                    write_checkpoint(root, f"save-{name}-{i}", state, meta)

                os.sync()
                rows[f"save_{name}"].append(timed(save))
                saved = root / f"save-{name}-{i}"
                rows[f"raw_for_save_{name}"].append(raw_write_time(root / "raw.bin", folder_bytes(saved)))
                shutil.rmtree(saved)
                rows[f"digests_{name}"].append(timed(lambda n=name: tensor_digests(state, algorithm=n)))
    return nbytes


def by_checksum(med: dict[str, float]) -> dict[str, dict[str, float]]:
    return {
        name: {
            "commit_vs_raw": med[f"raw_for_commit_{name}"] / med[f"commit_{name}"],
            "save_vs_raw": med[f"raw_for_save_{name}"] / med[f"save_{name}"],
            "digests_share_of_save": med[f"digests_{name}"] / med[f"save_{name}"],
            "load_verify_vs_torch_load": med[f"load_verify_{name}"] / med["torch_load"],
        }
        for name in fmt.CHECKSUMS
    }


def bench(root: Path, repeats: int, stall: bool = True) -> dict:
    state = training_state()
    rows: dict[str, list[float]] = defaultdict(list)
    for i in range(repeats):
        # Baseline: what ultralytics does each epoch, a synchronous torch.save (no fsync).
        pt = root / f"baseline-{i}.pt"
        os.sync()
        rows["torch_save"].append(timed(lambda pt=pt: torch.save(state, pt)))
        rows["torch_load"].append(timed(lambda pt=pt: torch.load(pt, weights_only=False)))
        pt.unlink()
    nbytes = bench_commits(root, state, repeats, rows)
    if stall:
        rows |= bench_stall(root, repeats)
    med = {k: statistics.median(v) for k, v in rows.items()}
    default = fmt.CHECKSUM.name
    # The names bench_all.py reads, for the checksum new checkpoints use.
    med["commit"], med["raw_write"] = med[f"commit_{default}"], med[f"raw_for_commit_{default}"]
    med["load_verify"] = med[f"load_verify_{default}"]
    result = {"bytes": nbytes, "median_s": med}
    if stall:
        result["blocked_vs_torch_save"] = med["blocked"] / med["torch_save"]
        result["extra_window_time_vs_torch_save"] = (med["window_with"] - med["window_without"]) / med["torch_save"]
    checksums = by_checksum(med)
    return result | {
        "checksum": default,
        "write_throughput_MBps": nbytes / med[f"commit_{default}"] / 1e6,
        "raw_throughput_MBps": nbytes / med[f"raw_for_commit_{default}"] / 1e6,
        "throughput_vs_raw": checksums[default]["commit_vs_raw"],
        "save_throughput_vs_raw": checksums[default]["save_vs_raw"],
        "load_verify_vs_torch_load": checksums[default]["load_verify_vs_torch_load"],
        "by_checksum": checksums,
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
    parser.add_argument("--no-stall", action="store_true", help="Skip the async-save stall measurement.")
    args = parser.parse_args()
    base = args.dir or Path("runs")
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix="bench-ckpt-") as tmp:
        result = bench(Path(tmp), args.repeats, stall=not args.no_stall)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
