"""CheckpointManager: the one owner of saving, finding, loading and pruning checkpoints of a run.

The training loop calls it twice: `load` once at start, `save` at each interval. A checkpoint is a
folder `ckpt-<global step, 9 digits>` committed atomically (see `format.py`); "latest" is the
newest folder that verifies, never a pointer file that could disagree with the disk.

The checkpoint folder is local, or a prefix in object storage (`ckpt.dir: s3://bucket/prefix`, any
fsspec URL; see `storage.py`). A remote checkpoint is written locally into a staging folder first
(`<run>/.staging`), uploaded and committed by a marker object in the same background thread, and
downloaded into the staging folder and fully verified before it is loaded.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import CheckpointError
from ..provenance import utc_now
from . import retention
from .format import (
    JSON_MAX_BYTES,
    MANIFEST_FILE,
    MANIFEST_MAX_BYTES,
    META_FILE,
    _check_file_set,
    _decode_meta,
    _loads_strict,
    _parse_json_file,
    _parse_manifest,
    _pid_alive,
    _refuse,
    load_checkpoint,
    read_meta,
    snapshot_to_cpu,
    tensor_digests,
    verify_checkpoint,
    write_checkpoint,
)
from .storage import CHECKPOINT_FILES, Listing, RemoteError, RemoteStore, Retry, is_remote, local_path, modified_time

NAME_RE = re.compile(r"^ckpt-(\d{9,})$")
PIN_SUFFIX = ".pin"
STAGING_DIR = ".staging"  # in the run folder: remote checkpoints are written and downloaded here
DOWNLOADS = "downloads"


def checkpoint_name(global_step: int) -> str:
    return f"ckpt-{global_step:09d}"


@dataclass
class CheckpointInfo:
    """One checkpoint folder as seen on disk (or in object storage): its metadata, or why it cannot
    be used. `path` is a local `Path`, or the URL (a `str`, never a Path) of a remote checkpoint."""

    name: str
    path: Path | str
    meta: dict | None
    error: str | None = None
    pinned: bool = False
    size: int | None = None  # bytes, when the listing already says (remote checkpoints)
    mtime: float | None = None  # commit time, when the listing already says (remote: the marker's)

    @property
    def valid(self) -> bool:
        return self.error is None

    @property
    def location(self) -> str:
        """Where it lives, for messages: a local path or a URL."""
        return str(self.path)

    @property
    def remote(self) -> bool:
        return is_remote(self.path)

    def modified(self) -> float:
        """When it was committed (seconds since the epoch)."""
        return self.mtime if self.mtime is not None else Path(self.path).stat().st_mtime

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
        if self.size is not None:
            return self.size
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
        storage_options: dict[str, Any] | None = None,
        staging_dir: str | Path | None = None,
        retry: Retry | None = None,
    ):
        # A URL stays a str: Path("s3://b/p") would collapse it into "s3:/b/p".
        self.remote = RemoteStore(str(directory), storage_options, retry) if is_remote(directory) else None
        self.directory: Path | str = self.remote.url if self.remote else local_path(directory)
        self.storage_options = dict(storage_options or {})
        self._staging_dir = Path(staging_dir) if staging_dir is not None else None
        self.keep_last, self.keep_best, self.keep_every = keep_last, keep_best, keep_every
        self.async_save = async_save
        self._worker: threading.Thread | None = None
        self._results: list[SaveResult] = []
        self._lock = threading.Lock()
        self._snapshot_taken: threading.Event | None = None
        self._meta_cache: dict[tuple, dict] = {}  # remote: listing fingerprint -> checked meta.json
        self.cleanup_error: CheckpointError | None = None  # remote: the last failed prune after a commit

    @classmethod
    def for_run(cls, ckpt_cfg, run_dir: Path) -> CheckpointManager:
        """The manager of a run's checkpoints, from its `ckpt` config section (`CkptConfig`).
        A remote `ckpt.dir` is listed once here, so a missing bucket or a wrong endpoint stops the
        run before training starts, with the fix."""
        location: str | Path = ckpt_cfg.dir if ckpt_cfg.dir else Path(run_dir) / "checkpoints"
        remote = is_remote(location)
        manager = cls(
            location if remote else local_path(location),
            keep_last=ckpt_cfg.keep_last,
            keep_best=ckpt_cfg.keep_best,
            keep_every=ckpt_cfg.keep_every,
            async_save=ckpt_cfg.async_,
            storage_options=getattr(ckpt_cfg, "storage_options", None),
            staging_dir=Path(run_dir) / STAGING_DIR,
        )
        if manager.remote is not None:
            manager.remote.check()
        return manager

    # -- writing -------------------------------------------------------------------------------
    def save(self, state: dict, meta: dict) -> str:
        """Commit `state` as the checkpoint of `meta['global_step']`, then apply retention.

        With `async_save`, a background thread first copies the state to CPU memory, then writes,
        fsyncs and commits it (and, for a remote `directory`, uploads and commits it remotely); the
        caller must not modify the tensors it handed over until `wait_snapshot()` returns (the trainer
        calls it right before the next backward pass, so the copy overlaps the forward pass). At most
        one save is in flight: a new one first waits for the previous. Failures (disk full, I/O errors,
        upload errors) never raise here: `poll()` reports them, and committed checkpoints are untouched."""
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
            meta = {**meta, "created": utc_now(), "digests": tensor_digests(state)}
            if self.remote is not None:
                self._commit_remote(name, state, meta)
            else:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._move_aside_existing(name)
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

    def _commit_remote(self, name: str, state: dict, meta: dict) -> None:
        """Write locally (fsynced, verified), upload, check, commit by the marker; then retention."""
        staging = self.staging_dir()
        staging.mkdir(parents=True, exist_ok=True)
        for entry in staging.iterdir():  # staged copies of saves that were killed: scratch
            if NAME_RE.match(entry.name):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        local = staging / name
        write_checkpoint(staging, name, state, meta)
        try:
            self.remote.commit(name, local, self.remote.scan())
        except RemoteError as exc:
            raise CheckpointError(
                f"saving checkpoint {name} to {self.directory} failed while {exc.action} {exc.url}: {exc.reason}; "
                f"committed checkpoints are untouched; {exc.fix}"
            ) from exc
        finally:
            shutil.rmtree(local, ignore_errors=True)
        # The checkpoint is committed: retention and clean-up are best effort (the next save retries).
        self.cleanup_error = None
        try:
            listing = self.remote.scan()
            self._prune_remote(listing)
            # Unfinished uploads and deletions older than this commit (server time) are garbage.
            marker = listing.markers.get(name)
            self.remote.remove_uncommitted(listing, modified_time(marker) if marker else None)
        except CheckpointError as exc:
            self.cleanup_error = exc

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

    def staging_dir(self) -> Path:
        """Local scratch for remote checkpoints (`<run>/.staging`, else a private temporary folder)."""
        if self._staging_dir is None:
            self._staging_dir = Path(tempfile.mkdtemp(prefix="yolo-resume-staging-"))
            atexit.register(shutil.rmtree, self._staging_dir, True)
        return self._staging_dir

    # -- pins ----------------------------------------------------------------------------------
    def pin(self, name: str, pinned: bool = True) -> None:
        """Pinned checkpoints are never pruned. The pin is a sibling marker file (or object), so the
        checkpoint folder itself (and its manifest) stays untouched."""
        if self.remote is not None:
            if pinned and name not in self.remote.scan().markers:
                raise CheckpointError(
                    f"no committed checkpoint {self.remote.url_of(name)}; see `yolo-resume ckpt list`"
                )
            self.remote.pin(name, pinned)
            return
        marker = self.directory / f"{name}{PIN_SUFFIX}"
        if pinned:
            marker.touch()
        else:
            marker.unlink(missing_ok=True)

    # -- reading -------------------------------------------------------------------------------
    def list(self, deep: bool = False) -> list[CheckpointInfo]:
        """Every checkpoint folder, oldest first. `deep` hashes every file (slow; for a remote
        checkpoint that means downloading it); otherwise only the manifest and metadata are checked.
        A remote folder without a commit marker is not listed."""
        if self.remote is not None:
            return self._list_remote(self.remote.scan(), deep)
        if not self.directory.is_dir():
            return []
        infos = []
        for entry in sorted(self.directory.iterdir()):
            if entry.is_dir() and NAME_RE.match(entry.name):
                info = inspect(entry, deep=deep)
                info.pinned = (self.directory / f"{entry.name}{PIN_SUFFIX}").exists()
                infos.append(info)
        return infos

    def get(self, name: str, deep: bool = False) -> CheckpointInfo:
        """One checkpoint of this folder by name; CheckpointError when there is none."""
        if self.remote is not None:
            listing = self.remote.scan()
            if name not in listing.markers:
                raise CheckpointError(
                    f"no committed checkpoint {self.remote.url_of(name)}; see `yolo-resume ckpt list`"
                )
            return self._inspect_remote(name, listing, deep)
        info = inspect(self.directory / name, deep=deep)
        info.pinned = (self.directory / f"{name}{PIN_SUFFIX}").exists()
        return info

    def inspect(self, location: str | Path, deep: bool = False) -> CheckpointInfo:
        """A checkpoint by its location (`info.path`): a local folder, or a URL, remote ones read with
        this manager's storage options."""
        remote = self._remote_for(location)
        if remote is None:
            return inspect(Path(location), deep=deep)
        return remote.get(str(location).rstrip("/").rpartition("/")[2], deep=deep)

    def latest_valid(self, on_invalid: Callable[[CheckpointInfo], None] | None = None) -> CheckpointInfo | None:
        """The newest checkpoint that fully verifies; invalid newer ones are reported and skipped.
        A remote one is downloaded to verify it, and that verified copy is kept for `load`."""
        if self.remote is not None:
            listing = self.remote.scan()
            infos = self._list_remote(listing, deep=False)
        else:
            infos = self.list()
        for info in reversed(infos):
            if info.valid:
                if self.remote is not None:
                    pinned = info.pinned
                    info = self._inspect_remote(info.name, listing, deep=True, keep=True)
                    info.pinned = pinned
                else:
                    info = inspect(info.path, deep=True)
            if info.valid:
                return info
            if on_invalid:
                on_invalid(info)
        return None

    def load(self, path: str | Path, map_location: str = "cpu") -> tuple[dict, dict]:
        """Verify a checkpoint completely and return (state, meta). A remote one (a URL) is
        downloaded into the staging folder (or a verified copy there is reused), verified, loaded,
        and the local copy removed."""
        remote = self._remote_for(path)
        if remote is None:
            return load_checkpoint(Path(path), map_location=map_location)
        name = str(path).rstrip("/").rpartition("/")[2]
        local = remote.fetch(name)
        try:
            with _reported_as(local, remote.remote.url_of(name)):
                return load_checkpoint(local, map_location=map_location)
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def fetch(self, name: str) -> Path:
        """A local, verified copy of remote checkpoint `name`, private to this call (the caller
        removes it when done; other processes, e.g. the ranks of a DDP job, get their own). Claims
        the copy that `latest_valid` left in the staging folder when its manifest matches the marker
        (its files are checked against that manifest again by `load_checkpoint`), else downloads."""
        assert self.remote is not None
        url = self.remote.url_of(name)
        expected = self.remote.read_marker(name)
        downloads = self.staging_dir() / DOWNLOADS
        private = downloads / f".claim-{name}-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(private, ignore_errors=True)
        try:
            os.rename(downloads / name, private)  # atomic: one claimant wins, the others download
            if hashlib.sha256((private / MANIFEST_FILE).read_bytes()).hexdigest() == expected:
                return private
        except OSError:
            pass
        shutil.rmtree(private, ignore_errors=True)
        listing = self.remote.scan()
        if name not in listing.markers:
            raise CheckpointError(f"no committed checkpoint {url}; see `yolo-resume ckpt list`")
        self._remote_meta(name, listing)  # the cheap checks first: refuse a wrong file set before downloading
        self._verify_remote(name, dest=private)
        return private

    def _remote_for(self, location: str | Path) -> CheckpointManager | None:
        """The manager that reaches `location`: None for a local path, self for a checkpoint under
        this prefix, else a manager of its parent with the same storage options."""
        if not is_remote(location):
            return None
        if self.remote is not None and self.remote.name_of(str(location)) is not None:
            return self
        parent = str(location).rstrip("/").rpartition("/")[0]
        return CheckpointManager(parent, storage_options=self.storage_options, staging_dir=self._staging_dir)

    # -- remote checks -------------------------------------------------------------------------
    def _list_remote(self, listing: Listing, deep: bool) -> list[CheckpointInfo]:
        infos = []
        for name in sorted(listing.markers):
            if NAME_RE.match(name):
                infos.append(self._inspect_remote(name, listing, deep))
        return infos

    def _inspect_remote(self, name: str, listing: Listing, deep: bool, keep: bool = False) -> CheckpointInfo:
        """Like `inspect`, for a committed remote checkpoint; `deep` downloads and verifies it, and
        `keep` keeps that verified copy in the staging folder (for `load`)."""
        url = self.remote.url_of(name)
        info = CheckpointInfo(
            name,
            url,
            None,
            pinned=name in listing.pins,
            size=listing.folder_size(name),
            mtime=modified_time(listing.markers[name]),
        )
        try:
            info.meta = self._remote_meta(name, listing)
            if deep:
                self._verify_remote(name, dest=self.staging_dir() / DOWNLOADS / name if keep else None)
        except (RemoteError, _StagingError) as err:
            if not getattr(err, "missing", False):
                # The service or the local disk failed, not the checkpoint: never let that make a good
                # checkpoint look corrupt (resume would fall back past it, prune would delete it).
                raise
            info.meta, info.error = None, str(err)
        except CheckpointError as err:
            info.meta, info.error = None, str(err)
        return info

    def _remote_meta(self, name: str, listing: Listing) -> dict:
        """The cheap checks of `format.read_meta`, against the listing: the marker matches the
        manifest, the files and their sizes match the manifest, meta.json matches its hash."""
        files = listing.files.get(name, {})
        key = (name, _object_key(listing.markers[name]), tuple(sorted((f, _object_key(i)) for f, i in files.items())))
        if key in self._meta_cache:
            return self._meta_cache[key]
        url = self.remote.url_of(name)
        nested = sorted(f for f in files if "/" in f)
        if nested:
            raise _refuse(url, repr(nested[0]), "unexpected entry that is not a regular file")
        if MANIFEST_FILE not in files:
            raise _refuse(
                url, MANIFEST_FILE, "is missing (the upload never completed)", "resume from an earlier checkpoint"
            )
        if int(files[MANIFEST_FILE].get("size") or 0) > MANIFEST_MAX_BYTES:
            raise _refuse(url, MANIFEST_FILE, f"is larger than the {MANIFEST_MAX_BYTES} byte limit")
        expected = self.remote.read_marker(name)
        manifest = self.remote.cat(name, MANIFEST_FILE)
        if hashlib.sha256(manifest).hexdigest() != expected:
            raise _refuse(url, MANIFEST_FILE, "SHA-256 does not match the commit marker (modified after the commit)")
        try:
            doc = _loads_strict(manifest)
        except ValueError as exc:
            raise _refuse(url, MANIFEST_FILE, f"is not strict JSON: {exc}") from None
        entries = _parse_manifest(url, doc)
        sizes = {f: SimpleNamespace(st_size=int(i.get("size") or 0)) for f, i in files.items()}
        _check_file_set(url, entries, sizes)
        if entries[META_FILE].size > JSON_MAX_BYTES:
            raise _refuse(url, META_FILE, f"is larger than the {JSON_MAX_BYTES} byte limit")
        data = self.remote.cat(name, META_FILE)
        if len(data) != entries[META_FILE].size or hashlib.sha256(data).hexdigest() != entries[META_FILE].sha256:
            raise _refuse(url, META_FILE, "SHA-256 does not match the manifest (file is corrupt or was modified)")
        meta = _decode_meta(_parse_json_file(url, META_FILE, data))
        self._meta_cache[key] = meta
        return meta

    def _verify_remote(self, name: str, dest: Path | None) -> None:
        """Download every file, check the manifest against the marker, then verify every byte; keep
        the verified copy at `dest` (a shared cache path may be lost to a concurrent reader)."""
        url = self.remote.url_of(name)
        downloads = self.staging_dir() / DOWNLOADS
        part = downloads / f".part-{name}-{os.getpid()}-{threading.get_ident()}"
        _remove_dead_downloads(downloads)
        shutil.rmtree(part, ignore_errors=True)
        try:
            self.remote.download(name, CHECKPOINT_FILES, part)
            expected = self.remote.read_marker(name)
            if hashlib.sha256((part / MANIFEST_FILE).read_bytes()).hexdigest() != expected:
                raise _refuse(
                    url, MANIFEST_FILE, "SHA-256 does not match the commit marker (modified after the commit)"
                )
            with _reported_as(part, url):
                verify_checkpoint(part)
            if dest is not None:
                shutil.rmtree(dest, ignore_errors=True)
                try:
                    os.rename(part, dest)
                except OSError:  # a concurrent reader put its own copy there first: that one serves
                    pass
        except OSError as exc:  # the local disk of the staging folder
            raise _StagingError(
                f"checkpoint {url}: could not download it into {downloads}: {exc}; free disk space and try again"
            ) from exc
        finally:
            shutil.rmtree(part, ignore_errors=True)

    # -- retention -----------------------------------------------------------------------------
    def prune(
        self,
        dry_run: bool = False,
        keep_last: int | None = None,
        keep_best: int | None = None,
        keep_every: int | None = None,
    ) -> list[CheckpointInfo]:
        """Delete what no retention policy keeps (the same pure functions `ckpt prune` uses)."""
        if self.remote is not None:
            return self._prune_remote(self.remote.scan(), dry_run, keep_last, keep_best, keep_every)
        infos = self.list()
        doomed = self._plan(infos, keep_last, keep_best, keep_every)
        if not dry_run:
            for info in doomed:
                delete_checkpoint(info.path)
        return doomed

    def _prune_remote(self, listing: Listing, dry_run=False, keep_last=None, keep_best=None, keep_every=None):
        doomed = self._plan(self._list_remote(listing, deep=False), keep_last, keep_best, keep_every)
        if not dry_run:
            for info in doomed:
                self.remote.delete(info.name, listing)
        return doomed

    def _plan(self, infos, keep_last, keep_best, keep_every) -> list[CheckpointInfo]:
        plan = retention.plan_prune(
            [i.candidate() for i in infos],
            self.keep_last if keep_last is None else keep_last,
            self.keep_best if keep_best is None else keep_best,
            self.keep_every if keep_every is None else keep_every,
        )
        doomed_names = {c.name for c in plan}
        return [i for i in infos if i.name in doomed_names]


