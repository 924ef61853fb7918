"""DDP on CPU (gloo, 2 processes): exact resume after real SIGKILLs, agreed stops, lost ranks, torchrun
restarts and a change of world size. The reference is a straight 2-process run of the tiny config."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TOTAL_STEPS, final_ckpt, sets, step_rows

from yolo_resume.checkpoint.format import read_meta

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
WORKER = ["-m", "yolo_resume", "train", "-q"]
# One thread per rank, as torchrun sets by default (conftest's import of yolo_resume pins 2 for the
# single-process tests; 2 ranks x 2 threads on 2 cores would oversubscribe them).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args, cwd: Path, extra: tuple = (), timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TORCHRUN, *extra, *WORKER, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def start_torchrun(*args, cwd: Path, extra: tuple = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [*TORCHRUN, *extra, *WORKER, *args],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"training ended before {path} appeared:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def digests(run: Path, step: int = TOTAL_STEPS) -> dict:
    return read_meta(final_ckpt(run, step))["digests"]


@pytest.fixture(scope="module")
def ddp_straight(tmp_path_factory):
    """The uninterrupted 2-process reference run, with a checkpoint after every step."""
    work = tmp_path_factory.mktemp("ddp_straight")
    result = torchrun("--run-dir", "run", *sets(work / "data"), cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    return work


def assert_same_as_ddp_straight(ddp_straight: Path, run: Path) -> None:
    assert digests(run) == digests(ddp_straight / "run")
    assert step_rows(run) == step_rows(ddp_straight / "run")
    assert len(step_rows(run)) == TOTAL_STEPS


def test_ddp_checkpoint_records_every_rank(ddp_straight):
    meta = read_meta(final_ckpt(ddp_straight / "run", 5))
    assert meta["world_size"] == 2
    from yolo_resume.checkpoint.format import load_checkpoint

    state, _ = load_checkpoint(final_ckpt(ddp_straight / "run", 5))
    assert len(state["rank_rng"]) == 2
    # Each rank has its own RNG streams (seeded alike, but rank 1's state came from rank 1's process).
    assert state["rank_rng"][0]["torch"].shape == state["rank_rng"][1]["torch"].shape


def test_ddp_sigkill_then_resume_is_bitwise_exact(ddp_straight, tmp_path):
    proc = start_torchrun("--run-dir", "run", *sets(tmp_path / "data"), cwd=tmp_path)
    wait_for(final_ckpt(tmp_path / "run", 6), proc)
    workers = children(proc.pid)
    for pid in [proc.pid, *workers]:  # the agent and every rank, at once: a power loss
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not final_ckpt(tmp_path / "run", TOTAL_STEPS).exists()

    result = torchrun("--run-dir", "run", "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming run" in result.stdout
    assert_same_as_ddp_straight(ddp_straight, tmp_path / "run")


@pytest.mark.slow
def test_sigterm_stops_every_rank_at_the_same_step_and_resume_is_exact(ddp_straight, tmp_path):
    proc = start_torchrun("--run-dir", "run", *sets(tmp_path / "data"), cwd=tmp_path)
    wait_for(final_ckpt(tmp_path / "run", 4), proc)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks, as on a preempted node
    output, _ = proc.communicate(timeout=120)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*"))
    newest = read_meta(checkpoints[-1])
    assert newest["reason"] == "signal:SIGTERM", output
    assert newest["global_step"] < TOTAL_STEPS

    result = torchrun("--run-dir", "run", "--resume", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert_same_as_ddp_straight(ddp_straight, tmp_path / "run")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_hung_rank_makes_the_others_exit_within_the_timeout(tmp_path):
    """Two ranks started by hand (no torchrun agent to clean up): rank 1 freezes (SIGSTOP); rank 0 must
    not hang but stop within dist.timeout_s with one clear line and the lost-rank exit code."""
    port = _free_port()
    args = [*WORKER, "--run-dir", "run", *sets(tmp_path / "data"), "--set", "dist.timeout_s=5"]
    ranks = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "OMP_NUM_THREADS": "1",
        }
        ranks.append(
            subprocess.Popen(
                [sys.executable, *args],
                cwd=tmp_path,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        wait_for(final_ckpt(tmp_path / "run", 3), ranks[0])
        os.kill(ranks[1].pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        _, err = ranks[0].communicate(timeout=120)
        waited = time.monotonic() - frozen_at
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    assert ranks[0].returncode == 76, err
    assert waited < 5 + 15, f"rank 0 took {waited:.1f} s to notice"
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "lost contact with the other ranks" in lines[0] and "--resume" in lines[0], err
    assert "Traceback" not in err
    # What rank 0 had committed before the hang is intact and resumable.
    assert read_meta(final_ckpt(tmp_path / "run", 3))["world_size"] == 2


def test_nproc_with_max_restarts_recovers_a_killed_rank_exactly(ddp_straight, tmp_path):
    """`train --nproc 2 --max-restarts 1`: our supervisor runs torchrun; one rank is SIGKILLed; the job
    restarts with --resume and ends bitwise equal to the straight 2-process run."""
    proc = subprocess.Popen(
        [sys.executable, *WORKER, "--run-dir", "run", "--nproc", "2", "--max-restarts", "1", *sets(tmp_path / "data")],
        cwd=tmp_path,
        env={**ENV, "YOLO_RESUME_RESTART_BACKOFF_S": "0.1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(final_ckpt(tmp_path / "run", 5), proc)
    (agent,) = children(proc.pid)
    os.kill(children(agent)[-1], signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "restart 1 of 1" in output and "resuming from ckpt-" in output
    assert_same_as_ddp_straight(ddp_straight, tmp_path / "run")


@pytest.mark.slow
def test_torchrun_max_restarts_resumes_by_itself_and_stays_exact(ddp_straight, tmp_path):
    proc = start_torchrun("--run-dir", "run", *sets(tmp_path / "data"), cwd=tmp_path, extra=("--max-restarts", "1"))
    wait_for(final_ckpt(tmp_path / "run", 5), proc)
    os.kill(children(proc.pid)[-1], signal.SIGKILL)  # one rank dies; the agent restarts the whole job
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "torchrun restarted this job: resuming run" in output
    assert_same_as_ddp_straight(ddp_straight, tmp_path / "run")


def test_resume_with_another_world_size_says_what_changes(ddp_straight, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(ddp_straight / "run", run, ignore=shutil.ignore_patterns("ckpt-00000000[7-9]", "ckpt-00000001*"))
    from conftest import cli

    result = cli("train", "--run-dir", "run", "--resume", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "world size" in result.stdout and "split across a different number of ranks" in result.stdout
    assert read_meta(final_ckpt(run))["world_size"] == 1
    # The single process trained on exactly the global batches the 2-rank run would have.
    assert [r[:4] for r in step_rows(run, 6)] == [r[:4] for r in step_rows(ddp_straight / "run", 6)]


def test_global_batch_must_split_evenly(tmp_path):
    result = torchrun("--run-dir", "run", *sets(tmp_path / "data", **{"train.batch": 5}), cwd=tmp_path)
    assert result.returncode != 0
    # Said once, by rank 0; the other rank leaves quietly with the same exit code.
    assert (result.stdout + result.stderr).count("must be divisible by the number of processes (2)") == 1
