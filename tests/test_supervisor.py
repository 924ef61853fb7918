"""`train --max-restarts K`: a crashed or killed attempt is resumed automatically, with backoff, up to K
times; stop signals are forwarded, never restarted; alerts go out on every event."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import assert_same_as_straight, final_ckpt, sets, step_rows
from test_alerts import Receiver, fake_checkpoint

from yolo_resume import supervisor as sup
from yolo_resume.checkpoint.format import KILL_ENV, read_meta
from yolo_resume.supervisor import backoff_delay, classify_exit, initial_backoff, supervise


# -- pure rules ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "code, status, restart, signal_name",
    [
        (0, "completed", False, None),
        (75, "interrupted", False, None),  # stopped gracefully after saving: a preempted machine goes away
        (130, "interrupted", False, None),  # second Ctrl-C
        (2, "fatal", False, None),  # usage / config / checkpoint error: would fail the same way
        (65, "fatal", False, None),  # the loss diverged deterministically
        (74, "crashed", True, None),  # saves kept failing: space may be freed
        (1, "crashed", True, None),
        (139, "crashed", True, None),
        (-9, "crashed", True, "SIGKILL"),  # kill -9, OOM killer
        (-11, "crashed", True, "SIGSEGV"),
    ],
)
def test_classify_exit(code, status, restart, signal_name):
    outcome = classify_exit(code)
    assert (outcome.status, outcome.restart, outcome.signal) == (status, restart, signal_name)
    assert outcome.exit_status == (code if code >= 0 else 128 - code)


def test_what_the_supervisor_does_with_each_error_the_trainer_raises():
    from yolo_resume.distributed import LostRankError
    from yolo_resume.errors import CheckpointSaveError, ConfigError, DivergedError, ExitCode

    errors = (ConfigError, DivergedError, CheckpointSaveError, LostRankError)
    restarted = [classify_exit(cls.exit_code).restart for cls in errors]
    assert restarted == [False, False, True, True]  # a restart cannot fix a config or a divergence
    assert classify_exit(ExitCode.INTERRUPTED).status == classify_exit(ExitCode.ABORTED).status == "interrupted"


def test_backoff_doubles_and_is_capped():
    assert [backoff_delay(n, 5.0) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert backoff_delay(7, 5.0) == 300.0 and backoff_delay(10_000, 5.0) == 300.0
    assert backoff_delay(3, 0.0) == 0.0
    warnings = []
    assert initial_backoff({}, warnings.append) == 5.0
    assert initial_backoff({sup.BACKOFF_ENV: "0.1"}, warnings.append) == 0.1
    assert warnings == []
    assert initial_backoff({sup.BACKOFF_ENV: "-1"}, warnings.append) == 5.0
    assert initial_backoff({sup.BACKOFF_ENV: "soon"}, warnings.append) == 5.0
    assert len(warnings) == 2 and sup.BACKOFF_ENV in warnings[0]


def test_resume_by_hand_command():
    plain = [sys.executable, "-m", "yolo_resume", "train", "--run-dir", "runs/my run", "-q", "--resume"]
    assert sup.Supervisor._by_hand(plain) == "yolo-resume train --run-dir 'runs/my run' -q --resume"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4"]
    torchrun += ["--max-restarts", "0", "-m", "yolo_resume", "train", "--run-dir", "r", "--resume"]
    assert sup.Supervisor._by_hand(torchrun) == "yolo-resume train --run-dir r --resume --nproc 4"


def test_event_lines_are_never_wrapped(tmp_path):
    import io

    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=40, highlight=False)
    supervisor = sup.Supervisor([], [], tmp_path, 1, sup.Alerter(None, None, print), console.print, print)
    supervisor._say("attempt 1 [not markup] " + "x" * 100)
    assert buffer.getvalue() == "attempt 1 [not markup] " + "x" * 100 + "\n"


# -- the loop, with stand-in attempts (fast) -----------------------------------------------------
# Attempt n (0-based) exits with codes[n] (the last one repeats); a code written "3c" first makes a
# checkpoint folder appear, as an attempt that saved before crashing; negative codes are signals.
FAKE_ATTEMPT = r"""
import os, pathlib, sys
run, role, codes = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
log = run / "attempts.txt"
n = len(log.read_text().split()) if log.exists() else 0
with log.open("a") as f:
    f.write(role + "\n")
