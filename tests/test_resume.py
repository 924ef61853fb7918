"""The contract: a run interrupted at any moment and resumed ends bitwise identical to the uninterrupted
run (model, EMA and optimizer tensors), and logs the same per-step losses."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TOTAL_STEPS, assert_same_as_straight, cli, final_ckpt, sets, step_rows

from yolo_resume.checkpoint.format import load_checkpoint, read_meta
from yolo_resume.drift import BREAKING, HARMLESS, SCHEDULE, classify_key, config_drift


@pytest.mark.parametrize(
    "k, where",
    [(1, "first step, gradients pending"), (5, "mid-epoch, gradients pending"), (8, "epoch boundary")],
)
def test_resume_in_fresh_process_is_bitwise_exact(straight, tmp_path, k, where):
    result = cli("train", "--resume-from", str(final_ckpt(straight / "run", k)), "--run-dir", "b", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_as_straight(straight, tmp_path / "b", resumed_at=k)


def test_resumed_tensors_are_torch_equal(straight, tmp_path):
    result = cli("train", "--resume-from", str(final_ckpt(straight / "run", 6)), "--run-dir", "b", "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    a, _ = load_checkpoint(final_ckpt(straight / "run"))
    b, _ = load_checkpoint(final_ckpt(tmp_path / "b"))
    for group in ("model", "optimizer"):
        flat_a, flat_b = _tensors(a[group]), _tensors(b[group])
        assert flat_a.keys() == flat_b.keys() and flat_a
        assert all(torch.equal(flat_a[key], flat_b[key]) for key in flat_a), group
    assert all(torch.equal(a["ema"]["weights"][k], v) for k, v in b["ema"]["weights"].items())
    assert a["ema"]["updates"] == b["ema"]["updates"]
    assert without_segment(a["train_state"]) == without_segment(b["train_state"])
    assert b["train_state"]["segment"] == 1  # the only difference: the resumed run knows it was resumed


def without_segment(obj):
    if isinstance(obj, dict):
        return {k: without_segment(v) for k, v in obj.items() if k != "segment"}
    return [without_segment(v) for v in obj] if isinstance(obj, list) else obj


def _tensors(obj, prefix=""):
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out = {}
    for key, value in items:
        out |= _tensors(value, f"{prefix}.{key}")
    return out


def test_resume_with_two_workers_is_exact(straight, tmp_path):
    """The batch stream does not depend on the worker count (a harmless drift, shown, not refused)."""
    ckpt = final_ckpt(straight / "run", 5)
    result = cli("train", "--resume-from", str(ckpt), "--run-dir", "b", "--set", "train.workers=2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "train.workers" in result.stdout and "harmless" in result.stdout
    assert_same_as_straight(straight, tmp_path / "b", resumed_at=5)


# -- real interruptions ------------------------------------------------------------------------
def launch(work: Path, data: Path, extra_env=None, **overrides) -> subprocess.Popen:
    """Start the run in `work/k`, resuming when it already has a checkpoint."""
    has_ckpt = (work / "k" / "checkpoints").is_dir() and any(
        p.name.startswith("ckpt-") for p in (work / "k" / "checkpoints").iterdir()
    )
    args = ["--resume", "--run-dir", "k"] if has_ckpt else ["--run-dir", "k", *sets(data, **overrides)]
    return subprocess.Popen(
        [sys.executable, "-m", "yolo_resume", "train", "-q", *args],
        cwd=work,
        env={**os.environ, **(extra_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_new_step(work: Path, proc: subprocess.Popen, after: int, timeout: float = 120) -> int | None:
    """Block until the run logs a step beyond `after`; None if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            rows = step_rows(work / "k")
        except (FileNotFoundError, ValueError, IndexError):
            rows = []
        if rows and int(rows[-1][0]) > after:
            return int(rows[-1][0])
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    raise AssertionError("the run made no progress")


def kill_and_resume_until_done(work: Path, data: Path, kills: int, seed: int, **overrides) -> int:
    rng = random.Random(seed)
    done_kills, last_step = 0, 0
    while True:
        proc = launch(work, data, **overrides)
        if done_kills < kills and wait_for_new_step(work, proc, last_step) is not None:
            time.sleep(rng.uniform(0, 0.4))  # anywhere: mid-step, mid-save, mid-validation
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            if proc.returncode == -signal.SIGKILL:
                done_kills += 1
            last_step = int(step_rows(work / "k")[-1][0]) if (work / "k" / "steps.csv").exists() else 0
            continue
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, out + err
        return done_kills


