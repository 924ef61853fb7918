"""Where a checkpoint came from: git state, package versions, host and time."""

from __future__ import annotations

import datetime as dt
import platform
import socket
import subprocess
from importlib import metadata


def git_info(cwd: str | None = None) -> dict:
    """Commit and dirty flag of the repo containing `cwd` (None values outside a repo)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip()

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def versions() -> dict:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "ultralytics": version("ultralytics"),
        "numpy": version("numpy"),
        "yolo-resume": version("yolo-resume"),
    }


def host() -> str:
    return socket.gethostname()


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
