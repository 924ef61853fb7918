"""Where a checkpoint came from: git state, package versions, host and time."""

from __future__ import annotations

import datetime as dt
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path


def _git(cwd: str | Path | None, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_info(cwd: str | Path | None = None) -> dict:
    """Commit, dirty flag and top folder (`repo`) of the git repo containing `cwd` (None values outside one)."""
    if cwd is not None and not Path(cwd).is_dir():
        return {"commit": None, "dirty": None, "repo": None}
    commit = _git(cwd, "rev-parse", "HEAD")
    if not commit:
        return {"commit": None, "dirty": None, "repo": None}
    status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit,
        "dirty": bool(status) if status is not None else None,
        "repo": _git(cwd, "rev-parse", "--show-toplevel"),
    }


def experiment_git(config_file: str | Path | None) -> dict:
    """The user's experiment: the repo holding the config file (the working directory's without one)."""
    return git_info(Path(config_file).resolve().parent if config_file else None)


def code_version() -> dict:
    """yolo-resume itself: its version, and its commit when it runs from a git checkout of itself
    (an installed wheel has none; a site-packages inside some other repo is not ours)."""
    package = Path(__file__).resolve().parent
    info = {"version": versions_of("yolo-resume"), "commit": None, "dirty": None}
    top = _git(package, "rev-parse", "--show-toplevel")
    if top and Path(top, "yolo_resume").resolve() == package:
        repo = git_info(package)
        info |= {"commit": repo["commit"], "dirty": repo["dirty"]}
    return info


def versions_of(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


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
