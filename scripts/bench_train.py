"""Training throughput, peak memory and per-epoch checkpoint cost: `yolo-resume train` vs ultralytics' own trainer.

Both tools train the same work in child processes, interleaved (the order alternates per repeat), on one
machine in one run:
- the same model YAML (`yolov5s.yaml`, random init), the same images: the synthetic demo set written by
  `yolo-resume data synth`, converted to the ultralytics YOLO layout (images/{train,val}, labels/*.txt,
  a dataset YAML), which both tools read (ours with `data.format: yolo`);
- the same imgsz, batch, nbs (= batch, so one optimizer step per batch), AdamW with the same lr0 / lrf /
  momentum / weight decay / warmup, seed, epochs, deterministic algorithms on;
- the same augmentation settings: mosaic 1.0 (never closed: close_mosaic 0), scale 0.5, translate 0.1,
  fliplr 0.5, hsv 0.015/0.7/0.4, no rotation/shear/perspective/flipud/mixup/cutmix/copy-paste
  (ultralytics' own defaults, which are also ours; albumentations is not installed, so ultralytics'
  optional blur/CLAHE pass is off). The implementations differ in details (see BENCHMARKS.md).

Timing: each child records, per epoch, the time from the start of the epoch (ours: `Trainer.train_epoch`
entered; ultralytics: the `on_train_epoch_start` callback) to the end of its last batch (ours:
`train_epoch` returns; ultralytics: `on_train_epoch_end`), and the images of each batch. Two figures:
- training spans: images / time summed over the epochs after the first (the first holds one-off
  warm-up: allocator, worker start-up). Ours saves a checkpoint after every epoch in a background
  thread: the CPU that thread takes from the next epoch is *inside* our figure; ultralytics'
  `save_model()` runs between epochs, outside it.
- epoch cycles: images of epochs 2..E-1 / time from the start of epoch 2 to the start of epoch E, so
  everything each tool does between two epochs is in: checkpoint saving (ultralytics' synchronous
  `save_model()`, our `save()` call and background commit), results.csv, our results.png redraw,
  progress output. Neither validates there: ours `eval.every_epochs: 0`; ultralytics `val=False`
  validates only after the last epoch (and runs its final evaluation), outside every timed span.
Checkpoint stall is timed apart: ultralytics' `save_model()`; ours the `save()` call plus the
`wait_snapshot()` waits before the next backward passes, and (once per run) the wait for the last
commit before the process may exit.

Memory: the parent samples the child's process tree (the child and its data-loader workers) every
0.2 s: peak of the summed RSS (shared pages counted once per process, so workers' shared torch
libraries are counted again), every 1 s the summed PSS (shared pages split: the fair total), and the
child's own exact peak RSS from wait4().

CPU time: the child also reads utime + stime of itself and its data-loader workers (/proc) at the same
epoch boundaries: CPU-ms per image is far less sensitive than images/s to other work on the machine.

Modes: `same`: both at the same torch thread count (default: ultralytics' own CPU choice,
min(8, cpu_count - 1), i.e. 1 on 2 cores; `--threads N` for another) and 0 data-loader workers
(ultralytics forces 0 workers on CPU). `defaults`: each tool as it comes: ultralytics sets
min(8, cpu_count - 1) threads and 0 workers on CPU (the same run as in `same` when the thread counts
agree; it is then made once per repeat); ours keeps torch's default thread count and `train.workers`
from the packaged demo config.

Usage: python scripts/bench_train.py [--full] [--repeats 3] [--modes same,defaults] [--dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")

# ultralytics' default augmentation, which is also ours; close_mosaic 0 keeps every epoch the same work.
AUGMENT = {
    "mosaic": 1.0,
    "close_mosaic": 0,
    "scale": 0.5,
    "translate": 0.1,
    "fliplr": 0.5,
    "hsv_h": 0.015,
    "hsv_s": 0.7,
    "hsv_v": 0.4,
}
QUICK = {"imgsz": 128, "num_train": 48, "num_val": 16, "batch": 8, "epochs": 4}
FULL = {"imgsz": 256, "num_train": 128, "num_val": 32, "batch": 16, "epochs": 5}


# -- shared helpers (bench_resume.py and bench_all.py import these) ------------------------------------
def child_env(scratch: Path) -> dict[str, str]:
    """Offline ultralytics with a private settings folder; nothing is downloaded."""
    env = dict(os.environ)
    env["YOLO_OFFLINE"] = "1"
    env["YOLO_CONFIG_DIR"] = str(scratch / "ultralytics-config")
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("OMP_NUM_THREADS", None)  # the thread count is set explicitly per mode, or left to each tool
    (scratch / "ultralytics-config").mkdir(parents=True, exist_ok=True)
    return env


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * PAGE / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def versions(env: dict[str, str]) -> dict:
    code = (
        "import json, torch, ultralytics, yolo_resume;"
        "print(json.dumps({'torch': torch.__version__, 'ultralytics': ultralytics.__version__,"
        "'yolo_resume': yolo_resume.__version__, 'torch_default_threads': torch.get_num_threads()}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                kids += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return kids


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += _children(p)
    return tree


def _rss(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, IndexError, ValueError):
        pass
    return 0


CLK_TCK = os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) used so far by a process and its live descendants."""
    total = 0
    for p in process_tree(pid or os.getpid()):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
        except (OSError, IndexError, ValueError):
            pass
    return total / CLK_TCK


