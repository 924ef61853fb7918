"""Data start-up and loader memory at scale, ours vs ultralytics in one run (interleaved, medians).

    python scripts/bench_data.py --quick            # a few minutes: 10k / 30k images, 30k-image COCO JSON
    python scripts/bench_data.py                    # 10k / 50k / 120k images, 120k / 860k COCO JSON
    python scripts/bench_data.py --only cached --only coco --images 50000

Generated data (tiny distinct JPEGs: start-up is about file counts, not pixels; YOLO label files with 1-12
boxes; a COCO JSON over the same images) is written under a temporary folder and deleted after.

Sections (`--only NAME`, repeatable; each prints its own markdown table):
- `build`: index first build (our index caches removed / ultralytics' `labels/*.cache` removed: every image
  verified, every label parsed), ours `load_split` vs ultralytics `YOLODataset`;
- `cached`: second start (everything cached): ours vs `YOLODataset` reading `labels.cache`;
- `coco`: a COCO JSON, ours `load_split` (JSON parsed, images' check cached) and ours cached (split index hit)
  vs pycocotools `COCO(file)`; peak RSS growth of each in a fresh process;
- `memory`: the data-loader tree's PSS (main + workers) after `--batches` batches of `--workers` workers,
  ours `DetectionDataset` (flat records) vs ultralytics' `YOLODataset` (augment on, same imgsz and batch);
- `resume`: the index path of a resume (load both splits + the dataset fingerprint + the manifest) at 1k
  images vs at the largest size;
- `resume-e2e`: `yolo-resume train --resume` end to end (process spawn to the first resumed row in the
  run's steps.csv: bench_resume.py's timing) of a tiny yolov5n at imgsz 32, at 1k train images vs at the
  largest size (`--resume`), the same model, steps and checkpoint; the ratio is what issue 13 bounds (1.1x);
- `growth`: per size: first build, cached start, RSS after the cached start; the fitted exponent b of
  time ~ a * n^b (1.0 = linear).

Every figure is measured in a fresh subprocess (nothing warm in the parent: imports, allocator, page cache
of our own code) except that the files' page cache is warm for both sides alike. The machine may be shared:
the ratios of interleaved runs are what to read, absolute seconds drift.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))  # bench_resume's spawn and steps.csv reader
os.environ.setdefault("YOLO_OFFLINE", "1")

NAMES = [f"c{i}" for i in range(80)]
IMAGE_WH = (64, 48)


# ----------------------------------------------------------------------------- generated data


def write_images(folder: Path, n: int, distinct: int = 64) -> list[str]:
    """`n` tiny JPEGs (64 distinct ones cycled: real decodable files without n encodes); their names."""
    import cv2

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    w, h = IMAGE_WH
    encoded = [
        cv2.imencode(".jpg", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))[1].tobytes() for _ in range(distinct)
    ]
    names = [f"{i:07d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        (folder / name).write_bytes(encoded[i % distinct])
    return names


def write_yolo(root: Path, n: int, split: str = "train") -> Path:
    """images/<split> + labels/<split> (1-12 boxes per image, normalized rows); the root."""
    names = write_images(root / "images" / split, n)
    labels = root / "labels" / split
    labels.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for name in names:
        k = int(rng.integers(1, 13))
        rows = np.column_stack(
            [rng.integers(0, len(NAMES), k), rng.uniform(0.2, 0.8, (k, 2)), rng.uniform(0.05, 0.3, (k, 2))]
        )
        (labels / (name[:-4] + ".txt")).write_text(
            "".join(f"{int(r[0])} {r[1]:.6f} {r[2]:.6f} {r[3]:.6f} {r[4]:.6f}\n" for r in rows)
        )
    return root


def write_coco(root: Path, n: int, annotations: int) -> Path:
    """A COCO instances JSON over `n` images in `<root>/images/train` (written if missing); its path."""
    folder = root / "images" / "train"
    names = sorted(os.listdir(folder)) if folder.is_dir() else write_images(folder, n)
    names = names[:n]
    rng = np.random.default_rng(2)
    w, h = IMAGE_WH
    owner = np.sort(rng.integers(0, n, annotations))
    xy = rng.uniform(0, 0.7, (annotations, 2)) * (w, h)
    wh = rng.uniform(0.05, 0.3, (annotations, 2)) * (w, h)
    cats = rng.integers(1, len(NAMES) + 1, annotations)
    data = {
        "images": [{"id": i + 1, "file_name": name, "width": w, "height": h} for i, name in enumerate(names)],
        "annotations": [
            {
                "id": k + 1,
                "image_id": int(owner[k]) + 1,
                "category_id": int(cats[k]),
                "bbox": [
                    round(float(xy[k, 0]), 2),
                    round(float(xy[k, 1]), 2),
                    round(float(wh[k, 0]), 2),
                    round(float(wh[k, 1]), 2),
                ],
                "area": round(float(wh[k, 0] * wh[k, 1]), 2),
                "iscrowd": 0,
            }
            for k in range(annotations)
        ],
        "categories": [{"id": i + 1, "name": name} for i, name in enumerate(NAMES)],
    }
    path = root / "annotations" / "instances_train.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, separators=(",", ":")))
    return path


# ----------------------------------------------------------------------------- one measurement, in a child


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


def _ours_yolo(root: Path, first: bool, strict: bool = True) -> dict:
    from yolo_resume.config import DataConfig
    from yolo_resume.data import load_split

    if first:
        shutil.rmtree(root / ".yolo-resume", ignore_errors=True)
    rss = _rss_mb()
    start = time.perf_counter()
    split = load_split(DataConfig(format="yolo", root=str(root), names=NAMES), "train")
    took = time.perf_counter() - start
    assert not strict or split.report.cached == (0 if first else len(split.records)), split.report.row()
    return {"s": took, "rss_mb": _rss_mb() - rss}


def _theirs_yolo(root: Path, first: bool) -> dict:
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.utils import LOGGER

    if first:
        (root / "labels" / "train.cache").unlink(missing_ok=True)
    LOGGER.disabled = True
    rss = _rss_mb()
    start = time.perf_counter()
    YOLODataset(img_path=str(root / "images" / "train"), imgsz=640, augment=False, data=_ul_data(), task="detect")
    return {"s": time.perf_counter() - start, "rss_mb": _rss_mb() - rss}


def _ul_data() -> dict:
    return {"names": dict(enumerate(NAMES)), "nc": len(NAMES), "channels": 3}


def _coco_cfg(root: Path):
    from yolo_resume.config import DataConfig

    return DataConfig(
        format="coco", root=str(root), train="annotations/instances_train.json", train_images="images/train"
    )


def _ours_coco(root: Path, cached: bool, build: bool = False) -> dict:
    from yolo_resume.data import load_split

    if not cached:  # the JSON is parsed; the per-image check entries stay cached (a JSON edit, not new images)
        for index in (root / ".yolo-resume").glob("split-train-*.npz"):
            index.unlink()
    rss, start = _rss_mb(), time.perf_counter()
    split = load_split(_coco_cfg(root), "train")
    took = time.perf_counter() - start
    assert build or split.report.cached == len(split.records)
    return {
        "s": took,
        "rss_mb": _rss_mb() - rss,
        "peak_mb": _peak_mb() - rss,
        "records_mb": split.records.nbytes() / 1e6,
    }


def _pycocotools(root: Path) -> dict:
    import contextlib
    import io

    from pycocotools.coco import COCO

    rss, start = _rss_mb(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(root / "annotations" / "instances_train.json"))
    took = time.perf_counter() - start
    assert len(coco.imgs)
    return {"s": took, "rss_mb": _rss_mb() - rss, "peak_mb": _peak_mb() - rss}


def _tree_memory(pid: int) -> dict:
    """PSS of the process and its children (the loader's workers), and each worker's USS, in MB."""
    children = []
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        children = [int(c) for c in f.read().split()]

    def rollup(p: int) -> dict:
        out = {}
        with open(f"/proc/{p}/smaps_rollup") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("Pss", "Private_Clean", "Private_Dirty"):
                    out[key] = int(rest.split()[0]) / 1e3
        return out

    main = rollup(pid)
    workers = [rollup(c) for c in children]
    pss = main["Pss"] + sum(w["Pss"] for w in workers)
    uss = [w["Private_Clean"] + w["Private_Dirty"] for w in workers]
    return {"pss_mb": pss, "worker_uss_mb": statistics.median(uss) if uss else 0.0, "workers": len(workers)}


def _loader_memory(root: Path, side: str, workers: int, batch: int, batches: int, imgsz: int) -> dict:
    import torch
    from torch.utils.data import DataLoader

    if side.startswith("ours"):
        from yolo_resume.config import AugmentConfig, DataConfig
        from yolo_resume.data import DetectionDataset, collate_fn, load_split
        from yolo_resume.data import dataset as dataset_mod

        if side == "ours-nocache":  # the decoded-image cache off: what the records and per-item buffers cost
            dataset_mod.DECODED_CACHE_BYTES = 0
        split = load_split(DataConfig(format="yolo", root=str(root), names=NAMES), "train")
        if side == "ours-list":  # the records as one ImageRecord per image (before issue 13), to compare
            split.records = list(split.records)

        dataset, collate = DetectionDataset(split, imgsz, augment=AugmentConfig(), seed=0, epochs=10), collate_fn
    else:
        from ultralytics.cfg import get_cfg
        from ultralytics.data.dataset import YOLODataset
        from ultralytics.utils import LOGGER

        LOGGER.disabled = True
        hyp = get_cfg()
        dataset = YOLODataset(
            img_path=str(root / "images" / "train"), imgsz=imgsz, augment=True, hyp=hyp, data=_ul_data(), task="detect"
        )
        collate = YOLODataset.collate_fn
    torch.manual_seed(0)
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, collate_fn=collate)
    start, seen, marks = time.perf_counter(), 0, {}
    for seen, _ in enumerate(loader, 1):
        if seen in (batches // 2, batches):
            marks[seen] = _tree_memory(os.getpid())
        if seen >= batches:
            break
    took = time.perf_counter() - start
    half, end = marks[batches // 2], marks[batches]
    return {"s": took, **end, "pss_mb_half": half["pss_mb"]}


def _resume_index_path(root: Path) -> dict:
    """What a resume does with the data before its first step (trainer: `build_datasets`, the dataset
    fingerprint, `write_manifest`, which finds its file): both splits loaded from the index."""
    from yolo_resume.config import DataConfig
    from yolo_resume.data import check_dataset
    from yolo_resume.data.manifest import write_manifest
    from yolo_resume.data.records import dataset_fingerprint

    cfg = DataConfig(format="yolo", root=str(root), names=NAMES)
    start = time.perf_counter()
    train, val = check_dataset(cfg)
    write_manifest(root / "run", dataset_fingerprint(train, val, "stat"), train, val)
    return {"s": time.perf_counter() - start, "train": len(train.records), "val": len(val.records)}


CHILDREN: dict[str, Callable[..., dict]] = {
    "ours-first": lambda root: _ours_yolo(root, True),
    "ours-cached": lambda root: _ours_yolo(root, False),
    "ours-warm": lambda root: _ours_yolo(root, False, strict=False),
    "ul-first": lambda root: _theirs_yolo(root, True),
    "ul-cached": lambda root: _theirs_yolo(root, False),
    "ours-coco-json": lambda root: _ours_coco(root, False),
    "ours-coco-cached": lambda root: _ours_coco(root, True),
    "ours-coco-build": lambda root: _ours_coco(root, True, build=True),
    "pycocotools": _pycocotools,
    "resume": _resume_index_path,
}


def child(kind: str, root: Path, loader: list[int]) -> None:
    # Imports first, outside the timing, as a long-lived trainer has them.
    import torch  # noqa: F401
    import ultralytics.data.dataset  # noqa: F401

    import yolo_resume.data  # noqa: F401

    if kind.startswith("loader-"):
        result = _loader_memory(root, kind.removeprefix("loader-"), *loader)
    else:
        result = CHILDREN[kind](root)
    print("RESULT " + json.dumps(result))


def measure(kind: str, root: Path, loader: tuple[int, ...] = (4, 16, 200, 640)) -> dict:
    """One figure in a fresh interpreter (nothing warm but the files' page cache, for both sides alike)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), YOLO_OFFLINE="1")
    if kind.endswith("-mmap"):  # glibc: a fixed mmap threshold, so freed per-item buffers go back to the system
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
        kind = kind.removesuffix("-mmap")
    cmd = [sys.executable, __file__, "--child", kind, "--root", str(root), "--loader", *map(str, loader)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"{kind} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def interleaved(kinds: list[str], root: Path, repeats: int, **kw) -> dict[str, list[dict]]:
    """Each kind `repeats` times, in turn (drift of a shared machine hits every kind alike)."""
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    for _ in range(repeats):
        for kind in kinds:
            runs[kind].append(measure(kind, root, **kw))
    return runs


def med(runs: list[dict], key: str = "s") -> float:
    return statistics.median(r[key] for r in runs)


def fit_exponent(sizes: list[int], values: list[float]) -> float:
    """b of value ~ a * n^b, least squares in log-log (1.0 = linear in the number of images)."""
    x, y = np.log(sizes), np.log(values)
    return float(np.polyfit(x, y, 1)[0])


# ----------------------------------------------------------------------------- end-to-end resume

E2E_VAL = 100  # val images: validation is off, but a resume loads and fingerprints the val split too


def resume_e2e_config(work: Path, root: Path) -> Path:
    """A tiny run on the YOLO dataset at `root`: yolov5n at imgsz 32, batch 4, no validation, no workers
    (one step is ~0.1 s, so what the number of images adds to a resume is what shows)."""
    import yaml

    cfg = {
        "data": {"format": "yolo", "root": str(root), "names": NAMES},
        "model": {"cfg": "yolov5n.yaml", "imgsz": 32},
        "train": {"epochs": 1, "batch": 4, "nbs": 4, "workers": 0, "device": "cpu", "seed": 0},
        "augment": {"mosaic": 0.0},
        "eval": {"every_epochs": 0},
        "ckpt": {"every_epochs": 1, "every_steps": 0, "keep_last": 3},
    }
    path = work / "resume-e2e.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def resume_e2e_setup(work: Path, n: int) -> Path:
    """Dataset of `n` train images, then a run stopped by SIGTERM after its 3rd step (it saves and exits 75):
    the run folder a `--resume` continues (its dataset index, manifest and checkpoint all in place)."""
    import signal

    from bench_resume import data_rows, spawn

    root = write_yolo(work / "data", n)
    write_yolo(root, E2E_VAL, "val")
    run, env = work / "run", _e2e_env(work)
    proc = spawn(["--config", str(resume_e2e_config(work, root)), "--run-dir", str(run)], env, work / "setup.log")
    while len(data_rows(run / "steps.csv")) < 3:
        if proc.poll() is not None:
            raise RuntimeError(f"resume-e2e setup ({n} images) exited {proc.returncode}; see {work / 'setup.log'}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    if proc.wait(timeout=600) != 75:
        raise RuntimeError(f"resume-e2e setup exited {proc.returncode} after SIGTERM (expected 75)")
    return run


def _e2e_env(work: Path) -> dict:
    from bench_train import child_env

    return child_env(work)


def resume_e2e_once(run: Path, copy: Path) -> dict:
    """`train --resume` of a fresh copy of the stopped run (each try resumes the same checkpoint, and finds
    the manifest of its fingerprint in the run, as a real resume does): seconds from spawn to the first row
    after the checkpoint's step in steps.csv (polled every 5 ms), then the process is killed; and the CPU
    seconds (user + sys) the process used by then, which other load on a shared machine disturbs less."""
    import signal

    from bench_resume import data_rows, spawn

    shutil.copytree(run, copy)
    last = int(data_rows(copy / "steps.csv")[-1][0])
    env = _e2e_env(copy.parent)
    start = time.time()
    proc = spawn(["--resume", "--run-dir", str(copy)], env, copy.parent / "resume.log")
    try:
        while True:
            rows = [r for r in data_rows(copy / "steps.csv") if int(r[0]) > last]
            if rows:
                took = time.time() - start
                break
            if proc.poll() is not None:
                raise RuntimeError(f"resume of {copy} exited {proc.returncode}; see {copy.parent / 'resume.log'}")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # workers: 0, so the process is the whole tree
    _, _, usage = os.wait4(proc.pid, 0)
    proc.returncode = -signal.SIGKILL
    if int(rows[0][0]) != last + 1:
        raise RuntimeError(f"resume of {copy}: first step {rows[0][0]}, expected {last + 1}")
    shutil.rmtree(copy, ignore_errors=True)
    return {"s": took, "cpu_s": usage.ru_utime + usage.ru_stime}


# ----------------------------------------------------------------------------- sections


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.roots: dict[int, Path] = {}
        self.growth: dict[int, dict[str, float]] = {}

    def yolo(self, n: int) -> Path:
        if n not in self.roots:
            root = self.work / f"yolo-{n}"
            write_yolo(root, n)
            self.roots[n] = root
        return self.roots[n]

    def drop(self, n: int) -> None:
        root = self.roots.pop(n, None)
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def section_start(self) -> None:
        """Index first build and cached start, ours vs ultralytics, per size (also the growth table's rows)."""
        print("\n### Dataset index: first build and cached start (YOLO layout)\n")
        columns = ["images", "ours first (s)", "ultralytics first (s)", "ratio"]
        columns += ["ours cached (s)", "ultralytics cached (s)", "ratio"]
        print("| " + " | ".join(columns) + " |")
        print("|---|---|---|---|---|---|---|")
        for n in self.args.images:
            root = self.yolo(n)
            runs = interleaved(["ours-first", "ul-first", "ours-cached", "ul-cached"], root, self.args.repeats)
            m = {k: med(v) for k, v in runs.items()}
            print(
                f"| {n} | {m['ours-first']:.2f} | {m['ul-first']:.2f} | {m['ours-first'] / m['ul-first']:.2f}x | "
                f"{m['ours-cached']:.2f} | {m['ul-cached']:.2f} | {m['ours-cached'] / m['ul-cached']:.2f}x |",
                flush=True,
            )
            self.growth[n] = {
                "build": m["ours-first"],
                "cached": m["ours-cached"],
                "rss": med(runs["ours-cached"], "rss_mb"),
                "ul_build": m["ul-first"],
                "ul_cached": m["ul-cached"],
                "ul_rss": med(runs["ul-cached"], "rss_mb"),
            }
            if n != max(self.args.images) or "memory" not in self.sections:
                self.drop(n)

    def section_growth(self) -> None:
        if len(self.growth) < 2:
            print("\n(growth: needs the `start` section with 2+ sizes)")
            return
        sizes = sorted(self.growth)
        print("\n### Growth with the number of images (ours; ultralytics in brackets)\n")
        print("| images | first build (s) | cached start (s) | RSS after cached start (MB) |")
        print("|---|---|---|---|")
        for n in sizes:
            g = self.growth[n]
            print(
                f"| {n} | {g['build']:.2f} ({g['ul_build']:.2f}) | {g['cached']:.2f} ({g['ul_cached']:.2f}) | "
                f"{g['rss']:.0f} ({g['ul_rss']:.0f}) |"
            )
        exps = {k: fit_exponent(sizes, [max(self.growth[n][k], 1e-3) for n in sizes]) for k in self.growth[sizes[0]]}
        print(
            f"| exponent b (t ~ n^b) | {exps['build']:.2f} ({exps['ul_build']:.2f}) | "
            f"{exps['cached']:.2f} ({exps['ul_cached']:.2f}) | {exps['rss']:.2f} ({exps['ul_rss']:.2f}) |"
        )

    def section_coco(self) -> None:
        n, anns = self.args.coco
        root = self.work / f"coco-{n}"
        write_coco(root, n, anns)
        measure("ours-coco-build", root)  # the first build (images verified), outside the figures
        runs = interleaved(["ours-coco-json", "ours-coco-cached", "pycocotools"], root, self.args.repeats)
        ref = med(runs["pycocotools"])
        print(f"\n### COCO JSON, {n} images / {anns} annotations\n")
        print("| load | seconds | vs pycocotools COCO() | RSS kept (MB) | peak RSS growth (MB) |")
        print("|---|---|---|---|---|")
        for kind, what in (
            ("pycocotools", "pycocotools `COCO(file)`"),
            ("ours-coco-json", "ours, JSON parsed (images' check cached)"),
            ("ours-coco-cached", "ours, split index hit (no JSON read)"),
        ):
            r = runs[kind]
            print(f"| {what} | {med(r):.2f} | {med(r) / ref:.2f}x | {med(r, 'rss_mb'):.0f} | {med(r, 'peak_mb'):.0f} |")
        print(f"\nflat records of the split: {med(runs['ours-coco-cached'], 'records_mb'):.0f} MB")
        shutil.rmtree(root, ignore_errors=True)

    def section_memory(self) -> None:
        n = max(self.args.images)
        workers, batch, batches, imgsz = self.args.loader
        root = self.yolo(n)
        measure("ours-warm", root)  # both sides' caches built, outside the figures
        measure("ul-cached", root)
        kinds = ["loader-ours", "loader-ultralytics", "loader-ours-nocache", "loader-ours-mmap"]
        kinds += ["loader-ours-list-mmap"]
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(self.args.memory_repeats):
            for kind in kinds:
                runs[kind].append(measure(kind, root, loader=tuple(self.args.loader)))
        ours, theirs, bare = runs["loader-ours"], runs["loader-ultralytics"], runs["loader-ours-nocache"]
        fixed, listed = runs["loader-ours-mmap"], runs["loader-ours-list-mmap"]
        print(f"\n### Loader memory: {n} images, {workers} workers, batch {batch}, imgsz {imgsz}, {batches} batches\n")
        print("| | tree PSS at half (MB) | tree PSS at end (MB) | USS per worker (MB) | items/s |")
        print("|---|---|---|---|---|")
        for name, r in (
            ("ours", ours),
            ("ultralytics", theirs),
            ("ours, decoded cache off", bare),
            ("ours, MALLOC_MMAP_THRESHOLD_=131072", fixed),
            ("ours, same, records as a list of ImageRecord (before)", listed),
        ):
            rate = batches * batch / med(r)
            print(
                f"| {name} | {med(r, 'pss_mb_half'):.0f} | {med(r, 'pss_mb'):.0f} | {med(r, 'worker_uss_mb'):.0f} | "
                f"{rate:.0f} |"
            )
        print(
            f"| ratio | | {med(ours, 'pss_mb') / med(theirs, 'pss_mb'):.2f}x | "
            f"{med(ours, 'worker_uss_mb') / med(theirs, 'worker_uss_mb'):.2f}x | |"
        )

    def section_resume(self) -> None:
        small, big = 1000, self.args.resume
        rows = {}
        for n in (small, big):
            root = self.work / f"resume-{n}"
            write_yolo(root, n)
            write_yolo(root, 500, "val")
            measure("resume", root)  # both indexes and the manifest built: as a resume finds them
            rows[n] = root
        runs: dict[int, list[dict]] = {small: [], big: []}
        for _ in range(self.args.repeats):
            for n, root in rows.items():
                runs[n].append(measure("resume", root))
        a, b = med(runs[small]), med(runs[big])
        print("\n### Resume: data path (train + 500-image val loaded from the index, fingerprint, manifest)\n")
        print("| train images | seconds |\n|---|---|")
        print(f"| {small} | {a:.2f} |\n| {big} | {b:.2f} |")
        print(f"\n{big} vs {small} train images: +{b - a:.2f} s on the data path of a resume")
        for root in rows.values():
            shutil.rmtree(root, ignore_errors=True)

    def section_resume_e2e(self) -> None:
        small, big = 1000, self.args.resume
        sizes = (small, big)
        runs = {n: resume_e2e_setup(self.work / f"e2e-{n}", n) for n in sizes}
        tries: dict[int, list[dict]] = {n: [] for n in sizes}
        for rep in range(self.args.repeats):
            for n in sizes if rep % 2 == 0 else sizes[::-1]:  # the order alternates: drift hits both alike
                tries[n].append(resume_e2e_once(runs[n], self.work / f"e2e-{n}" / f"try-{rep}"))
                print(f"  resume-e2e {n} images, try {rep}: {tries[n][-1]}", flush=True)
        print("\n### Resume end to end: `yolo-resume train --resume`, spawn to the first resumed step\n")
        print("| train images | wall s (median) | vs 1000 | wall s (min) | vs 1000 | CPU s (median) | vs 1000 |")
        print("|---|---|---|---|---|---|---|")
        for n in sizes:
            cells = []
            for key, f in (("s", statistics.median), ("s", min), ("cpu_s", statistics.median)):
                value = f(r[key] for r in tries[n])
                ref = f(r[key] for r in tries[small])
                cells += [f"{value:.2f}", f"{value / ref:.2f}x"]
            print(f"| {n} | " + " | ".join(cells) + " |")
        print(f"\nevery try: {json.dumps(tries)}")
        for n in sizes:
            shutil.rmtree(self.work / f"e2e-{n}", ignore_errors=True)

    SECTIONS = ("start", "growth", "coco", "memory", "resume", "resume-e2e")

    def run(self, sections: list[str]) -> None:
        self.sections = sections
        for name in self.SECTIONS:
            if name in sections:
                getattr(self, f"section_{name.replace('-', '_')}")()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10k / 30k images, 30k-image COCO, fewer batches")
    parser.add_argument("--only", action="append", choices=Bench.SECTIONS, help="sections to run (repeatable)")
    parser.add_argument("--images", type=int, action="append", help="YOLO split sizes (repeatable)")
    parser.add_argument("--coco", type=int, nargs=2, metavar=("IMAGES", "ANNOTATIONS"))
    parser.add_argument("--loader", type=int, nargs=4, metavar=("WORKERS", "BATCH", "BATCHES", "IMGSZ"))
    parser.add_argument("--resume", type=int, help="images of the large resume (vs 1000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-repeats", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, Path(args.root), args.loader)
        return
    quick = args.quick
    args.images = sorted(args.images or ([10000, 30000] if quick else [10000, 50000, 120000]))
    args.coco = args.coco or ([30000, 215000] if quick else [120000, 860000])
    args.loader = args.loader or ([4, 8, 200, 320] if quick else [4, 16, 200, 640])
    args.resume = args.resume or (30000 if quick else 50000)
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    print(f"bench_data: {os.cpu_count()} CPUs; data under {work} (deleted after); medians of {args.repeats}")
    try:
        Bench(args, work).run(args.only or list(Bench.SECTIONS))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
