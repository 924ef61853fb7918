"""CheckpointManager: the one owner of saving, finding, loading and pruning checkpoints of a run.

The training loop calls it twice: `load` once at start, `save` at each interval. A checkpoint is
`ckpt-<global step, 9 digits>` committed atomically by its store (`store.py`: a local folder, or a
prefix in object storage); "latest" is the newest checkpoint that verifies, never a pointer file that
could disagree with the store. The manager owns the background save thread, retention and
`latest_valid`; where the bytes go is the store's business alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError
from ..provenance import utc_now
from . import retention
from .format import load_checkpoint, snapshot_to_cpu, tensor_digests
from .ref import CheckpointInfo, describe
from .store import NAME_RE, Store, checkpoint_name, open_store

__all__ = ["NAME_RE", "CheckpointInfo", "CheckpointManager", "SaveResult", "checkpoint_name"]


@dataclass
class SaveResult:
    """The outcome of one save, reported once by `CheckpointManager.poll`."""

    name: str
    error: CheckpointError | None
    snapshot_s: float  # time to copy the state to CPU memory (in the background when async)
    write_s: float = 0.0  # time to encode, write, fsync and commit (in the background when async)
    cleanup_error: CheckpointError | None = None  # committed, but retention or the sweep after it failed


class CheckpointManager:
    def __init__(
        self,
        store: Store | str | Path,
        keep_last: int = 3,
        keep_best: int = 1,
        keep_every: int = 0,
        async_save: bool = False,
    ):
        self.store: Store = store if isinstance(store, Store) else open_store(store)
        self.keep_last, self.keep_best, self.keep_every = keep_last, keep_best, keep_every
        self.async_save = async_save
        self._worker: threading.Thread | None = None
        self._results: list[SaveResult] = []
        self._lock = threading.Lock()
        self._snapshot_taken: threading.Event | None = None

    @property
    def directory(self) -> Path | str:
        """The store's folder or URL, for messages."""
        return self.store.location

    # -- writing -------------------------------------------------------------------------------
    def save(self, state: dict, meta: dict) -> str:
        """Commit `state` as the checkpoint of `meta['global_step']`, then apply retention.

        With `async_save`, a background thread first copies the state to CPU memory, then writes,
        fsyncs and commits it (for an object store: uploads and commits it remotely); the caller must
        not modify the tensors it handed over until `wait_snapshot()` returns (the trainer calls it
        right before the next backward pass, so the copy overlaps the forward pass). At most one save
        is in flight: a new one first waits for the previous. Failures (disk full, I/O errors, upload
        errors) never raise here: `poll()` reports them, and committed checkpoints are untouched."""
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
            self._report(SaveResult(name, error, time.perf_counter() - start))
            return
        self._snapshot_taken.set()
        copy_s = time.perf_counter() - start
        self._commit(name, snapshot, {**meta, "name": name, "snapshot_s": round(copy_s, 6)}, copy_s)

    def _commit(self, name: str, state: dict, meta: dict, snapshot_s: float) -> None:
        start = time.perf_counter()
        result = SaveResult(name, None, snapshot_s)
        try:
            self.store.commit(name, state, {**meta, "created": utc_now(), "digests": tensor_digests(state)})
        except CheckpointError as exc:
            result.error = exc
        except OSError as exc:  # e.g. mkdir or rename on a full or read-only disk
            result.error = CheckpointError(
                f"saving checkpoint {name} failed: {exc}; committed checkpoints are untouched"
            )
            result.error.errno = exc.errno
        if result.error is None:
            # Committed: retention and the sweep are best effort (the next save retries), and reported.
            try:
                self.prune()
                self.store.sweep(name)
            except (CheckpointError, OSError) as exc:
                result.cleanup_error = exc if isinstance(exc, CheckpointError) else CheckpointError(str(exc))
        result.write_s = time.perf_counter() - start
        self._report(result)

    def _report(self, result: SaveResult) -> None:
        with self._lock:
            self._results.append(result)

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

    # -- pins ----------------------------------------------------------------------------------
    def pin(self, name: str, pinned: bool = True) -> None:
        """Pinned checkpoints are never pruned. The pin is a sibling marker file (or object), so the
        checkpoint itself (and its manifest) stays untouched."""
        self.store.pin(name, pinned)

    # -- reading -------------------------------------------------------------------------------
    def list(self, deep: bool = False) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest first. `deep` checks every byte (slow; for an object
        store that means downloading it); otherwise only the manifest and metadata are checked."""
        return [self._info(entry, deep) for entry in self.store.entries().values()]

    def get(self, name: str, deep: bool = False) -> CheckpointInfo:
        """One checkpoint by name; CheckpointError when the store holds none of that name."""
        return self._info(self.store.entry(name), deep)

    def _info(self, entry, deep: bool) -> CheckpointInfo:
        return describe(self.store, entry, deep)

    def latest_valid(self, on_invalid: Callable[[CheckpointInfo], None] | None = None) -> CheckpointInfo | None:
        """The newest checkpoint on the current timeline that fully verifies (see retention.newest_first:
        after a branch, the branch's newest, not the abandoned steps'); invalid newer ones are reported
        and skipped. (An object store keeps the copy it downloaded to verify, so `load` does not fetch it again.)"""
        entries = self.store.entries()
        infos = {name: self._info(entry, deep=False) for name, entry in entries.items()}
        bad = [info for info in infos.values() if not info.valid]
        order = retention.newest_first([info.candidate() for info in infos.values() if info.valid])
        found = None
        for candidate in order:
            info = self._info(entries[candidate.name], deep=True)
            if info.valid:
                found = info
                break
            bad.append(info)
        skipped = [b for b in bad if found is None or b.global_step > found.global_step]
        for info in sorted(skipped, key=lambda i: i.global_step, reverse=True) if on_invalid else []:
            on_invalid(info)
        return found

    def load(self, name: str, map_location: str = "cpu") -> tuple[dict, dict]:
        """Verify a checkpoint of this store completely and return (state, meta)."""
        with self.store.open(name) as local:
            return load_checkpoint(local, map_location=map_location)

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
                self.store.delete(info.name)
        return doomed