def ultralytics_cpu_threads() -> int:
    """What ultralytics' select_device() sets on CPU: NUM_THREADS = min(8, max(1, cpu_count - 1))."""
    return min(8, max(1, (os.cpu_count() or 1) - 1))


class TreeMemory:
    """Peak summed RSS (every 0.2 s) and PSS (every 1 s) of a process and its descendants."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.max_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            tree = process_tree(self.pid)
            self.max_procs = max(self.max_procs, len(tree))
            self.peak_rss = max(self.peak_rss, sum(_rss(p) for p in tree))
            if tick % 5 == 0:
                self.peak_pss = max(self.peak_pss, sum(_pss(p) for p in tree))
            tick += 1
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_child(cmd: list[str], env: dict[str, str], log: Path, timeout: float = 3600) -> dict:
    """Run a command in its own session, sample its memory, return rc, wall time and memory peaks."""
    load_before = os.getloadavg()[0]
    start = time.time()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        mem = TreeMemory(proc.pid)
        deadline = start + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                os.killpg(proc.pid, 9)
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        mem.stop()
    rc = proc.returncode
    if rc != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {rc}; log {log}:\n{tail}")
    return {
        "wall_s": time.time() - start,
        "peak_tree_rss": mem.peak_rss,
        "peak_tree_pss": mem.peak_pss,
        "max_procs": mem.max_procs,
        "maxrss_main": usage.ru_maxrss * 1024,
        "loadavg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mb(n: float) -> str:
    return f"{n / 1e6:.0f} MB"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare_dataset(
    work: Path, env: dict[str, str], num_train: int, num_val: int, image_size: int, num_classes: int | None = None
) -> Path:
    """`yolo-resume data synth` (COCO format), converted to the YOLO layout; returns the dataset YAML."""
    tag = f"{num_train}-{num_val}-{image_size}" + (f"-c{num_classes}" if num_classes else "")
    coco = work / f"synth-{tag}"
    yolo = work / f"yolo-{tag}"
    data_yaml = yolo / "data.yaml"
    if data_yaml.exists():
        return data_yaml
    cmd = [sys.executable, "-m", "yolo_resume", "data", "synth", str(coco), "--num-train", str(num_train)]
    cmd += ["--num-val", str(num_val), "--image-size", str(image_size), "--seed", "0"]
    if num_classes:
        cmd += ["--num-classes", str(num_classes)]
    subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True)
    names = None
    for split in ("train", "val"):
        ann = json.loads((coco / "annotations" / f"instances_{split}.json").read_text())
        cats = sorted(ann["categories"], key=lambda c: c["id"])
        cls_of = {c["id"]: i for i, c in enumerate(cats)}
        names = [c["name"] for c in cats]
        (yolo / "images" / split).mkdir(parents=True, exist_ok=True)
        (yolo / "labels" / split).mkdir(parents=True, exist_ok=True)
        lines: dict[int, list[str]] = {img["id"]: [] for img in ann["images"]}
        sizes = {img["id"]: (img["width"], img["height"]) for img in ann["images"]}
        for a in ann["annotations"]:
            if a.get("iscrowd"):
                continue
            w, h = sizes[a["image_id"]]
            x, y, bw, bh = a["bbox"]
            lines[a["image_id"]].append(
                f"{cls_of[a['category_id']]} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}"
            )
        for img in ann["images"]:
            src = coco / "images" / split / img["file_name"]
            shutil.copyfile(src, yolo / "images" / split / img["file_name"])
            stem = Path(img["file_name"]).stem
            (yolo / "labels" / split / f"{stem}.txt").write_text("".join(f"{ln}\n" for ln in lines[img["id"]]))
    data_yaml.write_text(
        yaml.safe_dump(
            {"path": str(yolo), "train": "images/train", "val": "images/val", "names": dict(enumerate(names))}
        )
    )
    return data_yaml


def demo_workers() -> int:
    demo = yaml.safe_load((REPO / "yolo_resume" / "configs" / "demo.yaml").read_text())
    return int(demo["train"]["workers"])


def our_config(path: Path, data_yaml: Path, p: dict, workers: int | None, **overrides) -> Path:
    """A yolo-resume config doing the same work as the ultralytics call in `_child_ultra`."""
    cfg = {
        "data": {"format": "yolo", "root": str(data_yaml)},
        "model": {"cfg": "yolov5s.yaml", "imgsz": p["imgsz"]},
        "train": {
            "epochs": p["epochs"],
            "batch": p["batch"],
            "nbs": p["batch"],
            "seed": 0,
            "deterministic": True,
            "optimizer": "AdamW",
            "lr0": 0.002,
            "lrf": 0.05,
            "momentum": 0.9,
            "weight_decay": 0.0005,
            "warmup_epochs": 1.0,
            "device": "cpu",
        },
        "augment": dict(AUGMENT),
        "eval": {"every_epochs": 0},
        "ckpt": {"every_epochs": 1, "keep_last": 3},
    }
    if workers is not None:
        cfg["train"]["workers"] = workers
    for key, value in overrides.items():
        section, name = key.split(".", 1)
        cfg[section][name] = value
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# -- children: one training run each, timing itself --------------------------------------------------
def epoch_record(t0: float, c0: float, batch_images: list[int]) -> dict:
    """One epoch's training span: start (perf_counter, comparable within the process), length, CPU
    seconds of the process tree, images and batches."""
    return {
        "t0": t0,
        "s": time.perf_counter() - t0,
        "c0": c0,
        "cpu_s": tree_cpu_s() - c0,
        "images": sum(batch_images),
        "batches": len(batch_images),
    }


def _child_ours(spec: dict) -> None:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    from yolo_resume import cli
    from yolo_resume import trainer as tr
    from yolo_resume.checkpoint.manager import CheckpointManager

    rec: dict = {"epochs": [], "save_calls": [], "wait_snapshot": [], "final_waits": [], "save_results": []}
    rec |= {"end_epoch_s": [], "plot_s": []}
    now = time.perf_counter
    batch_images: list[int] = []
    in_save = threading.local()

    orig_epoch, orig_step, orig_save = tr.Trainer.train_epoch, tr.Trainer.train_step, tr.Trainer.save
    orig_end = tr.Trainer.end_epoch
    orig_snap, orig_wait, orig_poll = CheckpointManager.wait_snapshot, CheckpointManager.wait, CheckpointManager.poll

    def train_epoch(self):
        batch_images.clear()
        t0, c0 = now(), tree_cpu_s()
        orig_epoch(self)
        rec["epochs"].append(epoch_record(t0, c0, batch_images))

    def end_epoch(self):
        t0 = now()
        orig_end(self)
        rec["end_epoch_s"].append(now() - t0)

    def redraw_plot(self, *args, **kwargs):
        t0 = now()  # the training thread's share: the drawing itself runs in a background thread
        orig_plot(self, *args, **kwargs)
        rec["plot_s"].append(now() - t0)

    def train_step(self, batch):
        batch_images.append(int(batch["img"].shape[0]))
        return orig_step(self, batch)

    def save(self, reason):
        in_save.on = True
        t0 = now()
        try:
            return orig_save(self, reason)
        finally:
            in_save.on = False
            rec["save_calls"].append(now() - t0)

    def wait_snapshot(self):
        t0 = now()
        orig_snap(self)
        rec["wait_snapshot"].append(now() - t0)

    def wait(self):
        t0 = now()
        orig_wait(self)
        if not getattr(in_save, "on", False):
            rec["final_waits"].append(now() - t0)

    def poll(self):
        results = orig_poll(self)
        rec["save_results"] += [
            {"name": r.name, "snapshot_s": r.snapshot_s, "write_s": r.write_s, "error": str(r.error or "")}
            for r in results
        ]
        return results

    tr.Trainer.train_epoch, tr.Trainer.train_step, tr.Trainer.save = train_epoch, train_step, save
    tr.Trainer.end_epoch = end_epoch
    try:  # results.png is drawn by the run log (0.2.0 on), by the Trainer before
        from yolo_resume.run_log import RunLog as plotter
    except ImportError:
        plotter = tr.Trainer
    orig_plot = getattr(plotter, "redraw_plot", None)
    if orig_plot is not None:  # results.png redrawn after every epoch (newer versions)
        plotter.redraw_plot = redraw_plot
    CheckpointManager.wait_snapshot, CheckpointManager.wait, CheckpointManager.poll = wait_snapshot, wait, poll
    sys.argv = ["yolo-resume", "train", "--config", spec["config"], "--run-dir", spec["run_dir"], "-q"]
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code or 0
    rec["threads"] = torch.get_num_threads()
    Path(spec["out"]).write_text(json.dumps(rec))
    sys.exit(code)


def _child_ultra(spec: dict) -> None:
    import torch
    from ultralytics.utils import torch_utils

    if spec["threads"]:
        torch_utils.NUM_THREADS = spec["threads"]  # select_device() calls torch.set_num_threads(NUM_THREADS)
    from ultralytics import YOLO
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.models.yolo.detect import DetectionTrainer

    rec: dict = {"epochs": [], "saves": []}
    now = time.perf_counter
    batch_images: list[int] = []
    epoch_start: list[float] = []

    orig_save, orig_pre = BaseTrainer.save_model, DetectionTrainer.preprocess_batch

    def save_model(self):
        before = {p.name: p.stat().st_mtime_ns for p in self.wdir.glob("*.pt")} if self.wdir.exists() else {}
        t0 = now()
        out = orig_save(self)
        dt = now() - t0
        written = {
            p.name: p.stat().st_size for p in self.wdir.glob("*.pt") if before.get(p.name) != p.stat().st_mtime_ns
        }
        rec["saves"].append({"s": dt, "written": written})
        return out

    def preprocess_batch(self, batch):
        batch_images.append(int(batch["img"].shape[0]))
        return orig_pre(self, batch)

    def on_epoch_start(trainer):
        batch_images.clear()
        epoch_start[:] = [now(), tree_cpu_s()]

    def on_epoch_end(trainer):
        rec["epochs"].append(epoch_record(*epoch_start, batch_images))

    BaseTrainer.save_model, DetectionTrainer.preprocess_batch = save_model, preprocess_batch
    model = YOLO("yolov5s.yaml")
    model.add_callback("on_train_epoch_start", on_epoch_start)
    model.add_callback("on_train_epoch_end", on_epoch_end)
    run_dir = Path(spec["run_dir"])
    p = spec["params"]
    model.train(
        data=spec["data"],
        epochs=p["epochs"],
        imgsz=p["imgsz"],
        batch=p["batch"],
        nbs=p["batch"],
        workers=0,
        device="cpu",
        optimizer="AdamW",
        lr0=0.002,
        lrf=0.05,
        momentum=0.9,
        weight_decay=0.0005,
        warmup_epochs=1.0,
        seed=0,
        deterministic=True,
        pretrained=False,
        amp=False,
        plots=False,
        val=False,
        cache=False,
        project=str(run_dir.parent),
        name=run_dir.name,
        exist_ok=True,
        verbose=False,
        degrees=0.0,
        shear=0.0,
        perspective=0.0,
        flipud=0.0,
        mixup=0.0,
        cutmix=0.0,
        copy_paste=0.0,
        **AUGMENT,
    )
    rec["threads"] = torch.get_num_threads()
    Path(spec["out"]).write_text(json.dumps(rec))


# -- the parent: interleaved runs, medians, ratios ----------------------------------------------------
def summarize_run(tool: str, rec: dict, proc: dict, run_dir: Path) -> dict:
    epochs = rec["epochs"]
    if len(epochs) < 3:
        raise ValueError("need at least 3 epochs (the first is warm-up, cycles run from epoch 2 to the last)")
    steady, cycles = epochs[1:], epochs[1:-1]
    out = {
        "tool": tool,
        "threads": rec["threads"],
        "img_per_s": sum(e["images"] for e in steady) / sum(e["s"] for e in steady),
        "img_per_s_all_epochs": sum(e["images"] for e in epochs) / sum(e["s"] for e in epochs),
        "cpu_ms_per_img": 1e3 * sum(e["cpu_s"] for e in steady) / sum(e["images"] for e in steady),
        # Epoch cycles (start of epoch k to start of epoch k+1, k = 2..E-1): training plus everything the
        # tool does between two epochs (checkpoint, logs, plots; neither validates before the last epoch).
        "img_per_s_cycle": sum(e["images"] for e in cycles) / (epochs[-1]["t0"] - epochs[1]["t0"]),
        "cpu_ms_per_img_cycle": 1e3 * (epochs[-1]["c0"] - epochs[1]["c0"]) / sum(e["images"] for e in cycles),
        "between_epochs_s": [b["t0"] - (a["t0"] + a["s"]) for a, b in zip(epochs[:-1], epochs[1:], strict=True)],
        "epoch_s": [e["s"] for e in epochs],
        "images_per_epoch": [e["images"] for e in epochs],
        **proc,
    }
    if tool == "ultralytics":
        saves = rec["saves"]
        out["ckpt_stall_s"] = [s["s"] for s in saves]
        out["between_epoch_save_s"] = out["ckpt_stall_s"][: len(epochs) - 1]  # the saves inside the gaps
        out["ckpt_bytes_per_save"] = [sum(s["written"].values()) for s in saves]
        out["ckpt_files_per_save"] = [sorted(s["written"]) for s in saves]
        # The size of last.pt as each save wrote it (at the end of training, ultralytics strips the
        # optimizer from last.pt and best.pt, so the files left on disk are much smaller).
        out["ckpt_file_bytes"] = median([s["written"]["last.pt"] for s in saves if "last.pt" in s["written"]])
        out["stall_total_s"] = sum(out["ckpt_stall_s"])
    else:
        ckpts = sorted(p for p in (run_dir / "checkpoints").iterdir() if p.is_dir() and p.name.startswith("ckpt-"))
        sizes = [folder_bytes(p) for p in ckpts]
        metas = [json.loads((p / "meta.json").read_text()) for p in ckpts]
        # Every save writes one checkpoint folder; the ones pruned away had the same layout and size.
        n_saves = len(rec["save_calls"])
        out["ckpt_file_bytes"] = median(sizes)
        out["ckpt_bytes_per_save"] = [median(sizes)] * n_saves
        out["ckpt_snapshot_s_meta"] = [m.get("snapshot_s") for m in metas]
        out["ckpt_write_s"] = [r["write_s"] for r in rec["save_results"]]
        out["ckpt_snapshot_s"] = [r["snapshot_s"] for r in rec["save_results"]]
        out["ckpt_save_call_s"] = rec["save_calls"]
        out["wait_snapshot_total_s"] = sum(rec["wait_snapshot"])
        out["wait_snapshot_max_s"] = max(rec["wait_snapshot"], default=0.0)
        out["final_wait_s"] = sum(rec["final_waits"])
        # Per save: the save() call (incl. waiting for a previous save still in flight) plus the waits
        # for its copy before the next backward. The wait for the last commit before the process may
        # exit happens once per run, reported apart (final_wait_s).
        per_save = (sum(rec["save_calls"]) + out["wait_snapshot_total_s"]) / max(n_saves, 1)
        out["ckpt_stall_s"] = [per_save] * n_saves
        out["stall_total_s"] = per_save * n_saves + out["final_wait_s"]
    out["plot_s"] = rec.get("plot_s", [])[: len(epochs) - 1]  # the redraws inside the gaps
    return out


def run_one(
    tool: str,
    threads: int | None,
    workers: int | None,
    tag: str,
    work: Path,
    env: dict,
    data_yaml: Path,
    p: dict,
    overrides: dict | None = None,
) -> dict:
    """One training run in a child process. threads None: the tool's own default; workers None (ours):
    the packaged demo config's train.workers. Ultralytics always gets workers=0 (it forces 0 on CPU)."""
    run_dir = work / "runs" / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    spec = {"run_dir": str(run_dir), "out": str(work / f"{tag}.json"), "params": p, "data": str(data_yaml)}
    spec["threads"] = threads
    if tool == "yolo-resume":
        workers = demo_workers() if workers is None else workers
        spec["config"] = str(our_config(work / f"{tag}.yaml", data_yaml, p, workers, **(overrides or {})))
    else:
        workers = 0
    spec_path = work / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    child = "ours" if tool == "yolo-resume" else "ultra"
    proc = run_child([sys.executable, __file__, "--child", child, str(spec_path)], env, work / f"{tag}.log")
    rec = json.loads(Path(spec["out"]).read_text())
    result = summarize_run(tool, rec, proc, run_dir)
    result["workers"] = workers
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


