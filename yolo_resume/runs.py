"""Run folders: choosing a new one, finding the run and checkpoint to resume, locating checkpoints.

A run's checkpoints live in `<run>/checkpoints`, or wherever its saved config.yaml says (`ckpt.dir`,
which may be an object-storage URL read with `ckpt.storage_options`). URLs stay strings throughout:
`Path("s3://b/p")` would collapse into `s3:/b/p`.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from .checkpoint.manager import NAME_RE, STAGING_DIR, CheckpointInfo, CheckpointManager, inspect
from .checkpoint.storage import is_remote
from .errors import CheckpointError, UserError

RUNS_ROOT = Path("runs")
CONFIG_FILE = "config.yaml"


def checkpoint_location(run_dir: Path) -> tuple[Path | str, dict[str, Any]]:
    """(where a run keeps its checkpoints, the fsspec storage options to reach them): `ckpt.dir` and
    `ckpt.storage_options` from its saved config, else `<run>/checkpoints`."""
    run_dir = Path(run_dir)
    saved = run_dir / CONFIG_FILE
    if saved.is_file():
        try:
            ckpt = (yaml.safe_load(saved.read_text()) or {}).get("ckpt") or {}
        except (yaml.YAMLError, AttributeError):
            ckpt = {}
        ckpt_dir = ckpt.get("dir") if isinstance(ckpt, dict) else None
        if ckpt_dir:
            options = ckpt.get("storage_options") or {}
            if is_remote(ckpt_dir):
                return str(ckpt_dir), dict(options) if isinstance(options, dict) else {}
            return Path(ckpt_dir), {}
    return run_dir / "checkpoints", {}


def checkpoint_dir(run_dir: Path) -> Path | str:
    """Where a run keeps its checkpoints: a local folder, or a URL (a str)."""
    return checkpoint_location(run_dir)[0]


def manager_for(run_dir: Path) -> CheckpointManager:
    location, options = checkpoint_location(run_dir)
    if is_remote(location):
        return CheckpointManager(location, storage_options=options, staging_dir=Path(run_dir) / STAGING_DIR)
    return CheckpointManager(location)


def manager_for_target(target: str | Path | None) -> CheckpointManager:
    """The manager of a run folder, a `checkpoints` folder, or a checkpoint URL prefix (default:
    the most recent run). A bare URL is read with fsspec's defaults and the standard environment
    (e.g. AWS_ENDPOINT_URL), as it carries no storage options."""
    if target is not None and is_remote(target):
        return CheckpointManager(str(target))
    path = Path(target) if target else most_recent_run()
    return CheckpointManager(path) if path.name == "checkpoints" else manager_for(path)


def has_checkpoints(run_dir: Path) -> bool:
    return bool(manager_for(run_dir).list())


def new_run_dir(stem: str, root: Path = RUNS_ROOT) -> tuple[Path, Path | None]:
    """`runs/<stem>`, or `runs/<stem>2`, 3, ... when it already holds a run. Also returns the
    unfinished run that was skipped over, if any, so the caller can point at `--resume`."""
    unfinished = None
    for n in range(1, 10_000):
        candidate = root / (stem if n == 1 else f"{stem}{n}")
        if not candidate.exists() or not (has_checkpoints(candidate) or (candidate / "results.csv").exists()):
            return candidate, unfinished
        newest = manager_for(candidate).list()
        if newest and not newest[-1].get("finished", False):
            unfinished = candidate
    raise UserError(f"too many runs under {root}/{stem}*; pass --run-dir")


def most_recent_run(root: Path = RUNS_ROOT) -> Path:
    """The run under `root` whose newest checkpoint was written last."""
    best: tuple[float, Path] | None = None
    for run in root.iterdir() if root.is_dir() else []:
        for info in manager_for(run).list() if run.is_dir() else []:
            mtime = info.modified()
            if best is None or mtime > best[0]:
                best = (mtime, run)
    if best is None:
        raise UserError(
            f"no run with checkpoints under `{root}/`; start one with `yolo-resume train` or pass --run-dir"
        )
    return best[1]


def find_resume_point(run_dir: Path | None, resume_from: str | Path | None, warn) -> tuple[Path, CheckpointInfo]:
    """(run dir, checkpoint) to resume: an explicit checkpoint (a folder, or a URL read with the
    standard environment), or the newest valid one of the run."""
    if resume_from is not None:
        remote = is_remote(resume_from)
        info = inspect(resume_from if remote else Path(resume_from), deep=True)
        if not info.valid:
            raise CheckpointError(info.error)
        stored = Path(info.get("run_dir") or "")
        if run_dir is None and remote and not stored.is_dir():
            raise UserError(f"pass --run-dir: the run folder of {resume_from} ({stored}) is not on this machine")
        return (run_dir or (stored if stored.is_dir() else Path(resume_from).resolve().parent.parent)), info
    run_dir = run_dir or most_recent_run()
    manager = manager_for(run_dir)
    if not manager.list():
        raise UserError(
            f"nothing to resume: `{manager.directory}` holds no checkpoint yet; start the run without --resume"
        )
    info = manager.latest_valid(
        on_invalid=lambda bad: warn(f"skipping checkpoint {bad.path}: {bad.error}; falling back to an older one")
    )
    if info is None:
        raise CheckpointError(
            f"no valid checkpoint in `{manager.directory}` (all failed verification; see `yolo-resume ckpt verify`)"
        )
    return run_dir, info


def locate_checkpoint(arg: str | Path) -> tuple[CheckpointManager, str] | None:
    """(manager, name) for one checkpoint given as a URL, or as `RUN/ckpt-N` of a run whose
    checkpoints are remote; None when `arg` names no such checkpoint (e.g. a local folder)."""
    if is_remote(arg):
        parent, _, name = str(arg).rstrip("/").rpartition("/")
        return (CheckpointManager(parent), name) if NAME_RE.match(name) else None
    path = Path(arg)
    if path.exists() or not NAME_RE.match(path.name) or not (path.parent / CONFIG_FILE).is_file():
        return None
    manager = manager_for(path.parent)
    return (manager, path.name) if manager.remote is not None else None


def resolve_checkpoint(arg: str | Path | None, deep: bool = True) -> list[CheckpointInfo]:
    """A checkpoint folder, or every checkpoint of a run folder (default: the most recent run).
    Either may be remote: a URL, or a run folder (or `RUN/ckpt-N`) whose checkpoints are remote."""
    if arg is not None:
        located = locate_checkpoint(arg)
        if located is not None:
            manager, name = located
            return [manager.get(name, deep=deep)]
        if is_remote(arg):
            return manager_for_target(arg).list(deep=deep)
    path = Path(arg) if arg else most_recent_run()
    if (path / "manifest.json").exists() or path.is_file():
        return [inspect(path, deep=True)]
    if not path.exists():
        raise UserError(f"`{path}` does not exist; give a run folder or a checkpoint folder")
    return manager_for_target(path).list(deep=deep)


@contextmanager
def local_checkpoint(arg: str | Path) -> Iterator[Path]:
    """A local checkpoint folder for `arg`: itself, or a verified download of a remote checkpoint
    (removed afterwards)."""
    located = locate_checkpoint(arg)
    if located is None:
        yield Path(arg)
        return
    manager, name = located
    local = manager.fetch(name)
    try:
        yield local
    finally:
        shutil.rmtree(local, ignore_errors=True)
