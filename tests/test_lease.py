"""Issue 12 items 4 and 5: one writer per run. Real processes hold the leases; real SIGKILLs end them."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import cli

from yolo_resume.checkpoint.object_store import ObjectStore
from yolo_resume.errors import CheckpointError
from yolo_resume.lease import TTL_ENV, Holder, LeaseHeld
from yolo_resume.run_dir import RunDir

HOLD = textwrap.dedent(
    """
    import sys, time
    from yolo_resume.lease import Holder
    from yolo_resume.run_dir import RunDir
    from yolo_resume.checkpoint.store import open_store
    run, where = sys.argv[1], sys.argv[2]
    store = open_store(where) if where != "-" else None
    lease = RunDir(run).lease(Holder.me(), store)
    lease.acquire()
    print("held", flush=True)
    time.sleep(120)
    """
)


def hold(run, where="-", env=None):
    """A process that takes the run's lease and keeps it until killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run), where],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    line = proc.stdout.readline()
    assert line.strip() == "held", proc.stderr.read()
    return proc


def kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)


def test_second_writer_of_a_local_run_exits_2_naming_the_holder_until_the_holder_is_killed(tmp_path):
    run = tmp_path / "run"
    holder = hold(run)
    try:
        second = cli("train", "--run-dir", str(run), "-q", cwd=tmp_path)
        assert second.returncode == 2, second.stdout + second.stderr
        line = second.stderr.strip()
        assert "\n" not in line and f"pid {holder.pid} on host" in line and "--wait-for-lock" in line
        # --wait-for-lock: waits while the holder lives, and takes over as soon as the kernel releases
        # the lock of a SIGKILLed holder (no stale lock file to break).
        lease = RunDir(run).lease(Holder.me())
        threading.Timer(0.5, kill, (holder,)).start()
        started = time.monotonic()
        lease.acquire(wait_s=20)
        assert 0.4 < time.monotonic() - started < 10
        lease.release()
    finally:
        if holder.poll() is None:
            kill(holder)


def test_object_store_lease_is_exclusive_renewed_and_broken_only_after_expiry(tmp_path, url, endpoint, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv(TTL_ENV, "1.5")
    holder = hold(run, url, env={TTL_ENV: "1.5", "AWS_ENDPOINT_URL": endpoint})
    other_run = tmp_path / "other"  # another pod: its own run folder, the same bucket
    store = ObjectStore(url, {"endpoint_url": endpoint})
    try:
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid} on host .* since"):
            RunDir(other_run).lease(Holder.me(), store).acquire()
        time.sleep(2.5)  # longer than the TTL: the living holder renews it
        with pytest.raises(LeaseHeld):
            RunDir(other_run).lease(Holder.me(), store).acquire()
        kill(holder)
        lease = RunDir(other_run).lease(Holder.me(), store)
        started = time.monotonic()
        lease.acquire(wait_s=10)  # the dead holder's lease expires, then it is broken
        assert time.monotonic() - started < 5
        lease.release()
    finally:
        if holder.poll() is None:
            kill(holder)


def test_a_holder_whose_lease_was_broken_never_writes_again(url, endpoint, monkeypatch):
    """A holder that stalled past its TTL (e.g. a frozen pod) finds, at its next renewal, that the lease
    was taken over, and its store then refuses every commit and delete."""
    monkeypatch.setenv(TTL_ENV, "600")
    store = ObjectStore(url, {"endpoint_url": endpoint})
    stalled = store.lease(Holder.me())
    assert stalled.try_acquire() is None
    stalled._stop.set()  # its renewal thread is frozen
    stale = Holder.me()
    stale.token, stale.renewed = stalled.holder.token, 0.0  # its last renewal, long ago
    store.fs.pipe_file(stalled.path, stale.to_bytes(), IfMatch=stalled.etag)
    taker = ObjectStore(url, {"endpoint_url": endpoint}).lease(Holder.me())
    assert taker.try_acquire() is None  # broke the stale lease
    stalled.renew()
    with pytest.raises(CheckpointError, match="refused: the lease .* was taken over"):
        store.commit("ckpt-000000001", {"x": 1}, {"global_step": 1})
    taker.release()


SUPERVISED_CHILD = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(120)"
SUPERVISOR = textwrap.dedent(
    """
    import sys
    from yolo_resume.supervisor import supervise
    child = [sys.executable, "-c", sys.argv[2], sys.argv[3]]
    supervise(child, child, sys.argv[1], 3, None, None, print, print)
    """
)


def test_a_sigkilled_supervisor_takes_its_attempt_with_it(tmp_path):
    pid_file = tmp_path / "child.pid"
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path), SUPERVISED_CHILD, str(pid_file)])
    try:
        deadline = time.monotonic() + 60
        while not pid_file.exists() or not pid_file.read_text():
            assert time.monotonic() < deadline and supervisor.poll() is None
            time.sleep(0.05)
        child = int(pid_file.read_text())
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait(timeout=10)
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the attempt outlived its SIGKILLed supervisor"
            time.sleep(0.05)
    finally:
        if supervisor.poll() is None:
            supervisor.kill()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead: it is only waiting for init to reap it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1][0] != "Z"
    except FileNotFoundError:
        return False


WATCHING_CHILD = textwrap.dedent(
    """
    import os, signal, sys, time
    from yolo_resume.stopping import watch_parent
    marker = sys.argv[1]

    def on_term(*_):  # the marker appears whole (the test may read it the moment it exists)
        with open(marker + ".tmp", "w") as f:
            f.write("SIGTERM")
        os.replace(marker + ".tmp", marker)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    assert watch_parent(poll_s=0.05) is not None
    open(marker + ".ready", "w").close()
    time.sleep(120)
    """
)
PARENT = textwrap.dedent(
    """
    import os, subprocess, sys, time
    env = {**os.environ, "YOLO_RESUME_SUPERVISOR_PID": str(os.getpid())}
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], env=env, start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(120)
    """
)


def test_without_a_parent_death_signal_the_attempt_still_notices_its_supervisor_died(tmp_path):
    """The fallback where PR_SET_PDEATHSIG is unavailable: the attempt watches its parent."""
    marker = tmp_path / "child.signal"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, WATCHING_CHILD, str(marker)], stdout=subprocess.PIPE, text=True
    )
    child = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "child.signal.ready").exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        kill(parent)
        deadline = time.monotonic() + 10
        while not marker.exists():
            assert time.monotonic() < deadline, "the attempt did not notice its parent died"
            time.sleep(0.05)
        assert marker.read_text() == "SIGTERM"
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)