NO_EPOCH_CKPT = {"ckpt.every_epochs": 0}  # ours saves only after the last epoch


def variants(modes: list[str], threads: int) -> dict[str, tuple]:
    """name -> (tool, threads, workers, our config overrides). When ultralytics' default thread count
    equals the `same` mode's, its `same` and `defaults` runs are the same run, made once. `ours-same-nockpt`
    (the `same` settings without per-epoch checkpoints) separates our loop's cost from our saves'."""
    out: dict[str, tuple] = {}
    if "same" in modes:
        out["ours-same"] = ("yolo-resume", threads, 0, None)
        out["ultra-same"] = ("ultralytics", threads, 0, None)
        out["ours-same-nockpt"] = ("yolo-resume", threads, 0, NO_EPOCH_CKPT)
    if "defaults" in modes:
        out["ours-defaults"] = ("yolo-resume", None, None, None)
        if "ultra-same" not in out or threads != ultralytics_cpu_threads():
            out["ultra-defaults"] = ("ultralytics", None, 0, None)
    return out


def bench(work: Path, p: dict, repeats: int, modes: list[str], threads: int | None = None, log=print) -> dict:
    """`same`: both tools at `threads` (default: ultralytics' own CPU choice, min(8, cpu_count - 1)) and 0
    workers; `defaults`: each tool as it comes. Runs rotate their order every repeat."""
    threads = threads or ultralytics_cpu_threads()
    env = child_env(work)
    data_yaml = prepare_dataset(work, env, p["num_train"], p["num_val"], p["imgsz"])
    result: dict = {"params": p, "augment": AUGMENT, "repeats": repeats, "same_threads": threads, "modes": {}}
    todo = variants(modes, threads)
    names = list(todo)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(repeats):
        k = rep % len(names)
        for name in names[k:] + names[:k]:
            tool, thr, wkr, overrides = todo[name]
            r = run_one(tool, thr, wkr, f"{name}-{rep}", work, env, data_yaml, p, overrides)
            runs[name].append(r)
            log(
                f"  train {name:14s} rep {rep}: {r['img_per_s']:.1f} img/s, {r['cpu_ms_per_img']:.0f} CPU-ms/img, "
                f"threads {r['threads']}, workers {r['workers']}, peak tree RSS {mb(r['peak_tree_rss'])}, "
                f"wall {r['wall_s']:.0f}s, load {r['loadavg_1min']}"
            )
    if "ours-same-nockpt" in runs:
        med = {"yolo-resume": _medians(runs["ours-same-nockpt"]), "ultralytics": _medians(runs["ultra-same"])}
        result["nockpt"] = {
            "runs": runs["ours-same-nockpt"],
            "median": med,
            "ratio": _ratios(med["yolo-resume"], med["ultralytics"]),
            "img_per_s_ratio_vs_ours_with_ckpt": med["yolo-resume"]["img_per_s"]
            / _medians(runs["ours-same"])["img_per_s"],
        }
    for mode in modes:
        ours, base = f"ours-{mode}", (f"ultra-{mode}" if f"ultra-{mode}" in runs else "ultra-same")
        med = {"yolo-resume": _medians(runs[ours]), "ultralytics": _medians(runs[base])}
        result["modes"][mode] = {
            "runs": {"yolo-resume": runs[ours], "ultralytics": runs[base]},
            "baseline_variant": base,
            "median": med,
            "ratio": _ratios(med["yolo-resume"], med["ultralytics"]),
        }
    return result


