"""Supervise a training run: start an attempt, watch it, resume it after a crash, alert.

`train --max-restarts K` (and `--nproc`, `--alert-*`, see launch.py) makes the `train` process a
supervisor that trains nothing itself. It runs each attempt as a child in its own session, so a
terminal Ctrl-C reaches only the supervisor, which forwards it (and SIGTERM / SIGUSR1) to the child
once. When the child ends, `classify_exit` decides:

| attempt ended with                                   | supervisor                                  |
|------------------------------------------------------|---------------------------------------------|
| 0 done                                               | `completed`, exit 0                         |
| 75 stopped by a signal after saving, 130 aborted     | `interrupted`, exit with the same code      |
| 2 usage/config/checkpoint error, 65 loss diverged    | `failure` + `gave_up`: it would fail again  |
| 74 saves kept failing, any other code, killed by a   | `failure`, then `restart` with `--resume`   |
| signal (SIGKILL, OOM killer, SIGSEGV)                | after a backoff, up to K times; `gave_up`   |

A stop signal received by the supervisor itself (a preempted machine, Ctrl-C) means no restart,
whatever the child returns. The backoff doubles after each attempt that committed no new checkpoint
(5 s, 10 s, ... capped at 300 s; the first delay from `YOLO_RESUME_RESTART_BACKOFF_S`) and starts
over after one that made progress.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from .alerts import Alerter, newest_checkpoint, signal_name
from .errors import ExitCode, UserError
from .files import read_text
from .run_dir import RunDir
from .stopping import SUPERVISOR_PID_ENV

BACKOFF_ENV = "YOLO_RESUME_RESTART_BACKOFF_S"
DEFAULT_BACKOFF_S = 5.0
MAX_BACKOFF_S = 300.0
FORWARDED_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

COMPLETED, INTERRUPTED, FATAL, CRASHED = "completed", "interrupted", "fatal", "crashed"


@dataclass(frozen=True)
class Outcome:
    """How one attempt ended, and whether restarting it can help."""

    returncode: int  # Popen.returncode: negative for a death by signal
    status: str  # COMPLETED, INTERRUPTED, FATAL or CRASHED
    restart: bool
    description: str

    @property
    def signal(self) -> str | None:
        return signal_name(self.returncode)

    @property
    def exit_status(self) -> int:
        """The returncode as a shell reports it: 128 + N for a death by signal N."""
        return self.returncode if self.returncode >= 0 else 128 - self.returncode


def classify_exit(returncode: int) -> Outcome:
    """Pure: what an attempt's exit status means for the supervisor."""
    if returncode == ExitCode.OK:
        return Outcome(returncode, COMPLETED, False, "completed")
    if returncode == ExitCode.INTERRUPTED:
        return Outcome(returncode, INTERRUPTED, False, "stopped by a signal after saving a checkpoint (exit 75)")
    if returncode == ExitCode.ABORTED:
        return Outcome(returncode, INTERRUPTED, False, "aborted by a second Ctrl-C (exit 130)")
    if returncode == ExitCode.USAGE:
        return Outcome(
            returncode, FATAL, False, "failed on a usage, config, data or checkpoint error (exit 2; see its message)"
        )
    if returncode == ExitCode.DIVERGED:
        return Outcome(returncode, FATAL, False, "stopped because the loss diverged (exit 65)")
    if returncode == ExitCode.SAVE_FAILED:
        return Outcome(returncode, CRASHED, True, "stopped because checkpoints could not be saved (exit 74)")
    if returncode == -signal.SIGKILL:
        return Outcome(returncode, CRASHED, True, "was killed by SIGKILL (kill -9 or the out-of-memory killer)")
    if returncode < 0:
        return Outcome(returncode, CRASHED, True, f"was killed by {signal_name(returncode)}")
    return Outcome(returncode, CRASHED, True, f"crashed (exit {returncode})")


def backoff_delay(streak: int, initial: float, cap: float = MAX_BACKOFF_S) -> float:
    """Pure: seconds to wait before a restart after `streak` failed attempts in a row that made no
    progress (1 for the first): initial, 2x, 4x, ... at most `cap`."""
    return min(initial * 2.0 ** min(max(streak - 1, 0), 64), cap)


def initial_backoff(environ=os.environ, warn: Callable[[str], None] | None = None) -> float:
    text = environ.get(BACKOFF_ENV)
    if not text:
        return DEFAULT_BACKOFF_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        if warn:
            warn(f"ignoring {BACKOFF_ENV}={text!r} (not a number of seconds >= 0); using {DEFAULT_BACKOFF_S:g} s")
        return DEFAULT_BACKOFF_S
    return value


