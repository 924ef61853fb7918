"""Graceful stops: SIGTERM / SIGUSR1 / a first Ctrl-C ask the Trainer to finish the step, save and exit."""

from __future__ import annotations

import signal
from collections.abc import Callable

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


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
