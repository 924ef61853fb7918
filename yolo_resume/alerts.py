"""Alerts of a supervised run (`train --alert-cmd CMD` / `--alert-webhook URL`).

Each event (`failure`, `restart`, `gave_up`, `completed`, `interrupted`) becomes one JSON payload: the
run folder, the event, how the attempt ended (exit code or signal), the newest valid checkpoint, the
restarts left, the attempt number, the last row of results.csv, the time, the host and a short human
message. Nothing from the environment or the config goes in: webhook URLs and configs may hold secrets.

`--alert-cmd` runs through the shell with the payload on stdin and `YOLO_RESUME_EVENT` set;
`--alert-webhook` POSTs it as application/json. An alert that fails (non-zero exit, timeout, refused
connection, HTTP error) is one warning line: it never raises, so it never stops or fails training.
"""

from __future__ import annotations

import csv
import json
import math
import os
import queue
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from . import __version__
from .provenance import host, utc_now
from .run_dir import RunDir

EVENT_ENV = "YOLO_RESUME_EVENT"
CMD_TIMEOUT_S = 30.0
WEBHOOK_TIMEOUT_S = 10.0
WEBHOOK_RETRY_DELAYS_S = (1.0, 3.0)  # a couple of retries: three tries in all
RETRY_HTTP_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def newest_checkpoint(run_dir: Path) -> dict | None:
    """The newest checkpoint of the run whose manifest and metadata check out: name, location, step."""
    try:
        from .checkpoint.manager import CheckpointManager

        infos = CheckpointManager(RunDir(run_dir).store()).list()  # oldest first
    except Exception:  # an unreadable checkpoint folder must not break the caller
        return None
    for info in reversed(infos):
        if info.valid:
            return {
                "name": info.name,
                "path": _location(info.path),
                "epoch": info.get("epoch"),
                "global_step": info.get("global_step"),
            }
    return None


def _location(path) -> str:
    if isinstance(path, Path) and not path.is_absolute():
        return str(path.resolve())
    return str(path)  # absolute, or a remote location (s3://...) that must not be touched


def last_metrics(run_dir: Path) -> dict | None:
    """The last row of `<run>/results.csv` as {column: number}, or None before the first epoch ends."""
    try:
        with RunDir(run_dir).results_file.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return None
    if not rows:
        return None
    metrics = {}
    for key, text in rows[-1].items():
        value = _number(text)
        if key is not None and value is not _NOT_A_NUMBER:
            metrics[key] = value
    return metrics or None


_NOT_A_NUMBER = object()


def _number(text):
    if not isinstance(text, str):
        return _NOT_A_NUMBER
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return _NOT_A_NUMBER
    return value if math.isfinite(value) else None  # strict JSON has no NaN


def signal_name(returncode: int | None) -> str | None:
    """`SIGKILL` for a process killed by signal 9 (returncode -9); None for a normal exit."""
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def build_payload(
    event: str,
    run_dir: Path,
    *,
    returncode: int | None,
    attempt: int,
    restarts_left: int,
    message: str,
    **extra,
) -> dict:
    """The JSON document every alert channel receives.

    `returncode` is how the attempt the event is about ended (Popen's: negative for a signal), shown
    as `exit_code` or `signal`; `attempt` counts from 1 (for `restart`: the attempt being started);
    `newest_checkpoint` is the newest one whose manifest and metadata check out (not re-hashed)."""
    run_dir = Path(run_dir)
    return {
        "event": event,
        "run_dir": str(run_dir.resolve()),
        "exit_code": returncode if returncode is not None and returncode >= 0 else None,
        "signal": signal_name(returncode),
        "newest_checkpoint": newest_checkpoint(run_dir),
        "restarts_left": restarts_left,
        "attempt": attempt,
        "last_metrics": last_metrics(run_dir),
        "time": utc_now(),
        "host": host(),
        "message": message,
        **extra,
    }


