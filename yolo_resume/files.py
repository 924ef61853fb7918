"""Run-folder files that survive a kill mid-write and never hang a reader.

Writes go to a temporary sibling, are fsynced and renamed over the target (then the folder is
fsynced), so a reader sees the old file or the new one, never an empty or torn one. Reads open
only regular files, without following a symlink and without blocking on a FIFO or a device: a
FIFO in place of `steps.csv` must give one line naming it, not a `--resume` that waits forever.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import UserError

MAX_RUN_FILE_BYTES = 1 << 30  # a run file larger than this is not ours (steps.csv of 10M steps is ~1 GB)


class RunFileError(UserError):
    """A run-folder file is not a regular file, or cannot be read: one line naming it and the fix."""


def atomic_write(path: Path, data: str | bytes) -> None:
    """Replace `path` by `data` so that a kill at any instant leaves the old content or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse to fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def check_regular(path: Path, fix: str = "") -> bool:
    """False when `path` does not exist; RunFileError when it exists but is not a regular file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(info.st_mode):
        kind = _kind(info.st_mode)
        raise RunFileError(f"`{path}` is {kind}, not a regular file; {fix or 'move it away and try again'}")
    return True


def read_bytes(path: Path, fix: str = "") -> bytes | None:
    """The bytes of a regular file (None when it does not exist), opened without blocking or following links."""
    if not check_regular(path, fix):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RunFileError(f"`{path}` cannot be read ({exc.strerror}); {fix or 'move it away and try again'}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # swapped between lstat and open
            raise RunFileError(f"`{path}` is {_kind(info.st_mode)}, not a regular file; {fix or 'move it away'}")
        if info.st_size > MAX_RUN_FILE_BYTES:
            raise RunFileError(
                f"`{path}` is {info.st_size} bytes, more than a run file can be; {fix or 'move it away and try again'}"
            )
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path: Path, fix: str = "") -> str | None:
    """A regular file as text (None when missing); undecodable bytes become U+FFFD (callers validate)."""
    data = read_bytes(path, fix)
    return None if data is None else data.decode("utf-8", errors="replace")


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device or special file"
