"""CheckpointManager: the one owner of saving, finding, loading and pruning checkpoints of a run.

The training loop calls it twice: `load` once at start, `save` at each interval. A checkpoint is a
folder `ckpt-<global step, 9 digits>` committed atomically (see `format.py`); "latest" is the
newest folder that verifies, never a pointer file that could disagree with the disk.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..provenance import utc_now
from . import retention
from .format import load_checkpoint, read_meta, tensor_digests, verify_checkpoint, write_checkpoint

NAME_RE = re.compile(r"^ckpt-(\d{9,})$")


def checkpoint_name(global_step: int) -> str:
    return f"ckpt-{global_step:09d}"


@dataclass
class CheckpointInfo:
    """One checkpoint folder as seen on disk: its metadata, or why it cannot be used."""

    name: str
    path: Path
    meta: dict | None
    error: str | None = None

    @property
    def valid(self) -> bool:
        return self.error is None

    @property
    def global_step(self) -> int:
        match = NAME_RE.match(self.name)
        return int(match.group(1)) if match else int(self.get("global_step", -1))

    def get(self, key: str, default: Any = None) -> Any:
        return (self.meta or {}).get(key, default)

    @property
    def fitness(self) -> float | None:
        return (self.get("metrics") or {}).get("fitness")

    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.iterdir() if f.is_file() and not f.is_symlink())

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "path": str(self.path),
            "epoch": self.get("epoch"),
            "step_in_epoch": self.get("step_in_epoch"),
            "global_step": self.global_step,
            "kind": self.get("kind"),
            "reason": self.get("reason"),
            "valid": self.valid,
            "error": self.error,
            "size_bytes": self.size_bytes(),
            "metrics": self.get("metrics") or {},
            "git_commit": (self.get("git") or {}).get("commit"),
            "git_dirty": (self.get("git") or {}).get("dirty"),
            "created": self.get("created"),
            "finished": self.get("finished", False),
        }

    def candidate(self) -> retention.Candidate:
        return retention.Candidate(
            name=self.name,
            global_step=self.global_step,
            epoch=int(self.get("epoch", 0) or 0),
            valid=self.valid,
            fitness=self.fitness,
            epoch_end=self.get("kind") == "epoch",
        )


class CheckpointManager:
    def __init__(self, directory: str | Path, keep_last: int = 3, keep_best: int = 1):
        self.directory = Path(directory)
        self.keep_last = keep_last
        self.keep_best = keep_best

    # -- writing -------------------------------------------------------------------------------
    def save(self, state: dict, meta: dict) -> Path:
        """Commit `state` as the checkpoint of `meta['global_step']`, then apply retention."""
        self.directory.mkdir(parents=True, exist_ok=True)
        name = checkpoint_name(int(meta["global_step"]))
        self._move_aside_existing(name)
        meta = {**meta, "name": name, "created": utc_now(), "digests": tensor_digests(state)}
        path = write_checkpoint(self.directory, name, state, meta)
        self.prune()
        return path

    def _move_aside_existing(self, name: str) -> None:
        """A folder already holds this step (a corrupt leftover, or a run resumed from further back):
        keep it under another name rather than overwrite or delete it."""
        existing = self.directory / name
        if existing.exists():
            existing.rename(self.directory / f"{name}.superseded-{int(time.time())}")

    # -- reading -------------------------------------------------------------------------------
    def list(self, deep: bool = False) -> list[CheckpointInfo]:
        """Every checkpoint folder, oldest first. `deep` hashes every file (slow); otherwise only
        the manifest and metadata are checked."""
        if not self.directory.is_dir():
            return []
        infos = []
        for entry in sorted(self.directory.iterdir()):
            if entry.is_dir() and NAME_RE.match(entry.name):
                infos.append(inspect(entry, deep=deep))
        return infos

    def latest_valid(self, on_invalid: Callable[[CheckpointInfo], None] | None = None) -> CheckpointInfo | None:
        """The newest checkpoint that fully verifies; invalid newer ones are reported and skipped."""
        for info in reversed(self.list()):
            if info.valid:
                info = inspect(info.path, deep=True)
            if info.valid:
                return info
            if on_invalid:
                on_invalid(info)
        return None

    def load(self, path: str | Path, map_location: str = "cpu") -> tuple[dict, dict]:
        return load_checkpoint(Path(path), map_location=map_location)

    # -- retention -----------------------------------------------------------------------------
    def prune(self, dry_run: bool = False) -> list[CheckpointInfo]:
        infos = self.list()
        doomed_names = {
            c.name for c in retention.plan_prune([i.candidate() for i in infos], self.keep_last, self.keep_best)
        }
        doomed = [i for i in infos if i.name in doomed_names]
        if not dry_run:
            for info in doomed:
                delete_checkpoint(info.path)
        return doomed


def inspect(path: Path, deep: bool = False) -> CheckpointInfo:
    """Read one checkpoint's metadata, recording (not raising) why it is unusable."""
    try:
        if deep:
            verify_checkpoint(path)
        meta = read_meta(path)
    except CheckpointError as err:
        return CheckpointInfo(path.name, path, None, str(err))
    return CheckpointInfo(path.name, path, meta)


def delete_checkpoint(path: Path) -> None:
    """Rename first, so a kill mid-delete leaves a hidden leftover, never a half checkpoint."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)
