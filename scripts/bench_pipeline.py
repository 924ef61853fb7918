"""Training data pipeline speed: our `DetectionDataset` vs ultralytics' `YOLODataset`, same files, same settings.

Data: N JPEGs of 640x480 (quality 90) cut from the two photos ultralytics ships (bus.jpg, zidane.jpg):
random crops, mirrored, colour-jittered and noised, so every file is different and decodes like a
photo; 2-8 boxes each, in the YOLO layout (images/train, labels/train) that both tools read. N is
large enough that no decoded-image cache can hold the split (quick: 5,000 images, ~4.5 GB decoded at
640; --full: 30,000 as in issue 13). The data is written to a temporary folder and deleted after
(with --data DIR: written there once and kept, for repeated runs; delete it yourself).

Augmentation (both): mosaic 1.0 (never closed), scale 0.5, translate 0.1, fliplr 0.5, hsv 0.015/0.7/0.4,
nothing else (no rotation, shear, perspective, flipud, mixup, cutmix, copy-paste; albumentations is
not installed, so ultralytics' optional blur/CLAHE pass is off); ultralytics `cache=False`.

Figures, per imgsz (640 and 320):
- items/s through a torch DataLoader with 2 workers, batch 16 (ours: `EpochBatchSampler` +
  `collate_fn`, the trainer's loader; ultralytics: shuffle + `YOLODataset.collate_fn`). Each timed run
  builds a fresh loader (fresh workers, empty caches) on another epoch, skips the first WARMUP batches
  (worker start-up) and times the next ones. Runs alternate ours / ultralytics / ultralytics / ours ...
  (interleaved); the figure is the median over repeats, and the ratio ours / ultralytics;
- CPU ms per item of the two loader workers during the timed batches (from /proc): the figure least
  moved by other work on the machine;
- CPU ms per item and JPEG decodes per item in one process (no workers): process CPU time over a run
  of items in the loader's order, and the decode calls counted by wrapping each tool's image reader.
Our variants (--variants): `ours` (the default, `augment.mosaic_window: 128`: mosaic partners from the
item's block of 128 positions of the epoch order, the size of ultralytics' buffer at batch 16, decoded
once into a cache the workers share), `ours-uniform` (`augment.mosaic_window: 0`: partners from the
whole split, ~4 decodes per item), `ours-window16` (`augment.mosaic_window: 16`).
The machine may be shared: ratios of interleaved runs are the figures to read, not absolute rates.

Usage: python scripts/bench_pipeline.py [--full] [--images N] [--repeats R] [--sizes 640,320]
       [--variants ours,ours-uniform,ours-window16] [--data DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("YOLO_OFFLINE", "1")

sys.path.insert(0, str(REPO / "scripts"))
from bench_train import AUGMENT  # noqa: E402  (ultralytics' default augmentation, the same in every bench)

NAMES = ["a", "b", "c"]
WIDTH, HEIGHT = 640, 480
BATCH, WORKERS = 16, 2
WARMUP = 4  # batches skipped per timed run: worker start-up and first fills


def ultralytics_asset(name: str) -> Path:
    import ultralytics

    return Path(ultralytics.__file__).parent / "assets" / name


def write_dataset(root: Path, count: int, seed: int = 0) -> Path:
    """`count` distinct photo-like 640x480 JPEGs with YOLO labels; returns the image folder."""
    rng = np.random.default_rng(seed)
    photos = [cv2.imread(str(ultralytics_asset(n))) for n in ("bus.jpg", "zidane.jpg")]
    images, labels = root / "images" / "train", root / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    for i in range(count):
        img = random_view(photos[i % 2], rng)
        cv2.imwrite(str(images / f"{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        (labels / f"{i:06d}.txt").write_text(random_labels(rng))
    return images


def random_view(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random crop of 45-100% of the photo, resized to 640x480, maybe mirrored, gain-jittered, noised."""
    h, w = photo.shape[:2]
    frac = rng.uniform(0.45, 1.0)
    cw, ch = int(min(w, h * WIDTH / HEIGHT) * frac), int(min(h, w * HEIGHT / WIDTH) * frac)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = cv2.resize(photo[y : y + ch, x : x + cw], (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    gains = rng.uniform(0.8, 1.2, 3).astype(np.float32)
    noise = rng.normal(0, 4, img.shape).astype(np.float32)
    return np.clip(img.astype(np.float32) * gains + noise, 0, 255).astype(np.uint8)


def random_labels(rng: np.random.Generator) -> str:
    rows = []
    for _ in range(int(rng.integers(2, 9))):
        bw, bh = rng.uniform(0.05, 0.4, 2)
        cx, cy = rng.uniform(bw / 2, 1 - bw / 2), rng.uniform(bh / 2, 1 - bh / 2)
        rows.append(f"{int(rng.integers(0, len(NAMES)))} {cx:.6f} {cy:.6f} {bw:.6f} {bh:.6f}")
    return "\n".join(rows) + "\n"


def warm_page_cache(images: Path) -> None:
    """Read every file once, so the timed runs find them in the page cache (this machine's host can drop it
    between runs on kept --data: both tools then wait on the disk, and the ratio measures that)."""
    t0 = time.perf_counter()
    for path in images.iterdir():
        with open(path, "rb") as f:
            while f.read(1 << 20):
                pass
    print(f"read {images} into the page cache in {time.perf_counter() - t0:.1f} s", flush=True)


# -- the two pipelines -----------------------------------------------------------------------------------
VARIANTS = {"ours": 128, "ours-uniform": 0, "ours-window16": 16}  # name: augment.mosaic_window (ours: the default)


class Ours:
    """Our dataset in one of VARIANTS (its `augment.mosaic_window`)."""

    def __init__(self, root: Path, name: str = "ours") -> None:
        from yolo_resume.data.yolo import load_yolo_split

        self.split = load_yolo_split(str(root), "", "train", NAMES)
        self.name = name
        self.window = VARIANTS[name]

    def dataset(self, imgsz: int):
        from yolo_resume.config import AugmentConfig
        from yolo_resume.data import DetectionDataset

        augment = AugmentConfig(**AUGMENT, mosaic_window=self.window)
        return DetectionDataset(self.split, imgsz, augment=augment, seed=0, epochs=1000)

    def loader(self, imgsz: int, epoch: int):
        from torch.utils.data import DataLoader

        from yolo_resume.data import EpochBatchSampler, collate_fn

        ds = self.dataset(imgsz)
        sampler = EpochBatchSampler(len(ds), BATCH, seed=0)
        sampler.set_epoch(epoch)
        return DataLoader(ds, batch_sampler=sampler, num_workers=WORKERS, collate_fn=collate_fn)

    def items(self, imgsz: int, epoch: int, count: int):
        from yolo_resume.data import epoch_permutation

        ds = self.dataset(imgsz)
        order = epoch_permutation(len(ds), 0, epoch)[:count]

        def run():
            self.dataset(imgsz)  # sets the partner rule again: another tool may have run in between
            return [ds[(epoch, int(i))] for i in order]

        return run

    def count_decodes(self):
        from yolo_resume.data import augment

        return wrap_counter(augment, "decode")


class Ultralytics:
    name = "ultralytics"

    def __init__(self, root: Path) -> None:
        self.images = root / "images" / "train"

    def dataset(self, imgsz: int):
        from ultralytics.cfg import get_cfg
        from ultralytics.data import build_yolo_dataset

        off = {k: 0.0 for k in ("degrees", "shear", "perspective", "flipud", "mixup", "cutmix", "copy_paste")}
        extra = {k: v for k, v in AUGMENT.items() if k != "close_mosaic"}
        cfg = get_cfg(overrides={"imgsz": imgsz, "cache": False, "rect": False, **extra, **off})
        data = {"names": dict(enumerate(NAMES)), "nc": len(NAMES), "channels": 3}
        return build_yolo_dataset(cfg, str(self.images), BATCH, data, mode="train")

    def loader(self, imgsz: int, epoch: int):
        import torch
        from torch.utils.data import DataLoader

        ds = self.dataset(imgsz)
        gen = torch.Generator().manual_seed(epoch)
        return DataLoader(
            ds, batch_size=BATCH, shuffle=True, num_workers=WORKERS, collate_fn=ds.collate_fn, generator=gen
        )

    def items(self, imgsz: int, epoch: int, count: int):
        ds = self.dataset(imgsz)
        order = np.random.default_rng(epoch).permutation(len(ds))[:count]
        return lambda: [ds[int(i)] for i in order]

    def count_decodes(self):
        from ultralytics.data import base

        return wrap_counter(base, "imread")


def wrap_counter(module, attr: str):
    """Replace module.attr by a counting wrapper; returns (counter list, undo)."""
    original, calls = getattr(module, attr), [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(module, attr, counted)
    return calls, lambda: setattr(module, attr, original)


# -- measurements ----------------------------------------------------------------------------------------
def loader_rate(tool, imgsz: int, epoch: int, batches: int) -> tuple[float, float]:
    """(items/s, CPU ms per item of the 2 workers) over `batches` batches after WARMUP, through a fresh
    2-worker loader. The worker CPU time is the figure least moved by other work on the machine."""
    it = iter(tool.loader(imgsz, epoch))
    for _ in range(WARMUP):
        next(it)
    pids = [w.pid for w in it._workers]  # torch's multiprocessing iterator keeps its worker processes here
    cpu0 = sum(process_cpu_s(p) for p in pids)
    start, items = time.perf_counter(), 0
    for _ in range(batches):
        items += len(next(it)["img"])
    rate = items / (time.perf_counter() - start)
    cpu_ms = 1000 * (sum(process_cpu_s(p) for p in pids) - cpu0) / items
    del it  # shuts the workers down
    return rate, cpu_ms


def process_cpu_s(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_item(tool, imgsz: int, epoch: int, count: int) -> tuple[float, float]:
    """(CPU ms per item, decodes per item) in this process; the first items (cold cache) included."""
    import torch

    torch.set_num_threads(1)
    run = tool.items(imgsz, epoch, count)
    calls, undo = tool.count_decodes()
    try:
        start = time.process_time()
        run()
        cpu = time.process_time() - start
    finally:
        undo()
    return 1000 * cpu / count, calls[0] / count


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="30,000 images, 5 repeats, 80 batches per run")
    ap.add_argument("--images", type=int, help="number of generated images (quick 5000, full 30000)")
    ap.add_argument("--repeats", type=int, help="timed runs per tool and size (quick 3, full 5)")
    ap.add_argument("--batches", type=int, help="timed batches per run (quick 40, full 80)")
    ap.add_argument("--sizes", default="640,320")
    ap.add_argument("--cpu-items", type=int, default=400, help="items of the one-process CPU figure")
    ap.add_argument("--dir", help="where to write the data (default a temporary folder, deleted after)")
    ap.add_argument(
        "--variants", default="ours", help=f"our variants to run, comma-separated, of: {', '.join(VARIANTS)}"
    )
    ap.add_argument("--data", help="reuse (or write and keep) the generated data here: repeated runs while developing")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    count = args.images or (30000 if args.full else 5000)
    repeats = args.repeats or (5 if args.full else 3)
    batches = args.batches or (80 if args.full else 40)
    sizes = [int(s) for s in args.sizes.split(",")]

    scratch = Path(tempfile.mkdtemp(prefix="bench_pipeline_", dir=args.dir))
    os.environ["YOLO_CONFIG_DIR"] = str(scratch / "ultralytics-config")
    try:
        data = Path(args.data) if args.data else scratch / "data"
        if not (data / "images").is_dir():
            t0 = time.perf_counter()
            write_dataset(data, count)
            print(f"wrote {count} JPEGs {WIDTH}x{HEIGHT} in {time.perf_counter() - t0:.0f} s", flush=True)
        count = len(list((data / "images" / "train").iterdir()))
        warm_page_cache(data / "images" / "train")
        tools = [*(Ours(data, v) for v in args.variants.split(",")), Ultralytics(data)]
        results = {"images": count, "repeats": repeats, "batches": batches, "batch": BATCH, "workers": WORKERS}
        for imgsz in sizes:
            results[str(imgsz)] = measure_size(tools, imgsz, repeats, batches, args.cpu_items)
        print(json.dumps(results, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def measure_size(tools, imgsz: int, repeats: int, batches: int, cpu_items: int) -> dict:
    rates: dict[str, list[float]] = {t.name: [] for t in tools}
    worker_ms: dict[str, list[float]] = {t.name: [] for t in tools}
    for r in range(repeats):
        for tool in tools if r % 2 == 0 else tools[::-1]:  # ABBA: drift hits all alike
            rate, cpu_ms = loader_rate(tool, imgsz, epoch=r, batches=batches)
            rates[tool.name].append(rate)
            worker_ms[tool.name].append(cpu_ms)
            print(
                f"imgsz {imgsz} run {r} {tool.name}: {rate:.1f} items/s, workers {cpu_ms:.2f} CPU ms/item", flush=True
            )
    cpu = {t.name: cpu_per_item(t, imgsz, epoch=100, count=cpu_items) for t in tools}
    med = {name: statistics.median(v) for name, v in rates.items()}
    med_ms = {name: statistics.median(v) for name, v in worker_ms.items()}
    ours = [t.name for t in tools if t.name != "ultralytics"]
    base = rates["ultralytics"]
    out = {
        "items_per_s": {name: round(v, 1) for name, v in med.items()},
        "runs": {name: [round(x, 1) for x in v] for name, v in rates.items()},
        # the ratio of the medians, and the median of the ratios of runs made next to each other
        "ratio_items_per_s": {n: round(med[n] / med["ultralytics"], 3) for n in ours},
        "median_paired_ratio": {
            n: round(statistics.median(a / b for a, b in zip(rates[n], base, strict=True)), 3) for n in ours
        },
        "loader_worker_cpu_ms_per_item": {name: round(v, 2) for name, v in med_ms.items()},
        "ratio_loader_worker_cpu_ms": {n: round(med_ms[n] / med_ms["ultralytics"], 3) for n in ours},
        "cpu_ms_per_item": {name: round(c[0], 2) for name, c in cpu.items()},
        "decodes_per_item": {name: round(c[1], 2) for name, c in cpu.items()},
        "ratio_cpu_ms": {n: round(cpu[n][0] / cpu["ultralytics"][0], 3) for n in ours},
    }
    print(f"imgsz {imgsz}: {json.dumps(out)}", flush=True)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