def _medians(runs: list[dict]) -> dict:
    keys = ("img_per_s", "img_per_s_all_epochs", "img_per_s_cycle", "cpu_ms_per_img", "cpu_ms_per_img_cycle")
    keys += ("peak_tree_rss", "peak_tree_pss", "maxrss_main")
    out = {k: median([r[k] for r in runs]) for k in keys + ("wall_s",)}
    out["threads"] = runs[0]["threads"]
    out["workers"] = runs[0]["workers"]
    out["ckpt_file_bytes"] = median([r["ckpt_file_bytes"] for r in runs])
    out["ckpt_bytes_per_save"] = median([median(r["ckpt_bytes_per_save"]) for r in runs])
    out["ckpt_stall_per_save_s"] = median([median(r["ckpt_stall_s"]) for r in runs])
    out["between_epochs_s"] = median([median(r["between_epochs_s"]) for r in runs])
    if "ckpt_write_s" in runs[0]:
        out["plot_s"] = median([median(r["plot_s"]) for r in runs]) if runs[0]["plot_s"] else 0.0
        out["ckpt_write_s"] = median([median(r["ckpt_write_s"]) for r in runs])
        out["ckpt_snapshot_s"] = median([median(r["ckpt_snapshot_s"]) for r in runs])
        out["ckpt_save_call_s"] = median([median(r["ckpt_save_call_s"]) for r in runs])
        out["wait_snapshot_max_s"] = median([r["wait_snapshot_max_s"] for r in runs])
        out["final_wait_s"] = median([r["final_wait_s"] for r in runs])
    else:
        out["ckpt_files"] = runs[0]["ckpt_files_per_save"]
        out["between_epoch_save_s"] = median([median(r["between_epoch_save_s"]) for r in runs])
    return out