def inspect(path: str | Path, deep: bool = False, storage_options: dict | None = None) -> CheckpointInfo:
    """Read one checkpoint's metadata, recording (not raising) why it is unusable. `path` may be the
    URL of a remote checkpoint (a str: never wrap an URL in a Path), read with `storage_options`."""
    if is_remote(path):
        parent, _, name = str(path).rstrip("/").rpartition("/")
        try:
            return CheckpointManager(parent, storage_options=storage_options).get(name, deep=deep)
        except CheckpointError as err:
            return CheckpointInfo(name, str(path), None, str(err))
    path = Path(path)
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


class _StagingError(CheckpointError):
    """The local staging folder failed (e.g. a full disk), not the checkpoint."""


def _remove_dead_downloads(downloads: Path) -> None:
    """Downloads (`.part-` / `.claim-<name>-<pid>-<thread>`) of processes that died before removing them."""
    for entry in [*downloads.glob(".part-*"), *downloads.glob(".claim-*")] if downloads.is_dir() else []:
        pid = entry.name.split("-")[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _object_key(info: dict) -> tuple:
    return (info.get("size"), info.get("ETag") or info.get("etag") or info.get("md5Hash"), modified_time(info))


class _reported_as:
    """Errors about the local copy `local` name the remote checkpoint `url` instead."""

    def __init__(self, local: Path, url: str):
        self.local, self.url = str(local), url

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if isinstance(exc, CheckpointError) and self.local in str(exc):
            raise CheckpointError(str(exc).replace(self.local, self.url)) from None
        return False