def test_sigkill_at_random_moments_then_resume_is_exact(straight, tmp_path):
    kills = kill_and_resume_until_done(tmp_path, straight / "data", kills=5, seed=1)
    assert kills >= 5
    assert_same_as_straight(straight, tmp_path / "k")
    # Lineage: every resume after a kill says the previous segment died without a clean exit.
    lineage = read_meta(final_ckpt(tmp_path / "k"))["lineage"]
    assert len(lineage) >= 1 and all(e["previous_segment_ended"].startswith("killed") for e in lineage)


@pytest.mark.slow
def test_fifteen_sigkills_then_resume_is_exact(tmp_path):
    long = {"data.num_train": 64, "ckpt.every_steps": 1}  # 16 batches/epoch, 48 steps
    ref = cli("train", "--run-dir", "ref", "-q", *sets(tmp_path / "data", **long), cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr
    # 15 kills: each costs a process start (~5 s on 2 cores), and the suite has a 20-minute budget
    kills = kill_and_resume_until_done(tmp_path, tmp_path / "data", kills=15, seed=7, **long)
    assert kills >= 15
    final = final_ckpt(tmp_path / "k", 48)
    assert read_meta(final)["digests"] == read_meta(final_ckpt(tmp_path / "ref", 48))["digests"]
    assert step_rows(tmp_path / "k") == step_rows(tmp_path / "ref")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1])
def test_stop_signal_saves_step_checkpoint_and_resume_is_exact(straight, tmp_path, sig):
    proc = launch(tmp_path, straight / "data", **{"ckpt.every_steps": 0})
    seen = wait_for_new_step(tmp_path, proc, 1)
    assert seen is not None
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, out + err
    assert f"stopped by {sig.name}" in out and "yolo-resume train --resume" in out
    ckpts = sorted((tmp_path / "k" / "checkpoints").iterdir())
    meta = read_meta(ckpts[-1])
    assert meta["reason"] == f"signal:{sig.name}"
    # Exits within one step of the signal: at most one step beyond the last step seen before it.
    last_logged_before = seen
    assert last_logged_before <= meta["global_step"] <= last_logged_before + 2
    if sig != signal.SIGTERM:
        return  # the save and the resume after it are one code path for every signal: resumed once (suite budget)
    resumed = launch(tmp_path, straight / "data")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out + err
    assert_same_as_straight(straight, tmp_path / "k")
    [entry] = read_meta(final_ckpt(tmp_path / "k"))["lineage"]
    assert entry["previous_segment_ended"] == f"stopped by {sig.name}" and entry["segment"] == 1
    assert entry["resumed_from"] == ckpts[-1].name and entry["steps_redone"] == 0


def test_second_ctrl_c_aborts_at_once(straight, tmp_path):
    proc = launch(tmp_path, straight / "data", **{"ckpt.every_steps": 0})
    assert wait_for_new_step(tmp_path, proc, 0) is not None
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, out + err
    assert "aborted" in err and "Traceback" not in err


# -- resume with changes -----------------------------------------------------------------------
def test_drift_classification():
    assert classify_key("train.workers") == HARMLESS and classify_key("ckpt.every_steps") == HARMLESS
    assert classify_key("train.epochs") == SCHEDULE and classify_key("augment.mosaic") == SCHEDULE
    for key in ("model.imgsz", "model.cfg", "train.batch", "data.format", "train.optimizer", "train.seed"):
        assert classify_key(key) == BREAKING, key
    drifts = config_drift({"train": {"epochs": 3, "workers": 0}}, {"train": {"epochs": 5, "workers": 0}})
    assert [(d.what, d.stored, d.current, d.kind) for d in drifts] == [("train.epochs", 3, 5, SCHEDULE)]


def test_breaking_drift_refused_unless_allowed(straight, tmp_path):
    ckpt = str(final_ckpt(straight / "run", 10))
    refused = cli("train", "--resume-from", ckpt, "--run-dir", "b", "--set", "model.imgsz=96", cwd=tmp_path)
    assert refused.returncode == 2
    assert "refusing to resume: breaking changes to model.imgsz" in refused.stderr and "--allow-drift" in refused.stderr
    assert "model.imgsz" in refused.stdout and "breaking" in refused.stdout  # the table
    assert not (tmp_path / "b" / "checkpoints").exists()
    allowed = cli(
        "train",
        "--resume-from",
        ckpt,
        "--run-dir",
        "b",
        "--set",
        "model.imgsz=96",
        "--allow-drift",
        "-q",
        cwd=tmp_path,
    )
    assert allowed.returncode == 0, allowed.stderr
    assert final_ckpt(tmp_path / "b").is_dir()


