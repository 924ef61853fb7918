"""One prepared GPU check (issue 16): exact resume on CUDA with AMP, throughput, checkpoint cost and peak GPU
memory, ours vs the ultralytics trainer, in one command that finishes in under 8 minutes on one H200.

It needs nothing but this repository and the GPU machine as it comes (Python 3.12, torch with CUDA, OpenCV,
safetensors, fsspec, rich, typer; no ultralytics, no pycocotools, no network). `make gpu-wheels`, run where
there is network, downloads the cp312 manylinux wheels that machine lacks into gpu-wheels/ (ignored; it
travels with the tree when named in the device call's `carry`). The install stage puts them into a scratch
folder with `pip install --no-index --find-links gpu-wheels --no-deps --target DIR`, on PYTHONPATH for the
children, so the machine's torch is never replaced. The project itself runs from the tree (PYTHONPATH and
`python -m yolo_resume`, the same entry point as `yolo-resume`), so the wheels never lag behind the code.

Stages, in order, each with its own time budget; a failure or a timeout is recorded and the next stage runs:
  0 install      wheels the machine lacks, without touching its torch; then every import checked
  1 environment  GPU, driver, CUDA, cuDNN, torch, versions, the determinism settings in force
  - data         a few hundred 640x480 JPEGs with YOLO labels, made here: `yolo-resume data synth` and the
                 YOLO export of bench_train.py (prepare_dataset), cropped to 4:3; the train split repeats the
                 images as hard links so that an epoch is long enough to measure (many batches per worker)
  2 resume       `yolo-resume train` uninterrupted vs the same run SIGKILLed twice at random steps and resumed
                 with `--resume` (fresh processes, AMP on): model/EMA/optimizer digests from `ckpt show --json`
                 and steps.csv compared; again with train.deterministic false, saying by how much it differs
  3 throughput   imgsz 640, YOLOv5s, batch 32 and 64, AMP, loader workers = spare cores: ours vs ultralytics'
                 trainer on the same images, images/s of epochs 2+ (bench_train.py's timing), GPU utilisation
                 (NVML, else nvidia-smi) and the time the training loop waits for batches
  4 checkpoint   stall per save (ours vs ultralytics' save_model(), from stage 3), device-to-host copy of the
                 full training state pageable (ours) vs pinned, and the step-time overhead of saving every
                 100 steps (the same run with and without step checkpoints)
  5 memory       peak GPU memory ours vs ultralytics at the same batch (stage 3's runs)

Writes report.json, report.md and gpu_check.log into --out DIR, else $OUT, else runs/gpu-check, after every
stage, so a run cut short still leaves its report. Exit code 0 when every stage passed, 1 otherwise.

Usage:
  python3 scripts/gpu_check.py                              # on the GPU machine (stage budgets: 445 s)
  python scripts/gpu_check.py --cpu-smoke                   # every stage on CPU at toy size (the slow test)
  python3 scripts/gpu_check.py --only throughput,memory --budget-scale 1.5   # a rerun of some stages
  python scripts/gpu_check.py --download-wheels gpu-wheels  # `make gpu-wheels`
"""

from __future__ import annotations

import argparse
import concurrent.futures
import copy
import csv
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from importlib import metadata
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train as bt  # noqa: E402

REPO = bt.REPO
MIB = 2**20

# What the GPU machine's image lacks of ultralytics' and our requirements (it has torch, torchvision, numpy,
# matplotlib, pillow, pyyaml, requests, scipy, psutil, nvidia-ml-py, httpx, typer, rich, safetensors, fsspec;
# opencv-python is not needed: its opencv-python-headless provides cv2).
WHEEL_DISTS = (
    "ultralytics",
    "ultralytics-thop",
    "ultralytics-platform",
    "polars",
    "polars-runtime-32",
    "pycocotools",
    "xxhash",
    "simplejpeg",
)
WHEEL_PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
WHEELS_MAX_BYTES = 64 * MIB  # what one device call carries, the working tree included
PROTECTED_DISTS = ("torch", "torchvision", "torchaudio", "triton")  # never installed over the machine's own

GPU = {
    "name": "gpu",
    "device": "cuda",
    "threads": None,  # each tool's own default
    "data": {"size": 640, "height": 480, "num_train": 192, "num_val": 32, "replicas": 8},  # 1536 entries
    "resume": {
        "model": "yolov5s.yaml",
        "imgsz": 640,
        "batch": 16,
        "nbs": 64,
        "epochs": 3,
        "images": 128,
        "every_steps": 4,
        "lanes": 4,
        "kills": {"deterministic": 2, "nondeterministic": 2},
    },
    "throughput": {"imgsz": 640, "batches": [32, 64], "epochs": 3},
    "checkpoint": {
        "model": "yolov5s.yaml",
        "imgsz": 640,
        "batch": 16,
        "epochs": 4,
        "every_steps": 100,
        "copy_batch": 8,
        "repeats": 5,
    },
    # Seconds; 445 in all, so the whole check ends inside 8 minutes even when every stage hits its budget.
    "budgets": {
        "install": 25,
        "environment": 25,
        "data": 60,
        "resume": 110,
        "throughput": 130,
        "checkpoint": 90,
        "memory": 5,
    },
}
SMOKE = {
    "name": "cpu-smoke",
    "device": "cpu",
    "threads": 1,
    "data": {"size": 64, "height": 48, "num_train": 8, "num_val": 4, "replicas": 2},
    "resume": {
        "model": "yolov5n.yaml",
        "imgsz": 64,
        "batch": 2,
        "nbs": 4,
        "epochs": 3,
        "images": 8,
        "every_steps": 2,
        "lanes": 4,
        "kills": {"deterministic": 2, "nondeterministic": 1},  # the two-kill path is covered once
    },
    "throughput": {"imgsz": 64, "batches": [4], "epochs": 3},
    "checkpoint": {
        "model": "yolov5n.yaml",
        "imgsz": 64,
        "batch": 4,
        "epochs": 3,
        "every_steps": 5,
        "copy_batch": 2,
        "repeats": 3,
    },
    "budgets": {
        "install": 60,
        "environment": 60,
        "data": 60,
        "resume": 150,
        "throughput": 150,
        "checkpoint": 120,
        "memory": 10,
    },
}
STAGES = (
    ("install", "0. install the missing wheels"),
    ("environment", "1. environment"),
    ("data", "data: 4:3 JPEGs with YOLO labels"),
    ("resume", "2. exact resume (CUDA, AMP) after SIGKILLs"),
    ("throughput", "3. throughput vs ultralytics"),
    ("checkpoint", "4. checkpoint cost"),
    ("memory", "5. peak GPU memory vs ultralytics"),
)


class StageTimeout(Exception):
    """The stage's time budget ran out (its child processes were killed)."""


def log(msg: str) -> None:
    line = f"[gpu_check {time.strftime('%H:%M:%S')}] {msg}"
    print(line, file=sys.stderr, flush=True)
    if LOG_FILE is not None:
        with open(LOG_FILE, "a") as f:
            f.write(line + "\n")


LOG_FILE: Path | None = None


def spare_cores() -> int:
    return max(1, (os.cpu_count() or 2) - 1)


