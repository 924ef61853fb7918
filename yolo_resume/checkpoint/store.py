"""Where checkpoints live: one protocol, two stores.

`LocalStore` is a folder on a filesystem (the commit is an atomic rename, see `format.py`);
`ObjectStore` is a prefix in object storage reached through fsspec (the commit is a marker object,
see `object_store.py`). The manager, the resolver and the CLI only ever talk to a `Store`;
`open_store` is the one place that decides which one a location needs.

Errors: a bad checkpoint raises `CheckpointError`. When the store itself fails (the service is down,
the local disk of a download is full) the error carries `unavailable = True`: callers must never
take that for a corrupt checkpoint (resume would fall back past a good one, prune would delete it).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import CheckpointError
from ..lease import FileLease, Holder, Lease
from .format import read_meta, verify_checkpoint, write_checkpoint

NAME_RE = re.compile(r"^ckpt-(\d{9,})$")
PIN_SUFFIX = ".pin"  # a sibling marker file (or object): the checkpoint itself stays untouched
SUPERSEDED = ".superseded-"  # a committed checkpoint moved aside by a newer one of the same step
TRASH_PREFIX = ".trash-"  # a local checkpoint being deleted
LEASE_NAME = ".lease"  # the single-writer lease: a lock file in a folder, a lease object under a prefix

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def superseded_of(name: str) -> str:
    """`ckpt-N` of a moved-aside copy `ckpt-N.superseded-<time>`."""
    return name.split(SUPERSEDED, 1)[0]


def checkpoint_name(global_step: int) -> str:
    return f"ckpt-{global_step:09d}"


def is_remote(location: str | Path | None) -> bool:
    """True for an fsspec URL other than a local file (`s3://b/p`, `gs://b/p`, `memory://p`).

    A `pathlib.Path` is always local: turning an URL into a Path collapses `s3://` into `s3:/`."""
    if location is None or isinstance(location, Path):
        return False
    match = _SCHEME_RE.match(str(location))
    return bool(match) and match.group(1).lower() not in ("file", "local")


def local_path(location: str | Path) -> Path:
    """A local location as a Path (`file:///a/b` -> `/a/b`)."""
    text = str(location)
    for prefix in ("file://", "local://"):
        if text.startswith(prefix):
            return Path(text[len(prefix) :])
    return Path(location)


@dataclass(frozen=True)
class Entry:
    """A committed checkpoint as one listing of its store sees it."""

    name: str
    size: int  # bytes of its files
    mtime: float  # when it was committed (seconds since the epoch; the store's clock)
    pinned: bool


@runtime_checkable
class Store(Protocol):
    """A place that holds checkpoints named `ckpt-<step>`."""

    location: Path | str  # the folder, or the URL of the prefix (never a Path for a URL)

    def where(self, name: str) -> Path | str:
        """The checkpoint's own path or URL, as messages and `ckpt list` name it."""

    def address(self) -> dict[str, Any]:
        """`open_store(**address)` opens this store again (in another process: a DDP rank)."""

    def check(self) -> None:
        """Fail at once, with the fix, when the store cannot be reached (before any training)."""

    def entries(self) -> dict[str, Entry]:
        """Every committed checkpoint, by name, from one listing."""

    def entry(self, name: str) -> Entry:
        """One checkpoint by name; CheckpointError naming the fix when there is none."""

    def read_meta(self, name: str) -> dict:
        """meta.json after the checks that need no hashing (manifest, file set, sizes)."""

    def verify(self, name: str) -> None:
        """Check every byte (an object store downloads it and keeps the verified copy for `open`)."""

    def open(self, name: str) -> AbstractContextManager[Path]:
        """A local folder holding the checkpoint's files, for as long as the context lasts. The
        caller verifies it (`format.load_checkpoint` does); errors name `where(name)`."""

    def commit(self, name: str, state: dict, meta: dict) -> None:
        """Write and commit a checkpoint; an existing one of the same name is moved aside, never lost."""

    def delete(self, name: str) -> None:
        """Remove a checkpoint so that a kill midway never leaves half of one visible."""

    def pin(self, name: str, pinned: bool) -> None:
        """Pinned checkpoints are never pruned; pinning a missing one is a CheckpointError."""

    def sweep(self, committed: str) -> None:
        """Remove what killed saves and deletions left, older than the just committed `committed`."""

    def lease(self, holder: Holder) -> Lease:
        """The single-writer lease of this store (see lease.py): a flock, or a lease object."""


