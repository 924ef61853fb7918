"""All benchmarks (the `make bench` entry): training throughput, memory and per-epoch checkpoint cost vs
ultralytics' own trainer (bench_train.py), resume latency (bench_resume.py) and the checkpoint stall /
commit / load micro-benchmark (bench_checkpoint.py), and accuracy over seeds (bench_accuracy.py). Every
figure is a ratio against a baseline measured in the same run; runs of the two sides are interleaved and
medians taken (accuracy: means over seeds with the spread).

Quick mode (default) takes about 5 minutes for the speed, memory and checkpoint parts, about 6 for the
dataset index (bench_data.py --quick), about 5 for the data pipeline (bench_pipeline.py) and about 25 more
for accuracy on 2 CPU cores (`--only train,resume,checkpoint` leaves accuracy out); `--full` runs bigger
images, more epochs and more repeats. Prints markdown tables to stdout; `--json OUT` writes every raw number.

Usage: python scripts/bench_all.py [--full] [--repeats N] [--only train,resume,checkpoint,data,pipeline,accuracy]
       [--dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_accuracy  # noqa: E402
import bench_resume  # noqa: E402
import bench_train  # noqa: E402
from bench_train import REPO, child_env, machine, versions  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_checkpoint_bench(work: Path, env: dict, repeats: int) -> dict:
    out = work / "checkpoint.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_checkpoint.py"), "--repeats", str(repeats)]
    cmd += ["--dir", str(work / "ckpt"), "--json", str(out)]
    subprocess.run(cmd, env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def run_accuracy_bench(work: Path, env: dict, full: bool) -> dict:
    """bench_accuracy.py in a child (it runs its own children two at a time); its result, as JSON."""
    out = work / "accuracy.json"
    cmd = [sys.executable, str(REPO / "scripts" / "bench_accuracy.py"), "--dir", str(work / "accuracy")]
    cmd += ["--json", str(out)] + (["--full"] if full else [])
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())[-1]


def run_script_output(name: str, args: list[str], env: dict) -> str:
    """A data benchmark (bench_data.py, bench_pipeline.py) in a child: its printed tables, verbatim."""
    cmd = [sys.executable, str(REPO / "scripts" / name), *args]
    done = subprocess.run(cmd, env=env, cwd=REPO, check=True, stdout=subprocess.PIPE, text=True)
    return done.stdout


def checkpoint_table(c: dict) -> str:
    m = c["median_s"]
    return "\n".join(
        [
            "| measure | ours | baseline | ratio |",
            "|---|---|---|---|",
            f"| training-thread stall per async save | {m['blocked'] * 1e3:.1f} ms "
            f"| synchronous torch.save: {m['torch_save'] * 1e3:.0f} ms | **{c['blocked_vs_torch_save']:.3f}** |",
            f"| extra wall time of a 6-step window holding one async save | "
            f"{(m['window_with'] - m['window_without']) * 1e3:.0f} ms | torch.save: {m['torch_save'] * 1e3:.0f} ms "
            f"| {c['extra_window_time_vs_torch_save']:.2f} |",
            f"| commit throughput ({c['bytes'] / 1e6:.1f} MB) | {c['write_throughput_MBps']:.0f} MB/s "
            f"| raw write + fsync: {c['raw_throughput_MBps']:.0f} MB/s | **{c['throughput_vs_raw']:.2f}** |",
            f"| load + full verification | {m['load_verify'] * 1e3:.0f} ms "
            f"| torch.load: {m['torch_load'] * 1e3:.0f} ms "
            f"| {c['load_verify_vs_torch_load']:.2f} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="bigger images, more epochs and repeats (much longer)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per measure (quick 3/5/3, full 5/7/5)")
    parser.add_argument("--only", default="train,resume,checkpoint,data,pipeline,accuracy")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one in ./runs)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    only = set(args.only.split(","))
    reps = {"train": 5, "resume": 7, "checkpoint": 5} if args.full else {"train": 3, "resume": 5, "checkpoint": 3}
    if args.repeats:
        reps = dict.fromkeys(reps, args.repeats)
    base = args.dir or REPO / "runs"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base, prefix="bench-all-"))
    env = child_env(work)
    result: dict = {
        "mode": "full" if args.full else "quick",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    start = time.time()
    try:
        result["machine"] = machine() | versions(env)
        log(f"machine: {result['machine']}")
        if "train" in only:
            log("training throughput / memory / checkpoint cost vs ultralytics ...")
            t0 = time.time()
            p = dict(bench_train.FULL if args.full else bench_train.QUICK)
            result["train"] = bench_train.bench(work / "train", p, reps["train"], ["same", "defaults"], None, log)
            result["train"]["elapsed_s"] = time.time() - t0
        if "resume" in only:
            log("resume latency ...")
            t0 = time.time()
            (work / "resume").mkdir()
            p = dict(bench_resume.FULL if args.full else bench_resume.QUICK)
            result["resume"] = bench_resume.bench(work / "resume", p, reps["resume"], log)
            result["resume"]["elapsed_s"] = time.time() - t0
        if "checkpoint" in only:
            log("checkpoint stall / commit / load (bench_checkpoint.py) ...")
            t0 = time.time()
            result["checkpoint"] = run_checkpoint_bench(work, env, reps["checkpoint"])
            result["checkpoint"]["elapsed_s"] = time.time() - t0
        if "data" in only:
            log("dataset index, COCO JSON, loader memory vs ultralytics (bench_data.py) ...")
            result["data"] = run_script_output("bench_data.py", [] if args.full else ["--quick"], env)
        if "pipeline" in only:
            log("training data pipeline items/s vs ultralytics (bench_pipeline.py) ...")
            result["pipeline"] = run_script_output("bench_pipeline.py", ["--full"] if args.full else [], env)
        if "accuracy" in only:
            log("accuracy vs ultralytics, 4 seeds per tool and setup (bench_accuracy.py) ...")
            result["accuracy"] = run_accuracy_bench(work, env, args.full)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    result["elapsed_s"] = time.time() - start
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


def report(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"# Benchmarks ({result['mode']} mode)",
        "",
        f"- Machine: {m['cpu']}, {m['cpus']} CPUs, {m['mem_gib']} GiB; {m['platform']}",
        f"- Python {m['python']}, torch {m['torch']} (CPU; default {m['torch_default_threads']} threads), "
        f"ultralytics {m['ultralytics']}, yolo-resume {m['yolo_resume']}",
        f"- Command: `{result['command']}`; total {result['elapsed_s'] / 60:.1f} min",
    ]
    if "train" in result:
        t = result["train"]
        p = t["params"]
        lines += [
            "",
            f"## Training vs ultralytics ({t['repeats']} interleaved repeats, medians; {t['elapsed_s'] / 60:.1f} min)",
            "",
            f"YOLOv5s from yolov5s.yaml, {p['num_train']} synthetic images ({p['imgsz']} px) in YOLO layout, "
            f"imgsz {p['imgsz']}, batch {p['batch']} (nbs = batch), AdamW lr0 0.002, {p['epochs']} epochs; "
            f"augmentation aligned: {t['augment']}.",
            "",
            bench_train.table(t),
        ]
    if "resume" in result:
        r = result["resume"]
        lines += [
            "",
            f"## Resume latency ({r['repeats']} interleaved repeats, medians; {r['elapsed_s'] / 60:.1f} min)",
            "",
            bench_resume.table(r),
        ]
    if "checkpoint" in result:
        c = result["checkpoint"]
        lines += [
            "",
            f"## Checkpoint micro-benchmark (bench_checkpoint.py, {c['repeats']} repeats, {c['threads']} threads; "
            f"{c['elapsed_s'] / 60:.1f} min)",
            "",
            checkpoint_table(c),
        ]
    for key, title in (
        ("data", "Dataset index, COCO JSON, loader memory (bench_data.py)"),
        ("pipeline", "Training data pipeline (bench_pipeline.py)"),
    ):
        if key in result:
            lines += ["", f"## {title}", "", "```", result[key].rstrip(), "```"]
    if "accuracy" in result:
        a = result["accuracy"]
        lines += [
            "",
            f"## Accuracy vs ultralytics (bench_accuracy.py; {a['minutes']} min)",
            "",
            f"Setups: {a['setups']}",
            "",
            bench_accuracy.table(a["summary"]),
            "",
            bench_accuracy.evaluator_agreement(a["rows"]),
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