def shm_free() -> int | None:
    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def loader_workers(batch: int, imgsz: int, processes: int = 1) -> int:
    """Data-loader workers per training process: the spare cores shared by `processes`, fewer when /dev/shm
    could not hold every worker's two prefetched uint8 batches (a full /dev/shm kills the workers)."""
    workers = max(1, spare_cores() // processes)
    free = shm_free()
    if free is not None:
        per_worker = 2 * batch * 3 * imgsz**2 * 1.25 * processes
        workers = max(1, min(workers, int(free // per_worker)))
    return workers


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a, b) -> float | None:
    return a / b if a is not None and b else None


# -- wheels (make gpu-wheels, here) and their install (there) ------------------------------------------
def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_dist(path: Path) -> tuple[str, str]:
    """(canonical distribution name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def download_wheels(dest: Path) -> int:
    """`make gpu-wheels`: the cp312 manylinux wheels of WHEEL_DISTS at the versions this venv tests with."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = {canonical(d): metadata.version(d) for d in WHEEL_DISTS}
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    cmd += ["--python-version", "3.12", "--implementation", "cp"]
    for plat in WHEEL_PLATFORMS:
        cmd += ["--platform", plat]
    cmd += ["-d", str(dest), *(f"{d}=={v}" for d, v in pins.items())]
    subprocess.run(cmd, check=True)
    for whl in dest.glob("*.whl"):  # one version of each: two would stop the whole install there
        if pins.get(wheel_dist(whl)[0]) != wheel_dist(whl)[1]:
            print(f"removing {whl.name} (not a pinned version)")
            whl.unlink()
    total = sum(p.stat().st_size for p in dest.glob("*.whl"))
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    tree = sum((REPO / p).stat().st_size for p in tracked.decode().split("\0") if p and (REPO / p).is_file())
    for whl in sorted(dest.glob("*.whl")):
        print(f"  {whl.stat().st_size / MIB:6.1f} MiB  {whl.name}")
    print(f"{dest}: {total / MIB:.1f} MiB of wheels, {(total + tree) / MIB:.1f} MiB with the tracked tree")
    if total + tree > WHEELS_MAX_BYTES:
        print(f"error: more than {WHEELS_MAX_BYTES // MIB} MiB, which one device call cannot carry", file=sys.stderr)
        return 1
    return 0


def wheels_to_install(wheels: list[Path], installed: dict[str, str | None]) -> tuple[list[Path], list[str]]:
    """(wheels to install, refused names): those whose distribution is missing or at another version; never
    a torch, torchvision, triton or nvidia-* wheel, which would replace the machine's CUDA build."""
    todo, refused = [], []
    for whl in wheels:
        name, version = wheel_dist(whl)
        if name in PROTECTED_DISTS or name.startswith("nvidia-"):
            refused.append(whl.name)
        elif installed.get(name) != version:
            todo.append(whl)
    return todo, refused


_PROBE = r"""
import json, sys
from importlib import metadata
out = {"versions": {}, "imports": {}}
for name in sys.argv[2:]:
    try:
        out["versions"][name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out["versions"][name] = None
try:
    out["torch_location"] = str(metadata.distribution("torch").locate_file(""))
except metadata.PackageNotFoundError:
    out["torch_location"] = None
if sys.argv[1] == "imports":
    for mod in ("torch", "ultralytics", "pycocotools.cocoeval", "polars", "cv2", "safetensors", "yolo_resume.trainer"):
        try:
            m = __import__(mod, fromlist=["_"])
            out["imports"][mod] = {"ok": True, "version": getattr(m, "__version__", None), "file": m.__file__}
        except Exception as exc:
            out["imports"][mod] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    try:
        from packaging.requirements import Requirement
        missing = []
        reqs = metadata.requires("ultralytics") or []
        for line in reqs:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            try:
                metadata.version(req.name)
            except metadata.PackageNotFoundError:
                missing.append(req.name)
        out["ultralytics_requirements_missing"] = missing
    except Exception as exc:
        out["ultralytics_requirements_missing"] = f"not checked: {type(exc).__name__}: {exc}"
print(json.dumps(out))
"""


def probe(env: dict, what: str, names: list[str], timeout: float) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, what, *names], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    if out.returncode != 0:
        raise RuntimeError(f"probe exited {out.returncode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- children: each runs in its own process (`--child KIND SPEC`) ---------------------------------------
class TimedLoader:
    """A training data loader that records how long the loop waits for each batch (one list per epoch).
    At the end of an epoch it waits for the GPU, so an epoch's span covers its last step's kernels."""

    def __init__(self, loader, sink: list, sync):
        self._loader, self._sink, self._sync = loader, sink, sync

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        it, waits = iter(self._loader), []
        self._sink.append(waits)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                self._sync()
                return
            waits.append(time.perf_counter() - t0)
            yield batch


def _cuda_tools(device: str):
    import torch

    if not device.startswith("cuda"):
        return (lambda: None), (lambda: None)

    def memory() -> dict:
        return {"max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved()}

    return torch.cuda.synchronize, memory


def child_ours(spec: dict) -> None:
    """bench_train's timed `yolo-resume train`, plus batch waits, step start times and CUDA memory."""
    from yolo_resume import trainer as tr

    sync, memory = _cuda_tools(spec["device"])
    extra: dict = {"loader_waits": [], "step_starts": [], "gpu_memory": []}
    orig_loader, orig_epoch, orig_step = tr.Trainer._loader, tr.Trainer.train_epoch, tr.Trainer.train_step

    def _loader(self, dataset, **kwargs):
        loader = orig_loader(self, dataset, **kwargs)
        return TimedLoader(loader, extra["loader_waits"], sync) if "batch_sampler" in kwargs else loader

    def train_epoch(self):
        orig_epoch(self)
        extra["gpu_memory"].append(memory())

    def train_step(self, batch):
        extra["step_starts"].append(time.perf_counter())
        return orig_step(self, batch)

    tr.Trainer._loader, tr.Trainer.train_epoch, tr.Trainer.train_step = _loader, train_epoch, train_step
    try:
        bt._child_ours(spec)  # wraps the methods above in its own timing, trains, exits
    finally:
        Path(spec["extra_out"]).write_text(json.dumps(extra))


def child_ultra(spec: dict) -> None:
    """bench_train's timed ultralytics training on `spec['device']` with AMP and loader workers as asked,
    plus batch waits and CUDA memory."""
    from ultralytics.engine import model as umodel
    from ultralytics.engine import trainer as utrainer

    sync, memory = _cuda_tools(spec["device"])
    extra: dict = {"loader_waits": [], "gpu_memory": []}
    # The AMP self-test loads yolo26n.pt, which needs the network; AMP is on because we ask for it.
    utrainer.check_amp = lambda model: True
    orig_train = umodel.Model.train

    def wrap_loader(trainer):
        trainer.train_loader = TimedLoader(trainer.train_loader, extra["loader_waits"], sync)

    def train(self, trainer=None, **kwargs):
        kwargs.update(spec["ultra_overrides"])  # bench_train trains on CPU without AMP and workers
        self.add_callback("on_pretrain_routine_end", wrap_loader)
        self.add_callback("on_train_epoch_end", lambda t: extra["gpu_memory"].append(memory()))
        return orig_train(self, trainer=trainer, **kwargs)

    umodel.Model.train = train
    try:
        bt._child_ultra(spec)
    finally:
        Path(spec["extra_out"]).write_text(json.dumps(extra))


def child_env(spec: dict) -> None:
    import platform

    import torch

    from yolo_resume.provenance import versions
    from yolo_resume.seeding import configure_determinism
    from yolo_resume.trainer import resolve_workers, select_device

    info: dict = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["cuda_available"] = torch.cuda.is_available()
    info["devices"] = [
        {
            "name": torch.cuda.get_device_name(i),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(i))),
            "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
            "multiprocessors": torch.cuda.get_device_properties(i).multi_processor_count,
        }
        for i in range(torch.cuda.device_count())
    ]
    info["versions"] = versions()
    for mod in ("cv2", "safetensors", "pycocotools", "polars", "yolo_resume"):
        try:
            info["versions"][mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError as exc:
            info["versions"][mod] = f"missing: {exc}"
    info["torch_threads"] = torch.get_num_threads()
    device = select_device(spec["device"])
    info["train_workers_auto"] = resolve_workers(-1, device)
    before = {
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
    }
    configure_determinism(True)  # what `train.deterministic: true` (the default) switches on
    info["determinism"] = {
        "torch_defaults": before,
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "autocast_dtype": str(torch.get_autocast_dtype(device.type)) if device.type == "cuda" else None,
    }

    def conv_grad():  # a convolution's weight gradient under AMP, the kind of kernel cuDNN picks per call
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(32, 64, 3, padding=1).to(device)
        x = torch.randn(8, 32, 80, 80, device=device)
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            y = conv(x)
        (y.float() ** 2).mean().backward()
        return conv.weight.grad.detach().clone()

    info["conv_backward_repeatable"] = {"deterministic": bool(torch.equal(conv_grad(), conv_grad()))}
    configure_determinism(False)
    info["conv_backward_repeatable"]["nondeterministic"] = bool(torch.equal(conv_grad(), conv_grad()))
    Path(spec["out"]).write_text(json.dumps(info))


def child_copy(spec: dict) -> None:
    """The device-to-host copy of a real YOLOv5s training state (model, EMA, optimizer after two AMP steps):
    ours (snapshot_to_cpu: pageable) vs pinned buffers, and an async save's training stall in-process."""
    import torch
    from ultralytics.utils.torch_utils import ModelEMA

    from yolo_resume.checkpoint.format import snapshot_to_cpu
    from yolo_resume.checkpoint.manager import CheckpointManager
    from yolo_resume.config import TrainConfig
    from yolo_resume.model import build_model, compute_loss
    from yolo_resume.optim import build_optimizer
    from yolo_resume.seeding import rng_state

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    hyp = TrainConfig(optimizer="AdamW", lr0=0.001)  # what `auto` picks for short runs: two state tensors per weight
    model = build_model(spec["model"], 80, [str(i) for i in range(80)], hyp).to(device)
    ema, opt = ModelEMA(model), build_optimizer(model, hyp)
    scaler = torch.amp.GradScaler(device.type, enabled=cuda)
    b, s = spec["batch"], spec["imgsz"]
    batch = {
        "img": torch.rand(b, 3, s, s, device=device),
        "batch_idx": torch.arange(b, dtype=torch.float32, device=device),
        "cls": torch.ones(b, 1, device=device),
        "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]], device=device).repeat(b, 1),
    }

    def forward():
        with torch.autocast(device.type, enabled=cuda):
            return compute_loss(model, batch)[0]

    def step():
        scaler.scale(forward()).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        ema.update(model)

    for _ in range(2):
        step()
    sync()
    buffers = {n for n, _ in model.named_buffers()}

    def state() -> dict:
        return {
            "model": {k: v.clone() if k in buffers else v for k, v in model.state_dict().items()},
            "ema": {"weights": ema.ema.state_dict(), "updates": ema.updates},
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict(),
            "train_state": {"epoch": 1, "step_in_epoch": 3, "global_step": 7, "history": []},
            "rng": rng_state(),
        }

    def tensors(obj) -> list:
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, dict):
            return [t for v in obj.values() for t in tensors(v)]
        if isinstance(obj, (list, tuple)):
            return [t for v in obj for t in tensors(v)]
        return []

    st = state()
    on_device = [t for t in tensors({k: st[k] for k in ("model", "ema", "optimizer")}) if t.device.type == device.type]
    nbytes = sum(t.numel() * t.element_size() for t in on_device)
    out: dict = {"device": str(device), "tensors": len(on_device), "bytes": nbytes, "repeats": spec["repeats"]}

    def timed(fn) -> list[float]:
        times = []
        for _ in range(spec["repeats"]):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return times

    out["pageable_snapshot_s"] = timed(lambda: snapshot_to_cpu(st))  # what a save does today
    if cuda:
        pinned = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in on_device]

        def to_pinned(dst):
            for src, d in zip(on_device, dst, strict=True):
                d.copy_(src, non_blocking=True)

        out["pinned_preallocated_s"] = timed(lambda: to_pinned(pinned))
        out["pinned_fresh_s"] = timed(
            lambda: to_pinned([torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in on_device])
        )
    else:
        out["pinned"] = "not measured: no CUDA device (pinned memory is a CUDA host allocation)"
    # An async save as the trainer makes it: save(), the next forward pass, then wait for the copy.
    root = Path(spec["dir"])
    manager = CheckpointManager(root, keep_last=1, async_save=True)
    stalls, snapshots, writes = [], [], []
    for i in range(spec["repeats"]):
        sync()
        t0 = time.perf_counter()
        manager.save(state(), {"global_step": i + 1})
        call = time.perf_counter() - t0
        loss = forward()
        t1 = time.perf_counter()
        manager.wait_snapshot()
        stalls.append(call + time.perf_counter() - t1)
        loss.backward()
        opt.zero_grad(set_to_none=True)
        manager.wait()
        for result in manager.poll():
            if result.error is not None:
                raise result.error
            snapshots.append(result.snapshot_s)
            writes.append(result.write_s)
    out |= {"save_stall_s": stalls, "save_snapshot_s": snapshots, "save_commit_s": writes}
    shutil.rmtree(root, ignore_errors=True)
    Path(spec["out"]).write_text(json.dumps(out))


def child_diff(spec: dict) -> None:
    """How much two checkpoints differ, per group (model, ema, optimizer)."""
    from yolo_resume.checkpoint.diff import diff_checkpoints

    report = diff_checkpoints(Path(spec["a"]), Path(spec["b"]))
    groups: dict = {}
    for t in report.tensors:
        g = groups.setdefault(t.name.split(".")[0], {"tensors_differing": 0, "elements_differing": 0, "max_abs": 0.0})
        g["tensors_differing"] += 1
        g["elements_differing"] += t.n_diff
        g["max_abs"] = max(g["max_abs"], t.max_abs)
    top = [
        {"tensor": t.name, "max_abs": t.max_abs, "mean_abs": t.mean_abs, "frac": t.frac_diff} for t in report.tensors
    ]
    Path(spec["out"]).write_text(json.dumps({"equal_tensors": report.equal, "groups": groups, "largest": top[:5]}))


CHILDREN = {"ours": child_ours, "ultra": child_ultra, "env": child_env, "copy": child_copy, "diff": child_diff}


# -- the parent: GPU sampling, child runs, stages ----------------------------------------------------------
class GpuSampler:
    """GPU utilisation (%) and memory used, every 0.1 s, through NVML (nvidia-ml-py), else `nvidia-smi -lms`.
    Timestamps are perf_counter (CLOCK_MONOTONIC), the clock the children time their epochs with."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.source, self.samples = interval, None, []
        self._nvml = self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml, self._handle, self.source = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0), "nvml"
        except Exception:
            if shutil.which("nvidia-smi"):
                self.source = "nvidia-smi"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._smi: subprocess.Popen | None = None

    def start(self) -> GpuSampler:
        self.samples, self._stop = [], threading.Event()
        if self.source == "nvml":
            self._thread = threading.Thread(target=self._poll_nvml, daemon=True)
        elif self.source == "nvidia-smi":
            query = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
            self._smi = subprocess.Popen(
                [*query, f"-lms={int(self.interval * 1000)}"], stdout=subprocess.PIPE, text=True
            )
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        if self._thread:
            self._thread.start()
        return self

    def _poll_nvml(self) -> None:
        while not self._stop.is_set():
            util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu
            mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used
            self.samples.append((time.perf_counter(), float(util), int(mem)))
            self._stop.wait(self.interval)

    def _read_smi(self) -> None:
        for line in self._smi.stdout:
            try:
                util, mem = (float(x) for x in line.split(",")[:2])
            except ValueError:
                continue
            self.samples.append((time.perf_counter(), util, int(mem * MIB)))

    def stop(self) -> list:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            self._smi.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return list(self.samples)

    @staticmethod
    def window(samples: list, t0: float, t1: float) -> dict:
        inside = [s for s in samples if t0 <= s[0] <= t1]
        if not inside:
            return {"util_mean_pct": None, "samples": 0}
        return {"util_mean_pct": statistics.fmean(s[1] for s in inside), "samples": len(inside)}


class Stage:
    def __init__(self, name: str, title: str, budget_s: float):
        self.name, self.title, self.budget_s = name, title, budget_s
        self.deadline = time.monotonic() + budget_s
        self.result: dict = {}

    def left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise StageTimeout(f"stage budget of {self.budget_s:.0f} s used up")
        return left


class Check:
    """State shared by the stages: the mode, scratch folder, child environment, dataset and stage-3 runs."""

    def __init__(self, mode: dict, work: Path, out: Path, wheels: Path, seed: int):
        self.mode, self.work, self.out, self.wheels, self.seed = mode, work, out, wheels, seed
        self.smoke, self.t0 = mode["name"] == "cpu-smoke", time.monotonic()
        self.env = bt.child_env(work)
        self.env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        if mode["threads"]:
            self.env["OMP_NUM_THREADS"] = str(mode["threads"])
        self.gpu = GpuSampler() if not self.smoke else None
        self.data_yaml: Path | None = None
        self.runs: dict[str, dict] = {}  # stage 3: "ours-32" -> summary
        self.report: dict = {
            "tool": "scripts/gpu_check.py",
            "mode": mode["name"],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": bt.machine(),
            "params": {k: v for k, v in mode.items() if k != "name"},
            "stages": [],
        }

    def device_for_ultralytics(self) -> str:
        return "0" if self.mode["device"].startswith("cuda") else "cpu"

    def write_report(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "report.json").write_text(json.dumps(self.report, indent=2, default=str) + "\n")
        (self.out / "report.md").write_text(render_markdown(self.report))


def run_stage(check: Check, name: str, title: str, fn) -> None:
    stage = Stage(name, title, check.mode["budgets"][name])
    log(f"stage {name}: start (budget {stage.budget_s:.0f} s)")
    start, status, error = time.monotonic(), "ok", None
    try:
        fn(check, stage)
    except StageTimeout as exc:
        status, error = "timeout", str(exc)
    except Exception as exc:
        status = "failed"
        error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        stderr = getattr(exc, "stderr", None)
        if stderr:
            error += "\n" + (stderr.decode(errors="replace") if isinstance(stderr, bytes) else stderr)[-3000:]
        error += "\n" + "".join(traceback.format_tb(exc.__traceback__)[-3:])
    record = {"name": name, "title": title, "status": status, "seconds": round(time.monotonic() - start, 1)}
    record |= {"budget_s": stage.budget_s, "result": stage.result, "error": error}
    check.report["stages"].append(record)
    check.report["elapsed_s"] = round(time.monotonic() - check.t0, 1)
    check.write_report()
    log(f"stage {name}: {status} in {record['seconds']} s" + (f": {error.splitlines()[0]}" if error else ""))


def child_run(check: Check, stage: Stage, kind: str, tag: str, spec: dict) -> tuple[dict, dict, dict, list]:
    """Run one child to completion inside the stage budget: (its record, extras, process stats, GPU samples)."""
    folder = check.work / "children"
    folder.mkdir(parents=True, exist_ok=True)
    spec |= {"out": str(folder / f"{tag}.json"), "extra_out": str(folder / f"{tag}.extra.json")}
    spec_path = folder / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(spec_path)]
    sampler = check.gpu.start() if check.gpu and check.gpu.source else None
    budget = stage.left()
    try:
        proc = bt.run_child(cmd, check.env, folder / f"{tag}.log", timeout=budget)
    except RuntimeError:
        if stage.deadline - time.monotonic() <= 0:
            raise StageTimeout(f"{tag} killed at the end of the stage budget ({stage.budget_s:.0f} s)") from None
        raise
    finally:
        samples = sampler.stop() if sampler else []
    extra_path = Path(spec["extra_out"])
    extra = json.loads(extra_path.read_text()) if extra_path.exists() else {}
    return json.loads(Path(spec["out"]).read_text()), extra, proc, samples


# -- stage 0: install -------------------------------------------------------------------------------------
def stage_install(check: Check, stage: Stage) -> None:
    wheels = sorted(check.wheels.glob("*.whl")) if check.wheels.is_dir() else []
    names = sorted({wheel_dist(w)[0] for w in wheels} | {canonical(d) for d in WHEEL_DISTS} | {"torch"})
    before = probe(check.env, "versions", names, stage.left())
    todo, refused = wheels_to_install(wheels, before["versions"])
    r = stage.result
    r |= {"wheel_folder": str(check.wheels), "wheels": [w.name for w in wheels], "refused": refused}
    r["installed_before"] = before["versions"]
    missing = [d for d in WHEEL_DISTS if not before["versions"].get(canonical(d))]
    if todo:
        site = check.work / "site"
        cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(check.wheels), "--no-deps"]
        cmd += ["--no-compile", "--disable-pip-version-check", "--quiet", "--target", str(site), *map(str, todo)]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=stage.left())
        check.env["PYTHONPATH"] = os.pathsep.join([str(site), check.env["PYTHONPATH"]])
        r["installed"] = [w.name for w in todo]
        r["target"] = str(site)
    elif missing:
        raise RuntimeError(
            f"missing {', '.join(missing)} and no wheels for them in {check.wheels}: run `make gpu-wheels` where "
            "there is network and carry gpu-wheels/ along"
        )
    else:
        r["installed"] = []
    after = probe(check.env, "imports", names, stage.left())
    r["imports"] = after["imports"]
    r["ultralytics_requirements_missing"] = after.get("ultralytics_requirements_missing")
    r["torch_unchanged"] = after["torch_location"] == before["torch_location"] and (
        after["versions"].get("torch") == before["versions"].get("torch")
    )
    failed = [m for m, v in after["imports"].items() if not v["ok"]]
    if failed or not r["torch_unchanged"]:
        raise RuntimeError(f"after the install: imports failing {failed}, torch unchanged: {r['torch_unchanged']}")


# -- stage 1: environment ---------------------------------------------------------------------------------
def stage_environment(check: Check, stage: Stage) -> None:
    info, _, _, _ = child_run(check, stage, "env", "env", {"device": check.mode["device"]})
    stage.result |= info
    stage.result["cpus"] = os.cpu_count()
    stage.result["dev_shm_free_gib"] = round(shm_free() / 2**30, 1) if shm_free() is not None else None
    stage.result["gpu_sampler"] = check.gpu.source if check.gpu else None
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,clocks.max.sm,power.limit,compute_mode"
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=min(20, stage.left()),
        )
        stage.result["nvidia_smi"] = dict(
            zip(query.split(","), (x.strip() for x in out.stdout.split(",")), strict=False)
        )
        stage.result["driver"] = stage.result["nvidia_smi"].get("driver_version")
    if not check.smoke and not info.get("cuda_available"):
        raise RuntimeError("torch sees no CUDA device (run with --cpu-smoke on a machine without a GPU)")


# -- data -------------------------------------------------------------------------------------------------
def crop_label_line(line: str, size: int, height: int) -> str | None:
    """A YOLO label line of a size x size image, for its centre crop of size x height; None when the object
    keeps less than 60% of its height in the crop."""
    c, cx, cy, w, h = line.split()
    off = (size - height) / 2
    y1, y2 = (float(cy) - float(h) / 2) * size - off, (float(cy) + float(h) / 2) * size - off
    c1, c2 = max(y1, 0.0), min(y2, float(height))
    if c2 - c1 < max(2.0, 0.6 * (y2 - y1)):
        return None
    return f"{c} {cx} {(c1 + c2) / 2 / height:.6f} {w} {(c2 - c1) / height:.6f}"


def _crop_one(args: tuple) -> int:
    import cv2

    src_img, src_lbl, dst_img, dst_lbl, size, height = args
    img = cv2.imread(str(src_img))
    off = (size - height) // 2
    cv2.imwrite(str(dst_img), img[off : off + height], [cv2.IMWRITE_JPEG_QUALITY, 90])
    lines = [crop_label_line(ln, size, height) for ln in Path(src_lbl).read_text().splitlines() if ln.strip()]
    Path(dst_lbl).write_text("".join(f"{ln}\n" for ln in lines if ln))
    return Path(dst_img).stat().st_size


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def stage_data(check: Check, stage: Stage) -> None:
    d = check.mode["data"]
    t0 = time.monotonic()
    square_yaml = bt.prepare_dataset(check.work, check.env, d["num_train"], d["num_val"], d["size"])
    stage.result["synth_and_export_s"] = round(time.monotonic() - t0, 1)
    stage.left()
    square = square_yaml.parent
    rect = check.work / f"rect-{d['size']}x{d['height']}"
    shutil.rmtree(rect, ignore_errors=True)
    jobs = []
    for split in ("train", "val"):
        (rect / "images" / split).mkdir(parents=True)
        (rect / "labels" / split).mkdir(parents=True)
        for img in sorted((square / "images" / split).iterdir()):
            lbl = square / "labels" / split / f"{img.stem}.txt"
            dst = rect / "images" / split / f"{img.stem}.jpg"
            jobs.append((img, lbl, dst, rect / "labels" / split / f"{img.stem}.txt", d["size"], d["height"]))
    t0 = time.monotonic()
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(spare_cores(), 16)) as pool:
        sizes = list(pool.map(_crop_one, jobs, chunksize=8))
    stage.result["crop_to_jpeg_s"] = round(time.monotonic() - t0, 1)
    unique = sorted((rect / "images" / "train").glob("*.jpg"))
    for k in range(1, d["replicas"]):  # the same images again under other names: longer epochs, no new pixels
        for img in unique:
            _link(img, img.with_name(f"{img.stem}_r{k}.jpg"))
            lbl = rect / "labels" / "train" / f"{img.stem}.txt"
            _link(lbl, lbl.with_name(f"{img.stem}_r{k}.txt"))
    names = yaml.safe_load(square_yaml.read_text())["names"]
    subset = unique[: check.mode["resume"]["images"]]
    (rect / "resume_train.txt").write_text("".join(f"images/train/{p.name}\n" for p in subset))
    data_yaml = rect / "data.yaml"
    data_yaml.write_text(
        yaml.safe_dump({"path": str(rect), "train": "images/train", "val": "images/val", "names": names})
    )
    check.data_yaml = data_yaml
    boxes = sum(len((rect / "labels" / "train" / f"{p.stem}.txt").read_text().splitlines()) for p in unique)
    stage.result |= {
        "dataset": str(rect),
        "image_size": f"{d['size']}x{d['height']}",
        "unique_train_images": len(unique),
        "train_entries": len(unique) * d["replicas"],
        "val_images": d["num_val"],
        "train_boxes": boxes,
        "jpeg_bytes_mean": round(statistics.fmean(sizes)),
        "resume_train_images": len(subset),
    }


# -- stage 2: resume --------------------------------------------------------------------------------------
def step_rows(run: Path) -> list[list[str]]:
    try:
        with open(run / "steps.csv", newline="") as f:
            return [r for r in list(csv.reader(f))[1:] if r and r[0].isdigit()]
    except OSError:
        return []


def committed_steps(run: Path) -> list[int]:
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in folder.iterdir() if re.fullmatch(r"ckpt-\d{9,}", p.name) and p.is_dir())


def compare_steps(a: list[list[str]], b: list[list[str]]) -> dict:
    """steps.csv of two runs: equal, the first differing step, the largest loss and LR differences."""
    out: dict = {"rows": [len(a), len(b)], "equal": a == b, "rows_differing": 0, "first_differing_step": None}
    out["max_abs_diff"] = {"lr": 0.0, "box_loss": 0.0, "cls_loss": 0.0, "dfl_loss": 0.0}
    for ra, rb in zip(a, b, strict=False):
        if ra == rb:
            continue
        out["rows_differing"] += 1
        if out["first_differing_step"] is None:
            out["first_differing_step"] = int(ra[0])
        for i, key in enumerate(out["max_abs_diff"], start=3):
            out["max_abs_diff"][key] = max(out["max_abs_diff"][key], abs(float(ra[i]) - float(rb[i])))
    return out


LIVE: set[subprocess.Popen] = set()  # training processes of the resume stage, killed if the check dies


class Lane:
    """One `yolo-resume train` run folder, driven through fresh processes."""

    def __init__(self, check: Check, stage: Stage, run: Path, config: Path):
        self.check, self.stage, self.run, self.config = check, stage, run, config
        self.segments = 0

    def start(self, resume: bool) -> subprocess.Popen:
        args = ["--resume"] if resume else ["--config", str(self.config)]
        cmd = [sys.executable, "-m", "yolo_resume", "train", *args, "--run-dir", str(self.run), "-q"]
        self.segments += 1
        with open(self.run.parent / f"{self.run.name}-segment{self.segments}.log", "wb") as log_file:
            proc = subprocess.Popen(
                cmd, cwd=REPO, env=self.check.env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
            )
        LIVE.add(proc)
        return proc

    @staticmethod
    def kill(proc: subprocess.Popen) -> None:
        """SIGKILL the run and its data-loader workers (its own process group)."""
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        LIVE.discard(proc)

    def finish(self, proc: subprocess.Popen) -> None:
        try:
            rc = proc.wait(timeout=self.stage.left())
        except subprocess.TimeoutExpired:
            self.kill(proc)
            raise StageTimeout(f"{self.run.name} still training at the end of the stage budget") from None
        LIVE.discard(proc)
        if rc != 0:
            tail = (self.run.parent / f"{self.run.name}-segment{self.segments}.log").read_text(errors="replace")
            raise RuntimeError(f"{self.run.name}: `yolo-resume train` exited {rc}:\n{tail[-3000:]}")

    def wait_for_step(self, proc: subprocess.Popen, target: int) -> int | None:
        """Block until steps.csv reaches `target` and a checkpoint is committed; None if the run ended first."""
        while True:
            rows = step_rows(self.run)
            if rows and int(rows[-1][0]) >= target and committed_steps(self.run):
                return int(rows[-1][0])
            if proc.poll() is not None:
                return None
            if self.stage.deadline - time.monotonic() <= 0:
                self.kill(proc)
                raise StageTimeout(f"{self.run.name} did not reach step {target} within the stage budget")
            time.sleep(0.01)

    def straight(self) -> dict:
        t0 = time.monotonic()
        self.finish(self.start(resume=False))
        return {"wall_s": round(time.monotonic() - t0, 1)}

    def killed(self, total: int, every: int, rng: random.Random, kills: int) -> dict:
        """The same run, SIGKILLed (its whole process group) at random steps and resumed with --resume."""
        t0, done = time.monotonic(), []
        proc, last = self.start(resume=False), 0
        for _ in range(kills):
            lo, hi = max(every + 1, last + 2), (total // 2 if not done else total - 2)
            if lo > hi:
                break
            target = rng.randint(lo, hi)
            if self.wait_for_step(proc, target) is None:
                break
            time.sleep(rng.uniform(0, 0.3))  # anywhere: mid-step, mid-save, between steps
            self.kill(proc)
            rows = step_rows(self.run)
            last = int(rows[-1][0]) if rows else 0
            newest = committed_steps(self.run)
            done.append({"target_step": target, "last_logged_step": last, "newest_checkpoint_step": newest[-1]})
            proc = self.start(resume=True)
        self.finish(proc)
        return {"kills": done, "segments": self.segments, "wall_s": round(time.monotonic() - t0, 1)}

    def final_meta(self, total: int) -> dict:
        ckpt = self.run / "checkpoints" / f"ckpt-{total:09d}"
        out = subprocess.run(
            [sys.executable, "-m", "yolo_resume", "ckpt", "show", "--json", str(ckpt)],
            cwd=REPO,
            env=self.check.env,
            capture_output=True,
            text=True,
            timeout=self.stage.left(),
        )
        if out.returncode != 0:
            raise RuntimeError(f"`yolo-resume ckpt show --json {ckpt}` exited {out.returncode}: {out.stderr[-2000:]}")
        return json.JSONDecoder().raw_decode(out.stdout[out.stdout.index("{") :])[0]


def resume_protocol(check: Check, stage: Stage, deterministic: bool, seed: int) -> dict:
    """The straight and the killed run of one determinism setting, side by side, then compared."""
    p = check.mode["resume"]
    tag = "det" if deterministic else "nondet"
    folder = check.work / "resume" / tag
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    overrides = {
        "model.cfg": p["model"],
        "data.train": "resume_train.txt",
        "train.nbs": p["nbs"],
        "train.device": check.mode["device"],
        "train.deterministic": deterministic,
        "train.amp": True,
        "eval.every_epochs": p["epochs"],  # validated after the last epoch only
        "ckpt.every_steps": p["every_steps"],
    }
    workers = 0 if check.smoke else loader_workers(p["batch"], p["imgsz"], processes=p["lanes"])
    config = bt.our_config(folder / "config.yaml", check.data_yaml, p, workers, **overrides)
    total = p["epochs"] * (p["images"] // p["batch"])
    straight, killed = Lane(check, stage, folder / "straight", config), Lane(check, stage, folder / "killed", config)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        fut_s = pool.submit(straight.straight)
        kills = p["kills"]["deterministic" if deterministic else "nondeterministic"]
        fut_k = pool.submit(killed.killed, total, p["every_steps"], random.Random(seed), kills)
        res = {"deterministic": deterministic, "total_steps": total, "straight": fut_s.result(), **fut_k.result()}
        meta_s, meta_k = pool.submit(straight.final_meta, total), pool.submit(killed.final_meta, total)
        meta_s, meta_k = meta_s.result(), meta_k.result()
    res["digests_straight"], res["digests_resumed"] = meta_s["digests"], meta_k["digests"]
    res["equal"] = {g: meta_s["digests"].get(g) == meta_k["digests"].get(g) for g in ("model", "ema", "optimizer")}
    res["steps_csv"] = compare_steps(step_rows(straight.run), step_rows(killed.run))
    res["lineage"] = [e.get("previous_segment_ended") for e in meta_k.get("lineage") or []]
    res["metrics"] = {"straight": meta_s.get("metrics"), "resumed": meta_k.get("metrics")}
    if not all(res["equal"].values()):
        spec = {"a": str(straight.run / "checkpoints" / f"ckpt-{total:09d}")}
        spec["b"] = str(killed.run / "checkpoints" / f"ckpt-{total:09d}")
        res["tensor_diff"], _, _, _ = child_run(check, stage, "diff", f"diff-{tag}", spec)
    return res


def stage_resume(check: Check, stage: Stage) -> None:
    rng = random.Random(check.seed)
    p = check.mode["resume"]
    stage.result["config"] = {k: p[k] for k in ("model", "imgsz", "batch", "nbs", "epochs", "every_steps")}
    stage.result["config"] |= {"amp": True, "device": check.mode["device"], "train_images": p["images"]}
    seeds = {True: rng.randrange(2**31), False: rng.randrange(2**31)}

    def protocol(deterministic: bool) -> None:
        key = "deterministic" if deterministic else "nondeterministic"
        r = stage.result[key] = resume_protocol(check, stage, deterministic, seeds[deterministic])
        log(f"  resume {key}: equal {r['equal']}, steps.csv equal {r['steps_csv']['equal']}, kills {len(r['kills'])}")

    # Two lanes (straight, killed) per setting; with 4 lanes both settings run at once (GPU), else one by one.
    with concurrent.futures.ThreadPoolExecutor(max_workers=2 if p["lanes"] >= 4 else 1) as pool:
        for fut in [pool.submit(protocol, det) for det in (True, False)]:
            fut.result()
    for key, wanted in p["kills"].items():
        if len(stage.result[key]["kills"]) < wanted:
            raise RuntimeError(
                f"{key}: {len(stage.result[key]['kills'])} of {wanted} SIGKILLs landed before the run ended"
            )
    det = stage.result["deterministic"]
    if not (all(det["equal"].values()) and det["steps_csv"]["equal"]):
        raise RuntimeError(f"deterministic resume is not bitwise exact: {det['equal']}, steps.csv {det['steps_csv']}")


# -- stage 3: throughput ----------------------------------------------------------------------------------
def training_run(check: Check, stage: Stage, tool: str, tag: str, p: dict, workers: int, overrides=None) -> dict:
    """One timed training run (bench_train's children on this mode's device), summarised."""
    run_dir = check.work / "runs" / tag
    shutil.rmtree(run_dir, ignore_errors=True)
    spec = {"run_dir": str(run_dir), "params": p, "data": str(check.data_yaml), "threads": check.mode["threads"]}
    spec["device"] = check.mode["device"]
    if tool == "yolo-resume":
        over = {"train.device": check.mode["device"], "train.amp": True} | (overrides or {})
        spec["config"] = str(bt.our_config(check.work / f"{tag}.yaml", check.data_yaml, p, workers, **over))
        kind = "ours"
    else:
        spec["ultra_overrides"] = {"device": check.device_for_ultralytics(), "workers": workers, "amp": not check.smoke}
        kind = "ultra"
    rec, extra, proc, samples = child_run(check, stage, kind, tag, spec)
    summary = bt.summarize_run(tool, rec, proc, run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    epochs = rec["epochs"]
    summary["workers"] = workers
    summary["epochs_timed"] = [{"s": e["s"], "images": e["images"], "batches": e["batches"]} for e in epochs]
    waits = extra.get("loader_waits", [])
    if len(waits) == len(epochs):
        steady = [w for ws in waits[1:] for w in ws]
        span = sum(e["s"] for e in epochs[1:])
        summary["loader_wait_s"] = sum(steady)
        summary["loader_wait_frac"] = sum(steady) / span if span else None
        summary["first_batch_wait_s"] = median([ws[0] for ws in waits[1:] if ws])
    summary["gpu_memory"] = extra.get("gpu_memory", [])[-1] if extra.get("gpu_memory") else None
    summary["gpu_memory_max_allocated"] = max(
        (m["max_allocated"] for m in extra.get("gpu_memory") or [] if m), default=None
    )
    summary["gpu_memory_max_reserved"] = max(
        (m["max_reserved"] for m in extra.get("gpu_memory") or [] if m), default=None
    )
    if samples:
        t0, t1 = epochs[1]["t0"], epochs[-1]["t0"] + epochs[-1]["s"]
        summary["gpu"] = GpuSampler.window(samples, t0, t1)
        summary["gpu"]["mem_used_peak"] = max(s[2] for s in samples)
        summary["gpu"]["mem_used_before"] = samples[0][2]
    summary["step_starts"] = extra.get("step_starts")
    return summary


THROUGHPUT_KEYS = ("img_per_s", "img_per_s_cycle", "loader_wait_frac", "ckpt_stall_per_save_s")


def stage_throughput(check: Check, stage: Stage) -> None:
    p = check.mode["throughput"]
    workers = 0 if check.smoke else loader_workers(max(p["batches"]), p["imgsz"])
    stage.result["config"] = p | {"workers": workers, "amp": not check.smoke, "device": check.mode["device"]}
    stage.result["runs"], stage.result["ratios"] = {}, {}
    for i, batch in enumerate(p["batches"]):
        params = {"imgsz": p["imgsz"], "epochs": p["epochs"], "batch": batch}
        order = ("yolo-resume", "ultralytics") if i % 2 == 0 else ("ultralytics", "yolo-resume")
        for tool in order:
            tag = f"{'ours' if tool == 'yolo-resume' else 'ultra'}-{batch}"
            s = training_run(check, stage, tool, tag, params, workers)
            s.pop("step_starts", None)
            s["ckpt_stall_per_save_s"] = median(s["ckpt_stall_s"])
            check.runs[tag] = stage.result["runs"][tag] = s
            log(f"  {tag}: {s['img_per_s']:.1f} img/s (epochs 2+), loader wait {s.get('loader_wait_frac') or 0:.0%}")
        ours, ultra = check.runs[f"ours-{batch}"], check.runs[f"ultra-{batch}"]
        stage.result["ratios"][str(batch)] = {k: ratio(ours.get(k), ultra.get(k)) for k in THROUGHPUT_KEYS}


# -- stage 4: checkpoint cost -----------------------------------------------------------------------------
def stage_checkpoint(check: Check, stage: Stage) -> None:
    p, r = check.mode["checkpoint"], stage.result
    first = check.mode["throughput"]["batches"][0]
    if f"ours-{first}" in check.runs and f"ultra-{first}" in check.runs:
        ours, ultra = check.runs[f"ours-{first}"], check.runs[f"ultra-{first}"]
        r["stall_per_save_vs_ultralytics"] = {
            "batch": first,
            "ours_s": ours["ckpt_stall_per_save_s"],
            "ours_snapshot_s": median(ours.get("ckpt_snapshot_s", [])),
            "ours_commit_s": median(ours.get("ckpt_write_s", [])),
            "ultralytics_save_model_s": ultra["ckpt_stall_per_save_s"],
            "ratio": ratio(ours["ckpt_stall_per_save_s"], ultra["ckpt_stall_per_save_s"]),
        }
    else:
        r["stall_per_save_vs_ultralytics"] = "stage 3 has no runs at the first batch size"
    spec = {"device": check.mode["device"], "model": p["model"], "imgsz": p["imgsz"], "batch": p["copy_batch"]}
    spec |= {"repeats": p["repeats"], "threads": check.mode["threads"], "dir": str(check.work / "copy-ckpt")}
    copy, _, _, _ = child_run(check, stage, "copy", "copy", spec)
    for name in ("pageable_snapshot", "pinned_preallocated", "pinned_fresh", "save_stall"):
        if f"{name}_s" in copy:
            copy[f"{name}_median_s"] = median(copy[f"{name}_s"])
            if name != "save_stall":
                copy[f"{name}_gb_per_s"] = copy["bytes"] / copy[f"{name}_median_s"] / 1e9
    r["device_to_host"] = copy
    # The same run with a checkpoint every N steps and with none but the last one.
    params = {"imgsz": p["imgsz"], "epochs": p["epochs"], "batch": p["batch"]}
    workers = 0 if check.smoke else loader_workers(p["batch"], p["imgsz"])
    runs = {}
    for every in (p["every_steps"], 0):
        over = {"model.cfg": p["model"], "ckpt.every_epochs": 0, "ckpt.every_steps": every}
        runs[every] = training_run(check, stage, "yolo-resume", f"ckpt-every-{every}", params, workers, over)
    steps_per_epoch = runs[0]["epochs_timed"][0]["batches"]

    def cycles(s: dict) -> list[float]:
        starts = s["step_starts"][steps_per_epoch:]  # after the first epoch
        return [b - a for a, b in zip(starts, starts[1:], strict=False)]

    with_saves, without = cycles(runs[p["every_steps"]]), cycles(runs[0])
    saves = runs[p["every_steps"]]
    mean_with, mean_without = statistics.fmean(with_saves), statistics.fmean(without)
    per_save = median(saves["ckpt_stall_s"])
    r["step_overhead"] = {
        "every_steps": p["every_steps"],
        "batch": p["batch"],
        "steps": len(saves["step_starts"]),
        "saves": len(saves["ckpt_stall_s"]),
        "mean_step_s_with_saves": mean_with,
        "mean_step_s_without": mean_without,
        "median_step_s_without": median(without),
        "overhead_pct_measured": 100 * (mean_with - mean_without) / mean_without,
        "stall_per_save_s": per_save,
        "overhead_pct_accounted": 100 * per_save / (p["every_steps"] * median(without)),
        "target_pct": 1.0,
    }


# -- stage 5: memory --------------------------------------------------------------------------------------
def stage_memory(check: Check, stage: Stage) -> None:
    rows = {}
    for batch in check.mode["throughput"]["batches"]:
        ours, ultra = check.runs.get(f"ours-{batch}"), check.runs.get(f"ultra-{batch}")
        if not ours or not ultra:
            rows[str(batch)] = "stage 3 has no pair of runs at this batch"
            continue
        row = {}
        for key in ("gpu_memory_max_allocated", "gpu_memory_max_reserved", "peak_tree_rss"):
            if ours.get(key) is None and ultra.get(key) is None:
                continue
            row[key] = {
                "ours": ours.get(key),
                "ultralytics": ultra.get(key),
                "ratio": ratio(ours.get(key), ultra.get(key)),
            }
        if ours.get("gpu") and ultra.get("gpu"):
            o = ours["gpu"]["mem_used_peak"] - ours["gpu"]["mem_used_before"]
            u = ultra["gpu"]["mem_used_peak"] - ultra["gpu"]["mem_used_before"]
            row["nvml_used_peak_minus_idle"] = {"ours": o, "ultralytics": u, "ratio": ratio(o, u)}
        rows[str(batch)] = row
    stage.result["by_batch"] = rows
    stage.result["note"] = (
        "torch's peak allocated/reserved bytes over the training epochs (ultralytics' final validation excluded), "
        "and the device-wide memory in use as NVML saw it (CUDA context included)"
        if not check.smoke
        else "no CUDA device in --cpu-smoke: GPU memory is not measured; peak RSS of the process tree stands in"
    )
    if not any(isinstance(v, dict) for v in rows.values()):
        raise RuntimeError("stage 3 produced no pair of runs to compare")


STAGE_FUNCS = {
    "install": stage_install,
    "environment": stage_environment,
    "data": stage_data,
    "resume": stage_resume,
    "throughput": stage_throughput,
    "checkpoint": stage_checkpoint,
    "memory": stage_memory,
}
NEEDS_DATA = ("resume", "throughput", "checkpoint")


def selected_stages(only: str | None) -> set[str]:
    """The stages to run: all, or those named plus what they need (install and data for the training stages,
    throughput for memory, which reads its runs)."""
    names = {name for name, _ in STAGES}
    if not only:
        return names
    chosen = {n.strip() for n in only.split(",") if n.strip()}
    if chosen - names:
        raise ValueError(f"unknown stage(s) {sorted(chosen - names)}; stages: {', '.join(n for n, _ in STAGES)}")
    if "memory" in chosen:
        chosen.add("throughput")
    if chosen & set(NEEDS_DATA):
        chosen |= {"install", "data"}
    return chosen


# -- markdown ---------------------------------------------------------------------------------------------
def _f(value, fmt: str = "{:.3g}", none: str = "-") -> str:
    if value is None or isinstance(value, str):
        return value or none
    return fmt.format(value)


def _ms(s) -> str:
    return _f(s * 1e3 if isinstance(s, (int, float)) else s, "{:.1f} ms")


def _mib(n) -> str:
    return _f(n / MIB if isinstance(n, (int, float)) else n, "{:.0f} MiB")


def _pct(x) -> str:
    return _f(x * 100 if isinstance(x, (int, float)) else x, "{:.1f}%")


def _x(x) -> str:
    return _f(x, "{:.2f}")


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(*header: str) -> list[str]:
    return [_row(*header), _row(*["---"] * len(header))]


def md_install(r: dict) -> list[str]:
    imports = r.get("imports") or {}
    failing = [f"{m} ({v.get('error')})" for m, v in imports.items() if not v.get("ok")]
    return [
        f"- wheels in `{r.get('wheel_folder')}`: {len(r.get('wheels') or [])}; installed: "
        f"{', '.join(r.get('installed') or []) or 'none needed'}; refused: "
        f"{', '.join(r.get('refused') or []) or 'none'}",
        f"- imports: {'all ok' if imports and not failing else ', '.join(failing) or 'not checked'}; "
        f"torch unchanged: {r.get('torch_unchanged')}; ultralytics requirements not installed: "
        f"{r.get('ultralytics_requirements_missing')}",
    ]


def md_data(r: dict) -> list[str]:
    return [
        f"- {r.get('unique_train_images')} train images ({r.get('train_entries')} entries per epoch as hard links), "
        f"{r.get('val_images')} val, {r.get('image_size')} JPEG (mean {r.get('jpeg_bytes_mean')} bytes), "
        f"{r.get('train_boxes')} train boxes; synth + YOLO export {r.get('synth_and_export_s')} s, crop to JPEG "
        f"{r.get('crop_to_jpeg_s')} s; the resume stage trains on the first {r.get('resume_train_images')}",
    ]


def md_environment(r: dict) -> list[str]:
    dev = (r.get("devices") or [{}])[0]
    det, v = r.get("determinism", {}), r.get("versions", {})
    conv = r.get("conv_backward_repeatable", {})
    tf32 = f"{det.get('cuda_matmul_allow_tf32')} / {det.get('cudnn_allow_tf32')}"
    rows = [
        ("GPU", f"{dev.get('name', '-')} ({dev.get('memory_gib', '-')} GiB, sm {dev.get('capability', '-')})"),
        ("driver", r.get("driver") or "-"),
        ("CUDA (torch build) / cuDNN", f"{r.get('torch_cuda')} / {r.get('cudnn')}"),
        ("torch / ultralytics / python", f"{r.get('torch')} / {v.get('ultralytics')} / {r.get('python')}"),
        (
            "CPUs / torch threads / free /dev/shm",
            f"{r.get('cpus')} / {r.get('torch_threads')} / {r.get('dev_shm_free_gib')} GiB",
        ),
        ("train.workers auto", r.get("train_workers_auto")),
        ("deterministic algorithms (warn only)", f"{det.get('deterministic_algorithms')} ({det.get('warn_only')})"),
        ("cuDNN deterministic / benchmark", f"{det.get('cudnn_deterministic')} / {det.get('cudnn_benchmark')}"),
        ("CUBLAS_WORKSPACE_CONFIG", det.get("CUBLAS_WORKSPACE_CONFIG")),
        ("TF32 matmul / cuDNN", tf32),
        ("fp32 matmul precision", det.get("float32_matmul_precision")),
        ("AMP dtype", det.get("autocast_dtype")),
        (
            "AMP conv backward repeatable (deterministic / not)",
            f"{conv.get('deterministic')} / {conv.get('nondeterministic')}",
        ),
        ("GPU sampler", r.get("gpu_sampler")),
    ]
    return _table("item", "value") + [_row(a, b) for a, b in rows]


def md_resume(r: dict) -> list[str]:
    head = ("train.deterministic", "kills: logged step (resumed from)", "model", "EMA", "optimizer", "steps.csv")
    lines = [f"config: {r.get('config')}", "", *_table(*head, "largest tensor difference", "largest loss difference")]
    for key in ("deterministic", "nondeterministic"):
        m = r.get(key)
        if not m:
            continue
        kills = ", ".join(f"{k['last_logged_step']} ({k['newest_checkpoint_step']})" for k in m["kills"]) or "none"
        same = ["equal" if m["equal"][g] else "DIFFERS" for g in ("model", "ema", "optimizer")]
        groups = (m.get("tensor_diff") or {}).get("groups", {})
        tensor = ", ".join(f"{g} {v['max_abs']:.3g} ({v['tensors_differing']} tensors)" for g, v in groups.items())
        sc = m["steps_csv"]
        loss = max(sc["max_abs_diff"][k] for k in ("box_loss", "cls_loss", "dfl_loss"))
        steps = "equal" if sc["equal"] else f"{sc['rows_differing']} rows differ from step {sc['first_differing_step']}"
        lines.append(_row(m["deterministic"], kills, *same, steps, tensor or "none", f"{loss:.3g}"))
    return lines


def md_throughput(r: dict) -> list[str]:
    lines = [f"config: {r.get('config')}", ""]
    runs = r.get("runs", {})
    for batch in (r.get("config") or {}).get("batches", []):
        o, u = runs.get(f"ours-{batch}"), runs.get(f"ultra-{batch}")
        if not o or not u:
            lines += [f"batch {batch}: incomplete", ""]
            continue
        rat = r["ratios"][str(batch)]
        og, ug = (o.get("gpu") or {}).get("util_mean_pct"), (u.get("gpu") or {}).get("util_mean_pct")
        lines += [f"**batch {batch}**", "", *_table("measure", "yolo-resume", "ultralytics", "ratio (ours / theirs)")]
        speed, cycle = (f"{x['img_per_s']:.1f}" for x in (o, u)), (f"{x['img_per_s_cycle']:.1f}" for x in (o, u))
        stall = _ms(o["ckpt_stall_per_save_s"]), _ms(u["ckpt_stall_per_save_s"]) + " (save_model)"
        lines += [
            _row("images/s, training spans of epochs 2+", *speed, f"**{_x(rat['img_per_s'])}**"),
            _row("images/s, epoch cycles (saves, logs in)", *cycle, _x(rat["img_per_s_cycle"])),
            _row(
                "waiting for batches, epochs 2+", _pct(o.get("loader_wait_frac")), _pct(u.get("loader_wait_frac")), ""
            ),
            _row(
                "wait for an epoch's first batch",
                _ms(o.get("first_batch_wait_s")),
                _ms(u.get("first_batch_wait_s")),
                "",
            ),
            _row("GPU utilisation, epochs 2+", _f(og, "{:.0f}%"), _f(ug, "{:.0f}%"), ""),
            _row("training stall per checkpoint", *stall, _x(rat["ckpt_stall_per_save_s"])),
            _row("threads / workers", f"{o['threads']} / {o['workers']}", f"{u['threads']} / {u['workers']}", ""),
            "",
        ]
    return lines


def md_checkpoint(r: dict) -> list[str]:
    lines = []
    s = r.get("stall_per_save_vs_ultralytics")
    if isinstance(s, dict):
        lines.append(
            f"- stall per save at batch {s['batch']} (stage 3): ours {_ms(s['ours_s'])} (in the background: copy "
            f"{_ms(s['ours_snapshot_s'])}, commit {_ms(s['ours_commit_s'])}), ultralytics' save_model() "
            f"{_ms(s['ultralytics_save_model_s'])}: ratio {_f(s['ratio'], '{:.3f}')}"
        )
    c = r.get("device_to_host")
    if c:
        gbs = lambda key: _f(c.get(key), "{:.1f} GB/s")  # noqa: E731
        lines.append(
            f"- device-to-host copy of the state ({c['bytes'] / 1e6:.0f} MB in {c['tensors']} tensors, {c['device']}):"
        )
        lines.append(
            f"  pageable (ours, snapshot_to_cpu) {_ms(c.get('pageable_snapshot_median_s'))} "
            f"({gbs('pageable_snapshot_gb_per_s')})"
        )
        if "pinned_preallocated_median_s" in c:
            lines.append(
                f"  pinned, preallocated {_ms(c['pinned_preallocated_median_s'])} "
                f"({gbs('pinned_preallocated_gb_per_s')}); pinned, allocated per save "
                f"{_ms(c['pinned_fresh_median_s'])} ({gbs('pinned_fresh_gb_per_s')})"
            )
        else:
            lines.append(f"  pinned: {c.get('pinned')}")
        lines.append(
            f"  async save in-process: stall {_ms(c.get('save_stall_median_s'))} (save() + copy wait after a forward)"
        )
    o = r.get("step_overhead")
    if o:
        lines.append(
            f"- a checkpoint every {o['every_steps']} steps (batch {o['batch']}, {o['steps']} steps, "
            f"{o['saves']} saves): mean step {_ms(o['mean_step_s_with_saves'])} vs "
            f"{_ms(o['mean_step_s_without'])} without, "
            f"{o['overhead_pct_measured']:+.2f}% measured; stall {_ms(o['stall_per_save_s'])} per save = "
            f"{o['overhead_pct_accounted']:.2f}% of {o['every_steps']} median steps (target < {o['target_pct']:.0f}%)"
        )
    return lines


def md_memory(r: dict) -> list[str]:
    lines = [r.get("note", ""), "", *_table("batch", "measure", "yolo-resume", "ultralytics", "ratio")]
    for batch, row in (r.get("by_batch") or {}).items():
        if not isinstance(row, dict):
            lines.append(_row(batch, row, "", "", ""))
            continue
        lines += [_row(batch, key, _mib(v["ours"]), _mib(v["ultralytics"]), _x(v["ratio"])) for key, v in row.items()]
    return lines


def md_generic(r: dict) -> list[str]:
    return ["```json", json.dumps(r, indent=1, default=str)[:4000], "```"]


RENDER = {"install": md_install, "data": md_data, "environment": md_environment, "resume": md_resume}
RENDER |= {"throughput": md_throughput}
RENDER |= {"checkpoint": md_checkpoint, "memory": md_memory}


def render_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"# GPU check ({report['mode']})",
        "",
        f"{report['started']}, {m['cpu']} ({m['cpus']} CPUs, {m['mem_gib']} GiB), python {m['python']}; "
        f"{report.get('elapsed_s', 0):.0f} s in all.",
        "",
        "| stage | status | seconds (budget) |",
        "|---|---|---|",
    ]
    lines += [f"| {s['title']} | {s['status']} | {s['seconds']} ({s['budget_s']:.0f}) |" for s in report["stages"]]
    for s in report["stages"]:
        lines += ["", f"## {s['title']}: {s['status']}", ""]
        if s["error"]:
            lines += ["```", s["error"][-3000:], "```", ""]
        try:
            lines += RENDER.get(s["name"], md_generic)(s["result"])
        except Exception as exc:  # a partial result: show it raw
            lines += [f"(rendering failed: {exc})", *md_generic(s["result"])]
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------------------------
def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "runs" / "gpu-check"


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        CHILDREN[sys.argv[2]](json.loads(Path(sys.argv[3]).read_text()))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="every stage on CPU at toy size (under 3 minutes)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: $OUT, else runs/gpu-check)")
    parser.add_argument("--wheels", type=Path, default=REPO / "gpu-wheels", help="folder of `make gpu-wheels`")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the SIGKILL steps")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--only", default=None, help="comma-separated stages to run, e.g. throughput,memory")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every stage's time budget")
    parser.add_argument("--download-wheels", type=Path, default=None, metavar="DIR", help="`make gpu-wheels`: download")
    args = parser.parse_args()
    if args.download_wheels:
        return download_wheels(args.download_wheels)
    mode = copy.deepcopy(SMOKE if args.cpu_smoke else GPU)
    mode["budgets"] = {k: v * args.budget_scale for k, v in mode["budgets"].items()}
    try:
        selected = selected_stages(args.only)
    except ValueError as exc:
        parser.error(str(exc))
    global LOG_FILE
    out = (args.out or default_out()).resolve()
    out.mkdir(parents=True, exist_ok=True)
    LOG_FILE = out / "gpu_check.log"
    LOG_FILE.write_text("")
    work = (args.work or Path(tempfile.mkdtemp(prefix="gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    check = Check(mode, work, out, args.wheels.resolve(), args.seed)
    log(f"mode {check.mode['name']}, scratch {work}, report {out}")
    try:
        for name, title in STAGES:
            if name not in selected:
                continue
            if name in NEEDS_DATA and check.data_yaml is None:
                check.report["stages"].append(
                    {"name": name, "title": title, "status": "skipped", "seconds": 0.0, "budget_s": 0.0}
                    | {"result": {}, "error": "no dataset (the data stage failed)"}
                )
                check.write_report()
                continue
            run_stage(check, name, title, STAGE_FUNCS[name])
    finally:
        for proc in list(LIVE):
            Lane.kill(proc)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    check.report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    check.write_report()
    bad = [s["name"] for s in check.report["stages"] if s["status"] != "ok"]
    log(
        f"done in {check.report.get('elapsed_s', 0):.0f} s; "
        + (f"not ok: {', '.join(bad)}" if bad else "every stage ok")
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