class Alerter:
    """Delivers payloads to the configured channels; every failure is a warning, never an exception.

    `fire` takes the payload's snapshot at once and queues the delivery to one background thread, so
    a slow or unreachable receiver never delays a restart, and alerts arrive in the order they were
    fired. `close` waits until every queued alert was delivered or failed (each is time-bounded)."""

    def __init__(
        self,
        cmd: str | None,
        webhook: str | None,
        warn: Callable[[str], None],
        *,
        cmd_timeout_s: float = CMD_TIMEOUT_S,
        webhook_timeout_s: float = WEBHOOK_TIMEOUT_S,
        retry_delays_s: Sequence[float] = WEBHOOK_RETRY_DELAYS_S,
    ):
        self.cmd, self.webhook, self.warn = cmd or None, webhook or None, warn
        self.cmd_timeout_s, self.webhook_timeout_s = cmd_timeout_s, webhook_timeout_s
        self.retry_delays_s = tuple(retry_delays_s)
        if self.webhook and urllib.parse.urlsplit(self.webhook).scheme not in ("http", "https"):
            self._warn(f"alert webhook {redact_url(self.webhook)} is not an http(s) URL; webhook alerts are off")
            self.webhook = None
        self._queue: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.cmd or self.webhook)

    def fire(self, event: str, run_dir: Path, **fields) -> dict | None:
        """Build the payload of `event` now and queue its delivery on every channel; returns the
        payload (None when no channel is configured)."""
        if not self.enabled:
            return None
        try:
            payload = build_payload(event, run_dir, **fields)
            body = json.dumps(payload, allow_nan=False).encode()
        except Exception as exc:  # never let an alert break the run
            self._warn(f"could not build the {event} alert: {type(exc).__name__}: {exc}")
            return None
        if self._worker is None:
            self._worker = threading.Thread(target=self._deliver_queued, name="alerts", daemon=True)
            self._worker.start()
        self._queue.put((event, body))
        return payload

    def close(self) -> None:
        """Wait for every queued alert to be delivered (or to fail)."""
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None

    def deliver(self, event: str, body: bytes) -> None:
        if self.cmd:
            self.run_cmd(event, body)
        if self.webhook:
            self.post_webhook(event, body)

    def _deliver_queued(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self.deliver(*item)
            except Exception as exc:  # the worker must outlive any one alert
                self._warn(f"{item[0]} alert failed: {type(exc).__name__}: {exc}")

    def run_cmd(self, event: str, body: bytes) -> bool:
        """Run the alert command with the payload on stdin; True when it exited 0 in time."""
        try:
            proc = subprocess.Popen(
                self.cmd,
                shell=True,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={**os.environ, EVENT_ENV: event},
                start_new_session=True,  # so a timeout can kill whatever the shell started, too
            )
        except Exception as exc:
            self._warn(f"{event} alert command could not start: {type(exc).__name__}: {exc}")
            return False
        try:
            _, err = proc.communicate(body, timeout=self.cmd_timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            self._warn(f"{event} alert command timed out after {self.cmd_timeout_s:g} s and was killed")
            return False
        except Exception as exc:
            _kill_group(proc)
            self._warn(f"{event} alert command failed: {type(exc).__name__}: {exc}")
            return False
        if proc.returncode != 0:
            code = proc.returncode
            how = f"was killed by {signal_name(code)}" if code < 0 else f"exited {code}"
            last = (err or b"").decode(errors="replace").strip().splitlines()
            self._warn(f"{event} alert command {how}" + (f": {last[-1][:300]}" if last else ""))
            return False
        return True

    def post_webhook(self, event: str, body: bytes) -> bool:
        """POST the payload; retries refused connections, timeouts and 5xx/429. True on a 2xx answer."""
        where = redact_url(self.webhook)
        tries = len(self.retry_delays_s) + 1
        error = "no attempt"
        for attempt in range(tries):
            if attempt:
                time.sleep(self.retry_delays_s[attempt - 1])
            request = urllib.request.Request(
                self.webhook,
                data=body,
                method="POST",
                headers={"Content-Type": "application/json", "User-Agent": f"yolo-resume/{__version__}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.webhook_timeout_s) as response:
                    response.read(1 << 16)
                return True
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code} {exc.reason}"
                exc.close()
                if exc.code not in RETRY_HTTP_STATUSES:
                    break
            except urllib.error.URLError as exc:
                error = f"{getattr(exc.reason, 'strerror', None) or exc.reason}"
            except Exception as exc:  # timeouts, resets, malformed answers: never raise
                error = f"{type(exc).__name__}: {exc}"
        self._warn(f"{event} alert to webhook {where} failed: {error} (after {attempt + 1} tries)")
        return False

    def _warn(self, message: str) -> None:
        try:
            self.warn(message)
        except Exception:
            pass


def redact_url(url: str) -> str:
    """scheme://host[:port]/... : webhook paths, queries and user info often hold tokens."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
    except ValueError:
        return "<unparsable URL>"
    if not parts.scheme:
        return "<not a URL>"
    hidden = parts.path not in ("", "/") or parts.query or parts.username or parts.password
    return f"{parts.scheme}://{netloc}" + ("/..." if hidden else "")


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.communicate(timeout=5)
    except Exception:
        pass