def supervise(
    first_cmd: list[str],
    resume_cmd: list[str],
    run_dir: Path,
    max_restarts: int,
    alert_cmd: str | None,
    alert_webhook: str | None,
    say: Callable,
    warn: Callable[[str], None],
) -> int:
    """Run `first_cmd`, restart with `resume_cmd` (or `first_cmd` while the run has no checkpoint)
    after crashes, up to `max_restarts` times; returns the exit code for the supervisor's process."""
    supervisor = Supervisor(
        first_cmd, resume_cmd, Path(run_dir), max_restarts, Alerter(alert_cmd, alert_webhook, warn), say, warn
    )
    return supervisor.run()


class Supervisor:
    def __init__(
        self,
        first_cmd: list[str],
        resume_cmd: list[str],
        run_dir: Path,
        max_restarts: int,
        alerter: Alerter,
        say: Callable,
        warn: Callable[[str], None],
    ):
        self.first_cmd, self.resume_cmd = list(first_cmd), list(resume_cmd)
        self.run_dir, self.max_restarts = Path(run_dir), max(int(max_restarts), 0)
        self.alerter, self.say, self.warn = alerter, say, warn
        self.initial_backoff = initial_backoff(warn=warn)
        self.child: subprocess.Popen | None = None
        self.stop_signal: str | None = None  # the first stop signal this supervisor received
        self._pending: list[int] = []  # signals that arrived while no child was running

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> int:
        previous = self._install_handlers()
        try:
            return self._loop()
        finally:
            self.alerter.close()  # the last alert (completed, gave_up, interrupted) goes out before we exit
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        attempt, restarts, streak = 0, 0, 0
        cmd = self.first_cmd
        while True:
            attempt += 1
            before = _name(newest_checkpoint(self.run_dir))
            returncode = self._run_attempt(cmd)
            if returncode is None:
                message = f"stopped on {self.stop_signal} before attempt {attempt} started"
                fields = {"returncode": None, "attempt": attempt, "restarts_left": self.max_restarts - restarts}
                self._event("interrupted", f"{message}; {self._resume_hint(newest_checkpoint(self.run_dir))}", fields)
                return ExitCode.INTERRUPTED
            outcome = classify_exit(returncode)
            newest = newest_checkpoint(self.run_dir)
            left = self.max_restarts - restarts
            fields = {"returncode": returncode, "attempt": attempt, "restarts_left": left}

            if outcome.status == COMPLETED:
                after = f" after {restarts} restart(s)" if restarts else ""
                self._event("completed", f"run {self.run_dir} completed on attempt {attempt}{after}", fields)
                return ExitCode.OK
            if self.stop_signal or outcome.status == INTERRUPTED:
                why = f" (the supervisor got {self.stop_signal})" if self.stop_signal else ""
                self._event(
                    "interrupted",
                    f"attempt {attempt} {outcome.description}; not restarting{why}. {self._resume_hint(newest)}",
                    fields,
                )
                return outcome.exit_status

            self._event("failure", f"attempt {attempt} {outcome.description}", fields, warn=True)
            if not outcome.restart:
                return self._give_up(outcome, attempt, "not restarting: it would fail the same way", newest)
            if left <= 0:
                why = (
                    f"gave up after {self.max_restarts} restart(s) (--max-restarts {self.max_restarts})"
                    if self.max_restarts
                    else "not restarting (--max-restarts 0)"
                )
                return self._give_up(outcome, attempt, why, newest)

            streak = 1 if _name(newest) not in (None, before) else streak + 1
            delay = backoff_delay(streak, self.initial_backoff)
            restarts += 1
            self._say(f"restart {restarts} of {self.max_restarts} in {delay:g} s")
            if not self._sleep(delay):
                self._event(
                    "interrupted",
                    f"stopped on {self.stop_signal} while waiting to restart; {self._resume_hint(newest)}",
                    fields,
                )
                return ExitCode.INTERRUPTED
            resuming = RunDir(self.run_dir).has_checkpoints()
            cmd = self.resume_cmd if resuming else self.first_cmd
            newest = newest_checkpoint(self.run_dir)
            if not resuming:
                start = "starting over (no checkpoint yet)"
            else:
                start = f"resuming from {newest['name']}" if newest else "resuming (no checkpoint verifies so far)"
            self._event(
                "restart",
                f"restart {restarts} of {self.max_restarts} (attempt {attempt + 1}): {start}",
                fields | {"attempt": attempt + 1, "restarts_left": self.max_restarts - restarts},
                delay_s=delay,
                after=outcome.description,
            )

    def _give_up(self, outcome: Outcome, attempt: int, why: str, newest: dict | None) -> int:
        self._event(
            "gave_up",
            f"{why}; last attempt {outcome.description}. {self._resume_hint(newest)}",
            {"returncode": outcome.returncode, "attempt": attempt, "restarts_left": 0},
            warn=True,
        )
        return outcome.exit_status or 1

    def _resume_hint(self, newest: dict | None) -> str:
        if newest is None:
            return f"No valid checkpoint yet; start again with: {self._by_hand(self.first_cmd)}"
        return f"Newest valid checkpoint: {newest['path']}; resume by hand with: {self._by_hand(self.resume_cmd)}"

    @staticmethod
    def _by_hand(cmd: list[str]) -> str:
        """The `yolo-resume train ...` command a person types to run `cmd` (--nproc N under torchrun)."""
        starts = [i + 2 for i in range(len(cmd) - 1) if cmd[i : i + 2] == ["yolo_resume", "train"]]
        args = cmd[starts[0] :] if starts else cmd
        extra = []
        if "--nproc-per-node" in cmd:
            extra = ["--nproc", cmd[cmd.index("--nproc-per-node") + 1]]
        return shlex.join(["yolo-resume", "train", *args, *extra])

    def _say(self, message: str) -> None:
        """One line, however long: a rich console would wrap it at its width."""
        if isinstance(getattr(self.say, "__self__", None), Console):
            self.say(escape(message), soft_wrap=True)
        else:
            self.say(escape(message))

    def _event(self, event: str, message: str, fields: dict, warn: bool = False, **extra) -> None:
        (self.warn if warn else self._say)(message)
        self.alerter.fire(event, self.run_dir, message=message, max_restarts=self.max_restarts, **fields, **extra)

    # -- one attempt ---------------------------------------------------------------------------
    def _run_attempt(self, cmd: list[str]) -> int | None:
        """Run one attempt to its end; its returncode, or None when a stop signal came before it started."""
        if self.stop_signal:
            return None
        try:
            self.child = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, SUPERVISOR_PID_ENV: str(os.getpid())},
                preexec_fn=_die_with(os.getpid()),
            )
        except OSError as exc:
            self.warn(f"could not start the training process: {exc}")
            return 127  # the shell's "command not found": a crash, restarted like one
        # Signal handlers run in this (the main) thread, between two bytecodes: one that arrived while
        # Popen was starting the child found no child to forward to and was kept for it.
        pending, self._pending = self._pending, []
        for sig in pending:
            self._forward(sig)
        started = time.time()
        try:
            returncode = self.child.wait()
        finally:
            self.child = None
        if returncode == 1 and "torch.distributed.run" in cmd:
            return _reported_exit(self.run_dir, since=started) or returncode
        return returncode

    def _sleep(self, seconds: float) -> bool:
        """Wait, in short slices so a stop signal ends the wait at once; False when stopped."""
        deadline = time.monotonic() + seconds
        while not self.stop_signal:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, 0.05))
        return False

    # -- signals -------------------------------------------------------------------------------
    def _install_handlers(self) -> dict:
        previous = {}
        if threading.current_thread() is not threading.main_thread():
            return previous  # signal handlers can only be set from the main thread
        for name in FORWARDED_SIGNALS:
            sig = getattr(signal, name)
            previous[sig] = signal.signal(sig, self._handle)
        return previous

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        self.stop_signal = self.stop_signal or name
        child = self.child
        if child is None or child.returncode is not None:
            self._pending.append(signum)
            return
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        """Send the signal to the child itself, not its process group: the trainer's data-loader
        workers must not get SIGTERM/SIGUSR1 (they would die and crash the step); the trainer stops
        them. Under torchrun, the agent forwards SIGTERM/SIGINT to its workers."""
        child = self.child
        if child is None:
            return
        try:
            child.send_signal(signum)
        except OSError:
            pass


# The attempt must not outlive its supervisor (a SIGKILLed supervisor would leave it training, and the
# rerun command would make two writers). libc is loaded here, in the parent: the child only calls prctl
# between fork and exec, where loading a library is not safe.
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with(parent: int) -> Callable[[], None]:
    """preexec_fn: the kernel sends the child SIGTERM (finish the step, save, exit 75) when `parent` dies;
    a parent already gone before that was set means exit at once. Elsewhere the child's own parent
    watch (stopping.watch_parent) does it."""

    def set_parent_death_signal() -> None:
        if _LIBC is not None:
            _LIBC.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return set_parent_death_signal


def _reported_exit(run_dir: Path, since: float) -> int | None:
    """Rank 0's own exit code from `last_exit.json` (see session.write_last_exit), if this attempt wrote it:
    torchrun turns every failure into exit 1."""
    path = RunDir(run_dir).last_exit_file
    try:
        if path.stat().st_mtime < since - 1:
            return None
        code = json.loads(read_text(path) or "null").get("code")  # a regular file only: a FIFO would hang us
    except (OSError, ValueError, AttributeError, UserError):
        return None
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def _name(ckpt: dict | None) -> str | None:
    return ckpt["name"] if ckpt else None