def _ratios(ours: dict, base: dict) -> dict:
    keys = ("img_per_s", "img_per_s_all_epochs", "img_per_s_cycle", "cpu_ms_per_img", "cpu_ms_per_img_cycle")
    keys += (
        "between_epochs_s",
        "peak_tree_rss",
        "peak_tree_pss",
        "maxrss_main",
        "ckpt_bytes_per_save",
        "ckpt_stall_per_save_s",
    )
    return {k: ours[k] / base[k] if base[k] else float("nan") for k in keys}


def table(result: dict) -> str:
    """Markdown rows: measure | yolo-resume | ultralytics | ratio."""
    rows = ["| measure | yolo-resume | ultralytics | ratio (ours / theirs) |", "|---|---|---|---|"]

    def row(what: str, ours: str, theirs: str, ratio: float, bold: bool = False) -> None:
        rows.append(f"| {what} | {ours} | {theirs} | {f'**{ratio:.2f}**' if bold else f'{ratio:.2f}'} |")

    for mode, m in result["modes"].items():
        o, u, r = m["median"]["yolo-resume"], m["median"]["ultralytics"], m["ratio"]
        cfg = f"ours {o['threads']} thr / {o['workers']} wkr, ultralytics {u['threads']} thr / {u['workers']} wkr"
        rows.append(f"| ***{mode}*** ({cfg}) | | | |")
        ips = "{:.1f} img/s".format
        row(
            "train throughput, training spans of epochs 2+",
            ips(o["img_per_s"]),
            ips(u["img_per_s"]),
            r["img_per_s"],
            True,
        )
        row(
            "train throughput, epoch cycles (incl. between-epoch checkpoint, logs, plot)",
            ips(o["img_per_s_cycle"]),
            ips(u["img_per_s_cycle"]),
            r["img_per_s_cycle"],
            True,
        )
        if mode == "same" and "nockpt" in result:
            n, nr = result["nockpt"]["median"]["yolo-resume"], result["nockpt"]["ratio"]
            row(
                "  same, ours without per-epoch checkpoints: training spans",
                ips(n["img_per_s"]),
                ips(u["img_per_s"]),
                nr["img_per_s"],
            )
            row(
                "  same, ours without per-epoch checkpoints: epoch cycles",
                ips(n["img_per_s_cycle"]),
                ips(u["img_per_s_cycle"]),
                nr["img_per_s_cycle"],
            )
            row(
                "  same, ours without per-epoch checkpoints: CPU per image, training spans",
                f"{n['cpu_ms_per_img']:.0f} ms",
                f"{u['cpu_ms_per_img']:.0f} ms",
                nr["cpu_ms_per_img"],
            )
        row(
            "CPU time per image (process tree), training spans",
            f"{o['cpu_ms_per_img']:.0f} ms",
            f"{u['cpu_ms_per_img']:.0f} ms",
            r["cpu_ms_per_img"],
        )
        row(
            "CPU time per image (process tree), epoch cycles",
            f"{o['cpu_ms_per_img_cycle']:.0f} ms",
            f"{u['cpu_ms_per_img_cycle']:.0f} ms",
            r["cpu_ms_per_img_cycle"],
        )
        row(
            "time between two epochs (no validation)",
            f"{o['between_epochs_s'] * 1e3:.0f} ms (of which results.png {o.get('plot_s', 0) * 1e3:.0f} ms, "
            f"save() {o['ckpt_save_call_s'] * 1e3:.0f} ms)",
            f"{u['between_epochs_s'] * 1e3:.0f} ms (of which save_model {u['between_epoch_save_s'] * 1e3:.0f} ms)",
            r["between_epochs_s"],
        )
        row("peak RSS, process tree summed", mb(o["peak_tree_rss"]), mb(u["peak_tree_rss"]), r["peak_tree_rss"], True)
        row("peak PSS, process tree summed", mb(o["peak_tree_pss"]), mb(u["peak_tree_pss"]), r["peak_tree_pss"])
        row("peak RSS, main process (wait4)", mb(o["maxrss_main"]), mb(u["maxrss_main"]), r["maxrss_main"])
        row(
            "size of one resumable checkpoint",
            f"{mb(o['ckpt_file_bytes'])} (folder)",
            f"{mb(u['ckpt_file_bytes'])} (last.pt)",
            o["ckpt_file_bytes"] / u["ckpt_file_bytes"],
        )
        files = " + ".join(u["ckpt_files"][0]) if u["ckpt_files"] else "-"
        row(
            "checkpoint bytes written per epoch",
            f"{mb(o['ckpt_bytes_per_save'])} (1 folder)",
            f"{mb(u['ckpt_bytes_per_save'])} ({files})",
            r["ckpt_bytes_per_save"],
        )
        row(
            "training stall per checkpoint",
            f"{o['ckpt_stall_per_save_s'] * 1e3:.0f} ms (save() + wait_snapshot; background: copy "
            f"{o['ckpt_snapshot_s'] * 1e3:.0f} ms, commit {o['ckpt_write_s'] * 1e3:.0f} ms; last save of the run: "
            f"+{o['final_wait_s'] * 1e3:.0f} ms wait before exit)",
            f"{u['ckpt_stall_per_save_s'] * 1e3:.0f} ms (save_model, synchronous)",
            r["ckpt_stall_per_save_s"],
            True,
        )
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        spec = json.loads(Path(sys.argv[3]).read_text())
        {"ours": _child_ours, "ultra": _child_ultra}[sys.argv[2]](spec)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help=f"longer runs {FULL} instead of {QUICK}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="same,defaults")
    parser.add_argument(
        "--threads", type=int, default=None, help="threads of the `same` mode (default: min(8, cpu_count - 1))"
    )
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one in ./runs)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    p = dict(FULL if args.full else QUICK)
    if args.epochs:
        p["epochs"] = args.epochs
    base = args.dir or REPO / "runs"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base, prefix="bench-train-"))
    try:
        start = time.time()
        result = bench(work, p, args.repeats, args.modes.split(","), args.threads)
        result["machine"] = machine() | versions(child_env(work))
        result["elapsed_s"] = time.time() - start
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