def test_extending_a_finished_run_keeps_training(straight, tmp_path):
    result = cli(
        "train",
        "--resume-from",
        str(final_ckpt(straight / "run")),
        "--run-dir",
        "b",
        "--epochs",
        "4",
        "-q",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "re-planning the LR schedule for 4 epochs (was 3)" in result.stdout
    meta = read_meta(final_ckpt(tmp_path / "b", 16))
    assert meta["epoch"] == 4 and meta["finished"]


def test_time_based_step_checkpoints(workdir):
    result = cli(
        "train",
        "--run-dir",
        "t",
        "-q",
        *sets(workdir / "data", **{"ckpt.every_steps": 0, "ckpt.every_minutes": 1e-5, "train.epochs": 1}),
        cwd=workdir,
    )
    assert result.returncode == 0, result.stderr
    steps = sorted(int(p.name[5:]) for p in (workdir / "t" / "checkpoints").glob("ckpt-*"))
    assert steps == [1, 2, 3, 4]  # mid-epoch saves from the clock, then the epoch-end one


def test_resume_shows_thread_count_change(straight, tmp_path):
    threads = read_meta(final_ckpt(straight / "run", 11))["threads"]
    result = cli(
        "train",
        "--resume-from",
        str(final_ckpt(straight / "run", 11)),
        "--run-dir",
        "b",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "2" if threads == 1 else "1"},
    )
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "threads" in line)
    assert "harmless" in row and "last bits" in row


def test_auto_resume_starts_an_empty_run_then_resumes_it_exactly(straight, tmp_path):
    """One command for pods and job schedulers that rerun it: start when the run folder is empty,
    resume when it has a checkpoint."""
    args = ["train", "--auto-resume", "--run-dir", "run", "-q", *sets(tmp_path / "data")]
    first = cli(*args, "--stop-after-steps", "5", cwd=tmp_path)
    assert first.returncode == 75, first.stdout + first.stderr
    assert "training yolov5n.yaml" in first.stdout
    second = cli(*args, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming run run from ckpt-000000005" in second.stdout
    assert_same_as_straight(straight, tmp_path / "run", resumed_at=5)
    missing = cli("train", "--auto-resume", "-q", cwd=tmp_path)
    assert missing.returncode == 2 and "--auto-resume needs --run-dir" in missing.stderr


def test_optimizer_auto_is_resolved_once_and_kept_when_epochs_change(tmp_path):
    """auto chooses by the planned optimizer steps; a resume with another --epochs must not switch optimizers."""
    # 8 images, batch 4, nbs 64: one optimizer step per epoch, so 10000 epochs mean AdamW and 10001 SGD.
    extra = {"data.num_train": 8, "train.epochs": 10000, "train.nbs": 64, "train.optimizer": "auto"}
    args = sets(tmp_path / "data", **extra, **{"eval.every_epochs": 0, "ckpt.every_steps": 0})
    first = cli("train", "--run-dir", "run", "-q", "--stop-after-steps", "1", *args, cwd=tmp_path)
    assert first.returncode == 75, first.stderr
    assert "optimizer auto: AdamW (lr0 0.001429" in first.stdout
    stored = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]
    assert (stored["optimizer"], stored["lr0"], stored["warmup_bias_lr"]) == ("AdamW", 0.001429, 0.0)
    resumed = cli(
        "train", "--resume", "--run-dir", "run", "--epochs", "10001", "--stop-after-steps", "2", "-q", cwd=tmp_path
    )
    assert resumed.returncode == 75, resumed.stderr
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["optimizer"] == "AdamW"


def _ultralytics_optimizer_steps(nb: int, epochs: int, nominal: int, nw: int) -> list[int]:
    """The batches after which ultralytics' BaseTrainer._do_train steps the optimizer, written out from its loop."""
    steps, last, accumulate = [], -1, nominal
    for ni in range(nb * epochs):
        if nw and ni <= nw:
            accumulate = max(1, int(np.interp(ni, [0, nw], [1, nominal]).round()))
        if ni - last >= accumulate:
            steps.append(ni)
            last = ni
    return steps


def test_accumulation_steps_where_ultralytics_steps(straight):
    """The reference run (4 batches per epoch, nbs 8 = 2 micro-batches, warmup 2 batches, 3 epochs) takes its
    optimizer steps where ultralytics would: after batch 0, then every second batch across epoch boundaries."""
    expected = _ultralytics_optimizer_steps(nb=4, epochs=3, nominal=2, nw=2)
    assert expected == [0, 2, 4, 6, 8, 10]
    counts = []
    for step in range(1, TOTAL_STEPS + 1):
        state, _ = load_checkpoint(final_ckpt(straight / "run", step))
        counts.append(state["train_state"]["optimizer_steps"])
        assert state["train_state"]["last_opt_step"] == max(s for s in expected if s < step)
    assert counts == [sum(s < step for s in expected) for step in range(1, TOTAL_STEPS + 1)]