def open_store(
    location: str | Path,
    storage_options: dict[str, Any] | None = None,
    staging_dir: str | Path | None = None,
    retry: Any = None,
) -> Store:
    """The store of a location: an fsspec URL is an `ObjectStore` (read with `storage_options`, staged in
    `staging_dir`), anything else a `LocalStore`."""
    if is_remote(location):
        from .object_store import ObjectStore  # fsspec is imported only for a remote location

        return ObjectStore(str(location), storage_options, staging_dir, retry)
    return LocalStore(local_path(location))


class LocalStore:
    """Checkpoints as folders `<directory>/ckpt-<step>`, committed by an atomic rename."""

    def __init__(self, directory: str | Path):
        self.location = self.directory = Path(directory)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.directory)!r})"

    def where(self, name: str) -> Path:
        return self.directory / name

    def address(self) -> dict[str, Any]:
        return {"location": str(self.directory)}

    def check(self) -> None:
        return None  # a missing folder is created by the first commit

    def entries(self) -> dict[str, Entry]:
        if not self.directory.is_dir():
            return {}
        found = {}
        for path in sorted(self.directory.iterdir()):
            if NAME_RE.match(path.name) and path.is_dir():
                found[path.name] = self._entry(path)
        return found

    def entry(self, name: str) -> Entry:
        path = self.where(name)
        if not os.path.lexists(path):
            raise CheckpointError(f"checkpoint {path} does not exist; see `yolo-resume ckpt list`")
        return self._entry(path)

    def _entry(self, path: Path) -> Entry:
        size = 0
        if path.is_dir():
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file() and not f.is_symlink())
        pinned = (self.directory / f"{path.name}{PIN_SUFFIX}").exists()
        return Entry(path.name, size, path.stat().st_mtime if path.exists() else 0.0, pinned)

    def read_meta(self, name: str) -> dict:
        return read_meta(self.where(name))

    def verify(self, name: str) -> None:
        verify_checkpoint(self.where(name))

    @contextmanager
    def open(self, name: str) -> Iterator[Path]:
        yield self.where(name)

    def commit(self, name: str, state: dict, meta: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        existing = self.where(name)
        if existing.exists():  # a corrupt leftover, or a run resumed from further back: keep it aside
            existing.rename(self.directory / f"{name}{SUPERSEDED}{int(time.time())}")
        write_checkpoint(self.directory, name, state, meta)

    def delete(self, name: str) -> None:
        """Rename first, so a kill mid-delete leaves a hidden leftover, never a half checkpoint."""
        path = self.where(name)
        trash = path.with_name(f"{TRASH_PREFIX}{name}-{os.getpid()}")
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
        (self.directory / f"{name}{PIN_SUFFIX}").unlink(missing_ok=True)

    def pin(self, name: str, pinned: bool) -> None:
        marker = self.directory / f"{name}{PIN_SUFFIX}"
        if not pinned:
            marker.unlink(missing_ok=True)
            return
        if not self.where(name).is_dir():
            raise CheckpointError(
                f"`{self.where(name)}` is not a checkpoint folder (ckpt-<step>); see `yolo-resume ckpt list`"
            )
        marker.touch()

    def sweep(self, committed: str) -> None:
        """Finish deletions that a kill interrupted (see `delete`), and drop copies moved aside by a
        commit of the same name (`.superseded-*`) once the checkpoint that replaced them is gone too:
        a moved-aside copy lives as long as its replacement, so retention bounds both."""
        if not self.directory.is_dir():
            return
        committed_names = set(self.entries())
        for entry in self.directory.iterdir():
            name = entry.name
            if name.startswith(TRASH_PREFIX) or (SUPERSEDED in name and superseded_of(name) not in committed_names):
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)

    def lease(self, holder: Holder) -> Lease:
        """A flock on a sibling file (`<parent>/.<folder>.lease`): taking it creates no checkpoints folder."""
        return FileLease(self.directory.parent / f".{self.directory.name}{LEASE_NAME}", holder)
