"""CheckpointManager: the one owner of saving, finding, loading and pruning checkpoints of a run.

The training loop calls it twice: `load` once at start, `save` at each interval. A checkpoint is a
folder `ckpt-<global step, 9 digits>` committed atomically (see `format.py`); "latest" is the
newest folder that verifies, never a pointer file that could disagree with the disk.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..provenance import utc_now
from . import retention
from .format import (
    load_checkpoint,
    read_meta,
    snapshot_to_cpu,
    tensor_digests,
    verify_checkpoint,
    write_checkpoint,
)

NAME_RE = re.compile(r"^ckpt-(\d{9,})$")
PIN_SUFFIX = ".pin"


def checkpoint_name(global_step: int) -> str:
    return f"ckpt-{global_step:09d}"


@dataclass
class CheckpointInfo:
    """One checkpoint folder as seen on disk: its metadata, or why it cannot be used."""

    name: str
    path: Path
    meta: dict | None
    error: str | None = None
    pinned: bool = False

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
            "pinned": self.pinned,
            "segment": self.get("segment"),
            "resumed_from": self.get("resumed_from"),
            "lineage": self.get("lineage") or [],
        }

    def candidate(self) -> retention.Candidate:
        return retention.Candidate(
            name=self.name,
            global_step=self.global_step,
            epoch=int(self.get("epoch", 0) or 0),
            valid=self.valid,
            fitness=self.fitness,
            epoch_end=self.get("step_in_epoch") == 0,
            pinned=self.pinned,
        )


@dataclass
class SaveResult:
    """The outcome of one save, reported once by `CheckpointManager.poll`."""

    name: str
    error: CheckpointError | None
    snapshot_s: float  # time to copy the state to CPU memory (in the background when async)
    write_s: float = 0.0  # time to encode, write, fsync and commit (in the background when async)


class CheckpointManager:
    def __init__(
        self,
        directory: str | Path,
        keep_last: int = 3,
        keep_best: int = 1,
        keep_every: int = 0,
        async_save: bool = False,
    ):
        self.directory = Path(directory)
        self.keep_last, self.keep_best, self.keep_every = keep_last, keep_best, keep_every
        self.async_save = async_save
        self._worker: threading.Thread | None = None
        self._results: list[SaveResult] = []
        self._lock = threading.Lock()
        self._snapshot_taken: threading.Event | None = None

    @classmethod
    def for_run(cls, ckpt_cfg, run_dir: Path) -> CheckpointManager:
        """The manager of a run's checkpoints, from its `ckpt` config section (`CkptConfig`)."""
        return cls(
            Path(ckpt_cfg.dir) if ckpt_cfg.dir else Path(run_dir) / "checkpoints",
            keep_last=ckpt_cfg.keep_last,
            keep_best=ckpt_cfg.keep_best,
            keep_every=ckpt_cfg.keep_every,
            async_save=ckpt_cfg.async_,
        )

    # -- writing -------------------------------------------------------------------------------
    def save(self, state: dict, meta: dict) -> str:
        """Commit `state` as the checkpoint of `meta['global_step']`, then apply retention.

        With `async_save`, a background thread first copies the state to CPU memory, then writes,
        fsyncs and commits it; the caller must not modify the tensors it handed over until
        `wait_snapshot()` returns (the trainer calls it right before the next backward pass, so the
        copy overlaps the forward pass). At most one save is in flight: a new one first waits for
        the previous. Failures (disk full, I/O errors) never raise here: `poll()` reports them, and
        committed checkpoints are untouched."""
        self.wait()
        name = checkpoint_name(int(meta["global_step"]))
        self._snapshot_taken = threading.Event()
        if self.async_save:
            self._worker = threading.Thread(
                target=self._snapshot_and_commit, args=(name, state, meta), name=f"save-{name}", daemon=False
            )
            self._worker.start()
        else:
            self._snapshot_and_commit(name, state, meta)
        return name

    def wait_snapshot(self) -> None:
        """Block until the state handed to the last `save()` has been copied (safe to modify again)."""
        if self._snapshot_taken is not None:
            self._snapshot_taken.wait()

    def _snapshot_and_commit(self, name: str, state: dict, meta: dict) -> None:
        start = time.perf_counter()
        try:
            snapshot = snapshot_to_cpu(state)
        except BaseException as exc:  # never leave the trainer waiting on a copy that will not come
            self._snapshot_taken.set()
            error = CheckpointError(f"saving checkpoint {name} failed while copying the state: {exc}")
            with self._lock:
                self._results.append(SaveResult(name, error, time.perf_counter() - start))
            return
        self._snapshot_taken.set()
        copy_s = time.perf_counter() - start
        self._commit(name, snapshot, {**meta, "name": name, "snapshot_s": round(copy_s, 6)}, copy_s)

    def _commit(self, name: str, state: dict, meta: dict, snapshot_s: float) -> None:
        start = time.perf_counter()
        error = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._move_aside_existing(name)
            meta = {**meta, "created": utc_now(), "digests": tensor_digests(state)}
            write_checkpoint(self.directory, name, state, meta)
            self.prune()
            _remove_leftover_trash(self.directory)
        except CheckpointError as exc:
            error = exc
        except OSError as exc:  # e.g. mkdir or rename on a full or read-only disk
            error = CheckpointError(f"saving checkpoint {name} failed: {exc}; committed checkpoints are untouched")
            error.errno = exc.errno
        with self._lock:
            self._results.append(SaveResult(name, error, snapshot_s, time.perf_counter() - start))

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed or has failed."""
        if self._worker is not None:
            self._worker.join()
            self._worker = None

    def poll(self) -> list[SaveResult]:
        """Saves finished since the last call (successes and failures), oldest first."""
        with self._lock:
            results, self._results = self._results, []
        return results

    def _move_aside_existing(self, name: str) -> None:
        """A folder already holds this step (a corrupt leftover, or a run resumed from further back):
        keep it under another name rather than overwrite or delete it."""
        existing = self.directory / name
        if existing.exists():
            existing.rename(self.directory / f"{name}.superseded-{int(time.time())}")

    # -- pins ----------------------------------------------------------------------------------
    def pin(self, name: str, pinned: bool = True) -> None:
        """Pinned checkpoints are never pruned. The pin is a sibling marker file, so the
        checkpoint folder itself (and its manifest) stays untouched."""
        marker = self.directory / f"{name}{PIN_SUFFIX}"
        if pinned:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    # -- reading -------------------------------------------------------------------------------
    def list(self, deep: bool = False) -> list[CheckpointInfo]:
        """Every checkpoint folder, oldest first. `deep` hashes every file (slow); otherwise only
        the manifest and metadata are checked."""
        if not self.directory.is_dir():
            return []
        infos = []
        for entry in sorted(self.directory.iterdir()):
            if entry.is_dir() and NAME_RE.match(entry.name):
                info = inspect(entry, deep=deep)
                info.pinned = (self.directory / f"{entry.name}{PIN_SUFFIX}").exists()
                infos.append(info)
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
    def prune(
        self,
        dry_run: bool = False,
        keep_last: int | None = None,
        keep_best: int | None = None,
        keep_every: int | None = None,
    ) -> list[CheckpointInfo]:
        """Delete what no retention policy keeps (the same pure functions `ckpt prune` uses)."""
        infos = self.list()
        plan = retention.plan_prune(
            [i.candidate() for i in infos],
            self.keep_last if keep_last is None else keep_last,
            self.keep_best if keep_best is None else keep_best,
            self.keep_every if keep_every is None else keep_every,
        )
        doomed_names = {c.name for c in plan}
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


def _remove_leftover_trash(directory: Path) -> None:
    """Finish deletions that a kill interrupted (see `delete_checkpoint`)."""
    for entry in directory.glob(".trash-*"):
        shutil.rmtree(entry, ignore_errors=True)