code = codes[min(n, len(codes) - 1)]
if code.endswith("c"):
    code = code[:-1]
    (run / "checkpoints" / f"ckpt-{n + 1:09d}").mkdir(parents=True)
if int(code) < 0:
    os.kill(os.getpid(), -int(code))
sys.exit(int(code))
"""


class Fake:
    def __init__(self, tmp_path: Path, codes: str, script: str = FAKE_ATTEMPT):
        self.run = tmp_path / "run"
        self.run.mkdir()
        self.events_file = tmp_path / "events.jsonl"
        self.first = [sys.executable, "-c", script, str(self.run), "first", codes]
        self.resume = [sys.executable, "-c", script, str(self.run), "resume", codes]
        self.said, self.warned = [], []

    def supervise(self, max_restarts: int, **kwargs) -> int:
        return supervise(
            first_cmd=self.first,
            resume_cmd=self.resume,
            run_dir=self.run,
            max_restarts=max_restarts,
            alert_cmd=f"cat >> '{self.events_file}' && echo >> '{self.events_file}'",
            alert_webhook=None,
            say=kwargs.get("say", self.said.append),
            warn=self.warned.append,
        )

    def attempts(self) -> list[str]:
        return (self.run / "attempts.txt").read_text().split()

    def events(self) -> list[dict]:
        return [json.loads(line) for line in self.events_file.read_text().splitlines() if line]


@pytest.fixture
def quick_backoff(monkeypatch):
    monkeypatch.setenv(sup.BACKOFF_ENV, "0.01")


def test_crashes_restart_fresh_until_a_checkpoint_exists_then_resume(tmp_path, quick_backoff):
    fake = Fake(tmp_path, "-9,3c,74,0")
    assert fake.supervise(max_restarts=3) == 0
    assert fake.attempts() == ["first", "first", "resume", "resume"]
    events = fake.events()
    assert [e["event"] for e in events] == ["failure", "restart"] * 3 + ["completed"]
    failures = [e for e in events if e["event"] == "failure"]
    assert [(e["exit_code"], e["signal"], e["attempt"]) for e in failures] == [
        (None, "SIGKILL", 1),
        (3, None, 2),
        (74, None, 3),
    ]
    restarts = [e for e in events if e["event"] == "restart"]
    assert [(e["attempt"], e["restarts_left"]) for e in restarts] == [(2, 2), (3, 1), (4, 0)]
    # No attempt committed a checkpoint that verifies, so no progress: the delay doubles each time.
    assert [e["delay_s"] for e in restarts] == [0.01, 0.02, 0.04]
    assert events[-1]["exit_code"] == 0 and events[-1]["attempt"] == 4
    assert "restart 1 of 3 in 0.01 s" in fake.said
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_gives_up_after_max_restarts_naming_the_newest_checkpoint(tmp_path, quick_backoff):
    fake = Fake(tmp_path, "-9")
    fake_checkpoint(fake.run, 7)
    assert fake.supervise(max_restarts=1) == 128 + 9
    assert fake.attempts() == ["first", "resume"]
    events = fake.events()
    assert [e["event"] for e in events] == ["failure", "restart", "failure", "gave_up"]
    gave_up = events[-1]
    assert gave_up["signal"] == "SIGKILL" and gave_up["restarts_left"] == 0 and gave_up["attempt"] == 2
    assert gave_up["newest_checkpoint"]["name"] == "ckpt-000000007"
    [line] = [w for w in fake.warned if "gave up" in w]
    assert line.startswith("gave up after 1 restart(s) (--max-restarts 1); last attempt was killed by SIGKILL (kill -9")
    assert f"Newest valid checkpoint: {final_ckpt(fake.run, 7).resolve()}; resume by hand with: " in line


@pytest.mark.parametrize(
    "code, last_event", [(2, "gave_up"), (65, "gave_up"), (75, "interrupted"), (130, "interrupted")]
)
def test_never_restarts_what_would_fail_again_or_was_stopped(tmp_path, quick_backoff, code, last_event):
    fake = Fake(tmp_path, str(code))
    assert fake.supervise(max_restarts=3) == code
    assert fake.attempts() == ["first"]
    events = fake.events()
    assert [e["event"] for e in events] == (["failure", "gave_up"] if last_event == "gave_up" else ["interrupted"])
    assert events[-1]["exit_code"] == code


def test_max_restarts_zero_reports_and_gives_up(tmp_path, quick_backoff):
    fake = Fake(tmp_path, "1")
    assert fake.supervise(max_restarts=0) == 1
    assert [e["event"] for e in fake.events()] == ["failure", "gave_up"]
    assert any(w.startswith("not restarting (--max-restarts 0)") for w in fake.warned)


WAIT_FOR_SIGINT = r"""
import os, pathlib, signal, sys, time
run = pathlib.Path(sys.argv[1])
got = []
signal.signal(signal.SIGINT, lambda *a: got.append(1))
(run / "ready").write_text(f"{os.getpid()} {os.getsid(0)}")
deadline = time.monotonic() + 30
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(0.5)  # a duplicate forward would land here
(run / "sigints").write_text(str(len(got)))
sys.exit(75)
"""


def signal_self_when(path: Path, sig: int, delay: float = 0.0) -> threading.Thread:
    def go():
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        os.kill(os.getpid(), sig)

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def test_ctrl_c_is_forwarded_once_and_never_restarted(tmp_path, quick_backoff):
    fake = Fake(tmp_path, "", script=WAIT_FOR_SIGINT)
    signal_self_when(fake.run / "ready", signal.SIGINT)
    assert fake.supervise(max_restarts=2) == 75
    pid, sid = (fake.run / "ready").read_text().split()
    assert pid == sid  # the attempt runs in its own session: a terminal Ctrl-C reaches the supervisor only
    assert (fake.run / "sigints").read_text() == "1"
    assert [e["event"] for e in fake.events()] == ["interrupted"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_stop_signal_during_backoff_ends_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv(sup.BACKOFF_ENV, "60")
    fake = Fake(tmp_path, "-9")
    waiting = tmp_path / "waiting"
    signal_self_when(waiting, signal.SIGTERM, delay=0.2)

    def say(message):
        fake.said.append(message)
        if message.startswith("restart 1 of 2 in 60 s"):
            waiting.touch()

    start = time.monotonic()
    assert fake.supervise(max_restarts=2, say=say) == 75
    assert time.monotonic() - start < 15
    assert fake.attempts() == ["first"]
    events = fake.events()
    assert [e["event"] for e in events] == ["failure", "interrupted"]
    assert "while waiting to restart" in events[-1]["message"]


# -- end to end through the CLI: real training processes ---------------------------------------------
def start_supervised(work: Path, data: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    alert_cmd = "cat > alerts-$YOLO_RESUME_EVENT.json"
    return subprocess.Popen(
        [sys.executable, "-m", "yolo_resume", "train", "--run-dir", "run", "-q", "--alert-cmd", alert_cmd]
        + sets(data)
        + list(args),
        cwd=work,
        env={**os.environ, sup.BACKOFF_ENV: "0.1", **(env or {})},
        stdout=(work / "out.txt").open("w"),
        stderr=(work / "err.txt").open("w"),
    )


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_for(condition, proc: subprocess.Popen, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert proc.poll() is None, f"the supervisor exited early ({proc.returncode})"
        time.sleep(0.05)
    raise AssertionError("timed out")


def logged_steps(run: Path) -> int:
    try:
        return len(step_rows(run))
    except (FileNotFoundError, ValueError, IndexError):
        return 0


def has_checkpoint(run: Path) -> bool:
    folder = run / "checkpoints"
    return folder.is_dir() and any(p.name.startswith("ckpt-") for p in folder.iterdir())


def output(work: Path) -> str:
    return (work / "out.txt").read_text() + (work / "err.txt").read_text()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_sigkilled_training_is_resumed_exactly_with_alerts(straight, tmp_path, receiver):
    proc = start_supervised(tmp_path, straight / "data", "--max-restarts", "2", "--alert-webhook", receiver.url + "/ok")
    run = tmp_path / "run"
    wait_for(lambda: logged_steps(run) >= 3 and has_checkpoint(run) and children(proc.pid), proc)
    [child] = children(proc.pid)
    os.kill(child, signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, output(tmp_path)
    assert "completed on attempt 2 after 1 restart(s)" in (tmp_path / "out.txt").read_text()
    assert_same_as_straight(straight, run)
    lineage = read_meta(final_ckpt(run))["lineage"]
    assert len(lineage) == 1 and lineage[0]["previous_segment_ended"].startswith("killed")

    posted = receiver.payloads()
    assert [p["event"] for p in posted] == ["failure", "restart", "completed"]
    failure, restart, completed = posted
    assert failure["signal"] == "SIGKILL" and failure["exit_code"] is None
    assert failure["attempt"] == 1 and failure["restarts_left"] == 2
    assert failure["newest_checkpoint"]["name"].startswith("ckpt-")
    assert failure["run_dir"] == str(run.resolve())
    assert restart["attempt"] == 2 and restart["restarts_left"] == 1 and restart["delay_s"] == 0.1
    assert completed["exit_code"] == 0 and completed["signal"] is None
    assert completed["newest_checkpoint"]["name"] == final_ckpt(run).name
    assert completed["last_metrics"]["epoch"] == 3 and "map50" in completed["last_metrics"]
    for payload in posted:  # the command got the same documents on stdin
        assert json.loads((tmp_path / f"alerts-{payload['event']}.json").read_text()) == payload


@pytest.mark.slow  # the same rules, with stand-in attempts: test_gives_up_after_max_restarts_naming_...
def test_gives_up_when_every_attempt_is_killed(straight, tmp_path, receiver):
    # Every save SIGKILLs its process right after the commit: each attempt gets one step further.
    proc = start_supervised(
        tmp_path,
        straight / "data",
        "--max-restarts",
        "1",
        "--alert-webhook",
        receiver.url + "/ok",
        env={KILL_ENV: "after_rename"},
    )
    assert proc.wait(timeout=300) == 128 + signal.SIGKILL, output(tmp_path)
    posted = receiver.payloads()
    assert [p["event"] for p in posted] == ["failure", "restart", "failure", "gave_up"]
    gave_up = posted[-1]
    assert gave_up["signal"] == "SIGKILL" and gave_up["restarts_left"] == 0 and gave_up["attempt"] == 2
    newest = gave_up["newest_checkpoint"]["name"]
    assert newest != posted[0]["newest_checkpoint"]["name"]  # the restart resumed and saved again
    err = (tmp_path / "err.txt").read_text()
    assert "gave up after 1 restart(s)" in err and f"{newest}; resume by hand with: yolo-resume train" in err
    assert "--resume" in err.split("resume by hand with:")[1]


def test_sigterm_to_the_supervisor_is_forwarded_and_not_restarted(straight, tmp_path):
    proc = start_supervised(tmp_path, straight / "data", "--max-restarts", "2", "--set", "ckpt.every_steps=0")
    run = tmp_path / "run"
    wait_for(lambda: logged_steps(run) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, output(tmp_path)
    assert "stopped by SIGTERM" in output(tmp_path)
    newest = sorted((run / "checkpoints").iterdir())[-1]
    assert read_meta(newest)["reason"] == "signal:SIGTERM"
    interrupted = json.loads((tmp_path / "alerts-interrupted.json").read_text())
    assert interrupted["exit_code"] == 75 and interrupted["newest_checkpoint"]["name"] == newest.name
    assert not (tmp_path / "alerts-restart.json").exists() and not (tmp_path / "alerts-failure.json").exists()
    starts = [line for line in (run / "segments.jsonl").read_text().splitlines() if '"start"' in line]
    assert len(starts) == 1
