"""Run folders: choosing a new one, finding the run and checkpoint to resume, locating checkpoints."""

from __future__ import annotations

from pathlib import Path

import yaml

from .checkpoint.manager import CheckpointInfo, CheckpointManager, inspect
from .errors import CheckpointError, UserError

RUNS_ROOT = Path("runs")
CONFIG_FILE = "config.yaml"


def checkpoint_dir(run_dir: Path) -> Path:
    """Where a run keeps its checkpoints: `ckpt.dir` from its saved config, else `<run>/checkpoints`."""
    saved = run_dir / CONFIG_FILE
    if saved.is_file():
        try:
            ckpt_dir = (yaml.safe_load(saved.read_text()) or {}).get("ckpt", {}).get("dir")
        except yaml.YAMLError:
            ckpt_dir = None
        if ckpt_dir:
            return Path(ckpt_dir)
    return run_dir / "checkpoints"


def manager_for(run_dir: Path) -> CheckpointManager:
    return CheckpointManager(checkpoint_dir(run_dir))


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
            mtime = info.path.stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, run)
    if best is None:
        raise UserError(
            f"no run with checkpoints under `{root}/`; start one with `yolo-resume train` or pass --run-dir"
        )
    return best[1]


def find_resume_point(run_dir: Path | None, resume_from: Path | None, warn) -> tuple[Path, CheckpointInfo]:
    """(run dir, checkpoint) to resume: an explicit checkpoint, or the newest valid one of the run."""
    if resume_from is not None:
        info = inspect(Path(resume_from), deep=True)
        if not info.valid:
            raise CheckpointError(info.error)
        stored = Path(info.get("run_dir") or "")
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


def resolve_checkpoint(arg: Path | None, deep: bool = True) -> list[CheckpointInfo]:
    """A checkpoint folder, or every checkpoint of a run folder (default: the most recent run)."""
    path = Path(arg) if arg else most_recent_run()
    if (path / "manifest.json").exists() or path.is_file():
        return [inspect(path, deep=True)]
    if not path.exists():
        raise UserError(f"`{path}` does not exist; give a run folder or a checkpoint folder")
    manager = CheckpointManager(path) if path.name == "checkpoints" else manager_for(path)
    return manager.list(deep=deep)
