"""Resume latency: process start to the first resumed step in steps.csv, vs a fresh start to its first step.

A config with many batches per epoch (quick: 400 images at batch 4 = 100 batches, nbs 16 so checkpoints
also hold half-accumulated gradients) is trained once to get checkpoints early and late in epoch 1:
- a fresh run is stopped with SIGTERM after its first few steps (it saves a checkpoint and exits 75):
  the *early* checkpoint, a few batches into the epoch;
- `--resume` of that run with `--set ckpt.every_steps=K` (a harmless drift) trains on and saves at
  global step K, a few batches before the end of the epoch: the *late* checkpoint.
Then, interleaved (the order rotates each repeat), each variant is a new process in a new run folder:
- fresh: `python -m yolo_resume train --config CFG --run-dir NEW -q`
- early / late: `python -m yolo_resume train --resume-from CKPT --run-dir NEW -q`
timed from just before the process is spawned to the moment the first data row appears in
NEW/steps.csv (polled every 5 ms); the row's global step is checked (checkpoint step + 1), then the
process group is killed. The latency includes interpreter start, imports, dataset indexing, model
build, for a resume the full SHA-256 verification and load of the checkpoint, data-loader start
and one training step. Late vs early shows what skipping consumed batches costs: the sampler starts
at the saved batch without loading the ones before it, so it should be ~1.0; re-running the consumed
batches instead (what an epoch-granular resume amounts to) would add step_in_epoch x step time,
estimated from the setup run's mean step time and shown for context.

Usage: python scripts/bench_resume.py [--full] [--repeats 3] [--dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import REPO, child_env, machine, median, versions  # noqa: E402

QUICK = {"imgsz": 64, "num_train": 400, "image_size": 128, "batch": 4, "nbs": 16, "early_after": 3}
FULL = {"imgsz": 128, "num_train": 400, "image_size": 128, "batch": 4, "nbs": 16, "early_after": 3}


def write_config(work: Path, p: dict) -> Path:
    """The packaged demo config with many batches per epoch and no validation."""
    cfg = yaml.safe_load((REPO / "yolo_resume" / "configs" / "demo.yaml").read_text())
    cfg["data"].update(
        {"root": str(work / "data"), "num_train": p["num_train"], "num_val": 16, "image_size": p["image_size"]}
    )
    cfg["model"]["imgsz"] = p["imgsz"]
    cfg["train"].update({"epochs": 1, "batch": p["batch"], "nbs": p["nbs"], "device": "cpu"})
    cfg["eval"] = {"every_epochs": 0}
    cfg["ckpt"] = {"every_epochs": 1, "every_steps": 0, "keep_last": 10}
    path = work / "resume.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def data_rows(steps_csv: Path) -> list[list[str]]:
    try:
        text = steps_csv.read_text()
    except OSError:
        return []
    lines = text.split("\n")[1:-1]  # header, then complete (newline-terminated) rows only
    return [ln.split(",") for ln in lines if ln]


def spawn(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "yolo_resume", "train", *args, "-q"]
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def setup(work: Path, env: dict, cfg: Path, p: dict) -> dict:
    """Train once: SIGTERM after a few steps (early checkpoint), then resume to a late checkpoint."""
    run = work / "setup"
    log = work / "setup.log"
    proc = spawn(["--config", str(cfg), "--run-dir", str(run)], env, log)
    t0, first, rows = time.time(), None, []
    while len(rows) < p["early_after"]:
        if proc.poll() is not None:
            raise RuntimeError(f"setup run exited {proc.returncode} early; see {log}")
        rows = data_rows(run / "steps.csv")
        if rows and first is None:
            first = time.time()
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)  # only the main process: it finishes the step, saves, exits 75
    if proc.wait(timeout=600) != 75:
        raise RuntimeError(f"setup run exited {proc.returncode} after SIGTERM (expected 75); see {log}")
    early = sorted((run / "checkpoints").glob("ckpt-*"))[-1]
    early_meta = json.loads((early / "meta.json").read_text())
    nb = int(early_meta["batches_per_epoch"])
    late_step = nb - 4
    # Resume to the end of the epoch, timing its steps from steps.csv (first resumed row to the last).
    proc = spawn(["--resume", "--run-dir", str(run), "--set", f"ckpt.every_steps={late_step}"], env, log)
    first_row = last_row = None
    while proc.poll() is None:
        rows = [r for r in data_rows(run / "steps.csv") if int(r[0]) > int(early_meta["global_step"])]
        if rows and first_row is None:
            first_row = (int(rows[0][0]), time.time())
        if rows and int(rows[-1][0]) == nb and last_row is None:
            last_row = (nb, time.time())
        time.sleep(0.02)
    if proc.returncode != 0 or first_row is None or last_row is None:
        raise RuntimeError(f"setup resume exited {proc.returncode}; see {log}")
    late = run / "checkpoints" / f"ckpt-{late_step:09d}"
    late_meta = json.loads((late / "meta.json").read_text())
    return {
        "early": str(early),
        "late": str(late),
        "early_step_in_epoch": int(early_meta["step_in_epoch"]),
        "late_step_in_epoch": int(late_meta["step_in_epoch"]),
        "batches_per_epoch": nb,
        "ckpt_bytes": sum(f.stat().st_size for f in late.iterdir()),
        # Median-free estimate: wall time between the first and last resumed rows (saves included).
        "step_s": (last_row[1] - first_row[1]) / (last_row[0] - first_row[0]),
        "first_step_fresh_setup_s": (first - t0) if first else None,
    }


def time_to_first_step(
    args: list[str], run: Path, env: dict, log: Path, expect_step: int, timeout: float = 600
) -> float:
    shutil.rmtree(run, ignore_errors=True)
    start = time.time()
    proc = spawn([*args, "--run-dir", str(run)], env, log)
    try:
        while True:
            rows = data_rows(run / "steps.csv")
            if rows:
                latency = time.time() - start
                break
            if proc.poll() is not None:
                raise RuntimeError(f"{args} exited {proc.returncode} before its first step; see {log}")
            if time.time() - start > timeout:
                raise RuntimeError(f"{args}: no step after {timeout} s; see {log}")
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the child and its data-loader workers (its own session)
        proc.wait()
    if int(rows[0][0]) != expect_step:
        raise RuntimeError(f"{args}: first logged global step {rows[0][0]}, expected {expect_step}")
    shutil.rmtree(run, ignore_errors=True)
    return latency


def bench(work: Path, p: dict, repeats: int, log=print) -> dict:
    env = child_env(work)
    cfg = write_config(work, p)
    info = setup(work, env, cfg, p)
    log(
        f"  resume setup: early checkpoint at step {info['early_step_in_epoch']}, late at "
        f"{info['late_step_in_epoch']} of {info['batches_per_epoch']} batches"
    )
    early_step = json.loads((Path(info["early"]) / "meta.json").read_text())["global_step"]
    late_step = json.loads((Path(info["late"]) / "meta.json").read_text())["global_step"]
    variants = {
        "fresh": (["--config", str(cfg)], 1),
        "resume_early": (["--resume-from", info["early"]], early_step + 1),
        "resume_late": (["--resume-from", info["late"]], late_step + 1),
    }
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        order = names[rep % 3 :] + names[: rep % 3]
        for name in order:
            args, expect = variants[name]
            t = time_to_first_step(args, work / f"lat-{name}", env, work / f"lat-{name}.log", expect)
            times[name].append(t)
            log(f"  resume[{name:12s}] rep {rep}: {t:.2f} s to the first step")
    med = {n: median(v) for n, v in times.items()}
    replay = info["late_step_in_epoch"] * info["step_s"]
    return {
        "params": p,
        "repeats": repeats,
        "setup": info,
        "times_s": times,
        "median_s": med,
        "ratio_resume_early_vs_fresh": med["resume_early"] / med["fresh"],
        "ratio_resume_late_vs_fresh": med["resume_late"] / med["fresh"],
        "ratio_late_vs_early": med["resume_late"] / med["resume_early"],
        "replay_consumed_batches_s_estimate": replay,
    }


def table(result: dict) -> str:
    med, s, p = result["median_s"], result["setup"], result["params"]
    nb = s["batches_per_epoch"]
    rows = ["| measure | yolo-resume | baseline | ratio |", "|---|---|---|---|"]
    where = f"imgsz {p['imgsz']}, batch {p['batch']}, {nb} batches/epoch"
    rows.append(
        f"| process start -> first step, resume early (step {s['early_step_in_epoch']}/{nb}; {where}) "
        f"| {med['resume_early']:.2f} s | fresh start: {med['fresh']:.2f} s "
        f"| **{result['ratio_resume_early_vs_fresh']:.2f}** |"
    )
    rows.append(
        f"| process start -> first step, resume late (step {s['late_step_in_epoch']}/{nb}) "
        f"| {med['resume_late']:.2f} s | fresh start: {med['fresh']:.2f} s "
        f"| **{result['ratio_resume_late_vs_fresh']:.2f}** |"
    )
    rows.append(
        f"| resume late vs resume early | {med['resume_late']:.2f} s | {med['resume_early']:.2f} s "
        f"| **{result['ratio_late_vs_early']:.2f}** |"
    )
    rows.append(
        f"| (context) re-running the {s['late_step_in_epoch']} consumed batches instead of skipping them "
        f"| skipped: ~0 s | ~{result['replay_consumed_batches_s_estimate']:.0f} s (estimate) | - |"
    )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help=f"{FULL} instead of {QUICK}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one in ./runs)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    base = args.dir or REPO / "runs"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=base, prefix="bench-resume-"))
    try:
        start = time.time()
        result = bench(work, dict(FULL if args.full else QUICK), args.repeats)
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
