"""Finding the run and checkpoint to resume.

Transitional: the resume plan moves into session.py with the trainer half of the architecture
change; the run folder itself is `run_dir.RunDir`, a user's argument is resolved by
`checkpoint.ref.resolve`."""

from __future__ import annotations

from pathlib import Path

from .checkpoint.manager import CheckpointManager
from .checkpoint.ref import CheckpointInfo, resolve
from .errors import CheckpointError, UserError
from .run_dir import RunDir, most_recent_run, new_run_dir

CONFIG_FILE = RunDir.CONFIG
__all__ = ["CONFIG_FILE", "find_resume_point", "has_checkpoints", "most_recent_run", "new_run_dir"]


def has_checkpoints(run_dir: Path) -> bool:
    return RunDir(run_dir).has_checkpoints()


def find_resume_point(run_dir: Path | None, resume_from: str | Path | None, warn) -> tuple[Path, CheckpointInfo]:
    """(run dir, checkpoint) to resume: an explicit checkpoint (a folder, or a URL read with the
    standard environment), or the newest valid one of the run."""
    if resume_from is not None:
        info = resolve(resume_from).one().info(deep=True)
        if not info.valid:
            raise CheckpointError(info.error)
        stored = Path(info.get("run_dir") or "")
        if run_dir is None and isinstance(info.path, str) and not stored.is_dir():
            raise UserError(f"pass --run-dir: the run folder of {resume_from} ({stored}) is not on this machine")
        return (run_dir or (stored if stored.is_dir() else Path(resume_from).resolve().parent.parent)), info
    run_dir = run_dir or most_recent_run()
    manager = CheckpointManager(RunDir(run_dir).store())
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
