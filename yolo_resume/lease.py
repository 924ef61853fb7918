"""One writer per run: an exclusive lease taken before a `train` process touches its run.

Two kinds, one interface (`try_acquire` / `release`), both provided through the checkpoint store
seam (`Store.lease`) plus the run folder's own lock:

- **Local** (`FileLease`): `fcntl.flock` on a lock file (`<run>/.lock`, and `.lease` in a local
  checkpoint folder). The kernel releases it when the holder dies, however it dies (SIGKILL, OOM),
  so a dead holder never blocks a resume. The file holds the holder's host, pid and start time, for
  the message of the writer that is refused.
- **Object storage** (`ObjectLease`, in object_store.py): a lease object `<prefix>/.lease` created
  with a conditional put (`If-None-Match: *`), renewed while training (`If-Match` on its ETag), with
  an expiry; a lease not renewed within its TTL is stale and broken by a conditional overwrite of
  exactly that stale version, so of two processes breaking it, one wins.

A second writer exits at once with one line naming the holder (exit 2), or waits for up to
`--wait-for-lock SECONDS`.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from .errors import UserError

TTL_ENV = "YOLO_RESUME_LEASE_TTL_S"  # tests shorten the object-store lease expiry
DEFAULT_TTL_S = 60.0
POLL_S = 0.5
HOLDER_MAX_BYTES = 4096


@dataclass
class Holder:
    """Who holds (or asks for) a lease."""

    host: str
    pid: int
    since: str  # UTC, ISO 8601
    token: str  # unique per acquisition: tells our own lease object from another's
    renewed: float = 0.0  # seconds since the epoch, holder's clock (object-store leases)
    ttl_s: float = DEFAULT_TTL_S

    @classmethod
    def me(cls) -> Holder:
        from .provenance import utc_now

        return cls(socket.gethostname(), os.getpid(), utc_now(), secrets.token_hex(8), time.time(), ttl_s())

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}, since {self.since}"

    def expired(self, now: float | None = None) -> bool:
        return (now if now is not None else time.time()) > self.renewed + self.ttl_s

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode("ascii")

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """The holder a lease file or object names; None when it is unreadable (torn, foreign, garbage)."""
        try:
            doc = json.loads(data[:HOLDER_MAX_BYTES].decode("utf-8"))
            return cls(
                host=str(doc["host"]),
                pid=int(doc["pid"]),
                since=str(doc["since"]),
                token=str(doc["token"]),
                renewed=float(doc.get("renewed", 0.0)),
                ttl_s=float(doc.get("ttl_s", DEFAULT_TTL_S)),
            )
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            return None


UNKNOWN = Holder("an unknown host", -1, "an unknown time", "")


def ttl_s() -> float:
    try:
        value = float(os.environ.get(TTL_ENV, DEFAULT_TTL_S))
    except ValueError:
        return DEFAULT_TTL_S
    return value if value > 0 else DEFAULT_TTL_S


class Lease(Protocol):
    where: str  # the lock file or lease object, for messages

    def try_acquire(self) -> Holder | None:
        """Take the lease: None when taken, else the current holder (UNKNOWN when it cannot be read)."""

    def release(self) -> None:
        """Give it back (idempotent); a lease of a dead process goes by itself (local) or expires (remote)."""


class LeaseHeld(UserError):
    """Another process is writing this run."""

    def __init__(self, run: str, where: str, holder: Holder):
        who = holder.describe() if holder.pid >= 0 else "another process (its lock file names no holder)"
        super().__init__(
            f"run {run} is being written by {who} (lease {where}); wait for it to finish or stop it, "
            "or pass --wait-for-lock SECONDS to wait for it"
        )
        self.holder = holder


class FileLease:
    """An exclusive `flock` on `path` (created if missing), holding the holder's description."""

    def __init__(self, path: Path, holder: Holder):
        self.path, self.holder, self.where = Path(path), holder, str(path)
        self._fd: int | None = None

    def try_acquire(self) -> Holder | None:
        import fcntl

        if self._fd is not None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            raise UserError(
                f"cannot open the lock file {self.path} ({exc.strerror}); move it away and try again"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UserError(f"the lock file {self.path} is not a regular file; move it away and try again")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            data = os.pread(fd, HOLDER_MAX_BYTES, 0)
            os.close(fd)
            return Holder.from_bytes(data) or UNKNOWN
        except OSError as exc:  # e.g. ENOLCK: a network filesystem mounted without lock support
            os.close(fd)
            raise UserError(
                f"cannot lock {self.path} ({exc.strerror}): the run folder's filesystem must support locks "
                "(for NFS, mount without `nolock`), so that two trainings never write one run"
            ) from None
        # Ours: say who holds it (the content is only ever read by a process refused the lock).
        os.ftruncate(fd, 0)
        os.pwrite(fd, self.holder.to_bytes(), 0)
        self._fd = fd
        return None

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor releases the flock


class RunLease:
    """Every lease a run needs, taken together (all or none): its run folder's and its store's."""

    def __init__(self, run: str, leases: list[Lease]):
        self.run, self.leases = run, leases
        self._held: list[Lease] = []

    def acquire(self, wait_s: float | None = None, say: Callable[[str], None] | None = None) -> None:
        deadline = time.monotonic() + (wait_s or 0.0)
        told = False
        while True:
            busy = self._try_all()
            if busy is None:
                return
            lease, holder = busy
            if time.monotonic() >= deadline:
                raise LeaseHeld(self.run, lease.where, holder)
            if say and not told:
                say(f"waiting up to {wait_s:g} s for run {self.run}: it is being written by {holder.describe()}")
                told = True
            time.sleep(min(POLL_S, max(deadline - time.monotonic(), 0.0)))

    def _try_all(self) -> tuple[Lease, Holder] | None:
        for lease in self.leases:
            holder = lease.try_acquire()
            if holder is not None:
                self.release()  # all or none: never sit on half of them while waiting
                return lease, holder
            self._held.append(lease)
        return None

    def release(self) -> None:
        held, self._held = self._held, []
        for lease in reversed(held):
            lease.release()

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# -- lost leases -------------------------------------------------------------------------------------
# A renewal that finds its lease object replaced means another process broke it (this one stalled past
# the TTL). Stores check here before each commit or delete, so the old holder never writes again.
_lost: dict[str, str] = {}


def mark_lost(location: str, why: str) -> None:
    _lost[location] = why


def lost(location: str) -> str | None:
    return _lost.get(location)
