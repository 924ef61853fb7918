"""Time of the up-front dataset check vs ultralytics' own label check, first start and cached, in one run.

    python scripts/bench_data_check.py --images 10000 [--images 100000] [--repeats 3] [--size 640x480]

For each size: a YOLO split of N JPEG photos (the ultralytics bus/zidane samples, resized to --size and
re-encoded, so each file is a real, distinct-bytes JPEG) with 1-3 boxes each is written to a temporary
folder; then, interleaved, `repeats` times:
- ours, first: `load_split` with its index cache removed (every image verified, every label parsed);
- ours, cached: `load_split` again (the index cache hit, stat only);
- ultralytics, first: `YOLODataset(...)` with `labels/train.cache` removed (`cache_labels`: verify_image_label
  in its thread pool);
- ultralytics, cached: `YOLODataset(...)` again (reads `labels/train.cache`).
Medians and the ratios ours / ultralytics are printed as a markdown table. The data is deleted after.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("YOLO_OFFLINE", "1")


def write_dataset(root: Path, n: int, size: tuple[int, int]) -> None:
    import ultralytics

    assets = Path(ultralytics.__file__).parent / "assets"
    photos = [cv2.resize(cv2.imread(str(assets / name)), size) for name in ("bus.jpg", "zidane.jpg")]
    images, labels = root / "images" / "train", root / "labels" / "train"
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    rng = np.random.default_rng(0)
    encoded = []
    for i in range(16):  # 16 distinct JPEGs (slightly different pixels), cycled: real files without 10k encodes
        img = photos[i % 2].copy()
        img[i, :, :] = rng.integers(0, 255, (img.shape[1], 3), dtype=np.uint8)
        encoded.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    for i in range(n):
        (images / f"{i:07d}.jpg").write_bytes(encoded[i % len(encoded)])
        rows = [
            f"{rng.integers(0, 3)} {rng.uniform(0.2, 0.8):.6f} {rng.uniform(0.2, 0.8):.6f} "
            f"{rng.uniform(0.05, 0.3):.6f} {rng.uniform(0.05, 0.3):.6f}"
            for _ in range(int(rng.integers(1, 4)))
        ]
        (labels / f"{i:07d}.txt").write_text("\n".join(rows) + "\n")


def ours(root: Path, first: bool) -> float:
    from yolo_resume.config import DataConfig
    from yolo_resume.data import load_split

    if first:
        shutil.rmtree(root / ".yolo-resume", ignore_errors=True)
    start = time.perf_counter()
    split = load_split(DataConfig(format="yolo", root=str(root), names=["a", "b", "c"]), "train")
    took = time.perf_counter() - start
    assert split.report.cached == (0 if first else len(split.records))
    return took


def theirs(root: Path, first: bool) -> float:
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.utils import LOGGER

    if first:
        (root / "labels" / "train.cache").unlink(missing_ok=True)
    LOGGER.disabled = True
    start = time.perf_counter()
    YOLODataset(
        img_path=str(root / "images" / "train"),
        imgsz=640,
        augment=False,
        data={"names": {0: "a", 1: "b", 2: "c"}, "nc": 3, "channels": 3},
        task="detect",
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, action="append", help="split size (repeatable); default 10000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="640x480", help="image size WxH")
    args = parser.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    columns = ["images", "ours first (s)", "ultralytics first (s)", "ratio"]
    columns += ["ours cached (s)", "ultralytics cached (s)", "ratio"]
    print("| " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|")
    for n in args.images or [10000]:
        root = Path(tempfile.mkdtemp(prefix="bench-data-check-"))
        try:
            write_dataset(root, n, size)
            times: dict[str, list[float]] = {k: [] for k in ("of", "oc", "tf", "tc")}
            for _ in range(args.repeats):  # interleaved, so drift of the machine hits both alike
                times["of"].append(ours(root, first=True))
                times["tf"].append(theirs(root, first=True))
                times["oc"].append(ours(root, first=False))
                times["tc"].append(theirs(root, first=False))
            m = {k: statistics.median(v) for k, v in times.items()}
            print(
                f"| {n} | {m['of']:.2f} | {m['tf']:.2f} | {m['of'] / m['tf']:.2f}x | {m['oc']:.2f} | {m['tc']:.2f} | "
                f"{m['oc'] / m['tc']:.2f}x |",
                flush=True,
            )
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
