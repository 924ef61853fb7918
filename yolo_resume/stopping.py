"""Graceful stops: SIGTERM / SIGUSR1 / a first Ctrl-C ask the Trainer to finish the step, save and exit."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
SUPERVISOR_PID_ENV = "YOLO_RESUME_SUPERVISOR_PID"  # set by the supervisor for its attempts
PARENT_POLL_S = 1.0


def watch_parent(environ=os.environ, poll_s: float = PARENT_POLL_S) -> threading.Thread | None:
    """An attempt of `--max-restarts` stops (SIGTERM to itself: finish the step, save, exit 75) when its
    supervisor dies. The supervisor also asks the kernel for that (PR_SET_PDEATHSIG, Linux); this
    watch is the fallback where that is unavailable. Only a direct child of the supervisor watches."""
    text = environ.get(SUPERVISOR_PID_ENV, "")
    if not text.isdigit() or os.getppid() != int(text):
        return None
    parent = int(text)

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


class StopOnSignals:
    """While entered, a stop signal sets `requested` (the loop acts on it after the step). A second
    Ctrl-C aborts at once."""

    def __init__(self, notice: Callable[[str], None]):
        self.notice = notice
        self.requested: str | None = None  # the name of the first stop signal this process received
        self.previous: dict = {}

    def __enter__(self):
        for name in STOP_SIGNALS:
            sig = getattr(signal, name)
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort at once
        self.requested = name
        self.notice(f"{name} received: finishing the current step, then saving a checkpoint")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def ignore_stop_signals(_worker_id: int) -> None:
    """A data-loader worker's init: Ctrl-C reaches the whole process group, and torchrun signals each
    rank's group, but only the main process decides how to stop. A worker whose parent is gone exits
    by itself (DataLoader watchdog)."""
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
