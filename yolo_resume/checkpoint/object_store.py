"""Checkpoints in object storage: a prefix under any fsspec URL (`s3://bucket/prefix`, `gs://...`).

Layout under the prefix (one LIST of the prefix sees everything)::

    ckpt-000000012/tensors.safetensors    the four files of the local format (see `format.py`),
    ckpt-000000012/state.json             uploaded from a local staging copy that was written,
    ckpt-000000012/meta.json              fsynced and verified by `format.write_checkpoint`
    ckpt-000000012/manifest.json
    ckpt-000000012.committed              the commit marker: SHA-256 of manifest.json, written only
                                          after every file is uploaded and checked
    ckpt-000000012.pin                    pinned: never pruned

Object stores have no atomic folder rename, so the marker is the commit: a folder without one is
an unfinished upload (a killed or failed save) that readers ignore and the next successful save
removes. Deleting removes the marker first, so a checkpoint is never visible half deleted. A reader
checks the marker against the manifest, the listing's sizes against the manifest, and, before
anything is loaded, every byte of a downloaded copy (`format.verify_checkpoint`).

Every remote call is retried with exponential backoff on transient errors (connection resets,
timeouts, 5xx); errors that cannot succeed (missing bucket, access denied, missing credentials) fail
at once with one line naming the URL and the fix. Credentials never pass through here: fsspec /
botocore read them from the standard AWS environment and files; `ckpt.storage_options` holds only
non-secret options (validated in `config.py`), and messages are scrubbed of URL user info.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import lease as leases
from ..errors import CheckpointError
from ..lease import UNKNOWN, Holder
from .format import DATA_FILES, MANIFEST_FILE, _crash_point, _pid_alive, read_listed_meta, verify_checkpoint
from .store import LEASE_NAME, NAME_RE, PIN_SUFFIX, SUPERSEDED, Entry, superseded_of

COMMIT_SUFFIX = ".committed"
MARKER_FORMAT = "yolo-resume-remote-commit"
MARKER_VERSION = 1
MARKER_MAX_BYTES = 64 << 10
CHECKPOINT_FILES = (*DATA_FILES, MANIFEST_FILE)  # upload order: the manifest last
READBACK_MAX_BYTES = 1 << 20  # uploaded files up to this size are read back and hashed; larger: size only

_USERINFO_RE = re.compile(r"(://)[^/@\s]+@")
_CREDENTIAL_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")


def redact(text: str) -> str:
    """`text` with URL user info and the values of AWS credential variables removed."""
    text = _USERINFO_RE.sub(r"\1***@", text)
    for var in _CREDENTIAL_ENV:
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, f"<{var}>")
    return text


@dataclass
class Retry:
    """How often and how patiently a remote call is retried on transient errors."""

    tries: int = 4
    delay_s: float = 0.2  # doubles after each failed try
    sleep: Callable[[float], None] = time.sleep


class RemoteError(CheckpointError):
    """A remote operation failed for good: one line naming the operation, the URL and the fix."""

    def __init__(self, action: str, url: str, reason: str, fix: str, missing: bool = False):
        self.action, self.url, self.reason, self.fix, self.missing = action, url, reason, fix, missing
        self.unavailable = not missing  # the service failed, not the checkpoint (see store.py)
        super().__init__(f"{action} {url} failed: {reason}; {fix}")


@dataclass
class Listing:
    """Everything under a prefix, from one recursive listing."""

    markers: dict[str, dict] = field(default_factory=dict)  # checkpoint name -> marker object info
    pins: set[str] = field(default_factory=set)
    files: dict[str, dict[str, dict]] = field(default_factory=dict)  # folder -> {relative name: info}
    other: dict[str, dict] = field(default_factory=dict)  # anything else at the top level

    def folder_size(self, name: str) -> int:
        return sum(int(info.get("size") or 0) for info in self.files.get(name, {}).values())


def modified_time(info: dict) -> float | None:
    """An object's modification time (seconds since the epoch) from an fsspec info dict, if any."""
    for key in ("LastModified", "mtime", "last_modified", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


class ObjectStore:
    """A checkpoint prefix in object storage, reached through fsspec (a `store.Store`)."""

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        staging_dir: Path | None = None,
        retry: Retry | None = None,
        fs: Any = None,
    ):
        """`fs`: an fsspec filesystem to reach the URL with instead of the one fsspec picks for it
        (tests put a fault-injecting wrapper here)."""
        self.url = self.location = str(url).rstrip("/")
        self.storage_options = dict(storage_options or {})
        self._staging_dir = Path(staging_dir) if staging_dir is not None else None
        self._listing: Listing | None = None  # the newest listing, read by read_meta/delete
        self._meta_cache: dict[tuple, dict] = {}  # listing fingerprint of a checkpoint -> its checked meta.json
        self.retry = retry or Retry()
        if fs is not None:
            self.fs, root = fs, fs._strip_protocol(self.url)
        else:
            self.fs, root = _open_filesystem(self.url, self.storage_options)
        self.root = root.rstrip("/")
        self.bucket = self.root.split("/", 1)[0]

    # -- addresses -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def url_of(self, *parts: str) -> str:
        return "/".join((self.url, *parts))

    def where(self, name: str) -> str:
        return self.url_of(name)

    def __repr__(self) -> str:
        return f"ObjectStore({self.url!r})"

    def address(self) -> dict[str, Any]:
        staging = str(self._staging_dir) if self._staging_dir is not None else None
        return {"location": self.url, "storage_options": self.storage_options, "staging_dir": staging}

    # -- the retried call ------------------------------------------------------------------------
    def call(self, action: str, url: str, fn: Callable, *args, missing_ok: bool = False, **kwargs) -> Any:
        """`fn(*args, **kwargs)`, retried on transient errors; a lasting failure is a RemoteError.
        With `missing_ok`, a missing object (not a missing bucket) returns None."""
        delay = self.retry.delay_s
        for attempt in range(1, self.retry.tries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if isinstance(exc, FileNotFoundError) and not _bucket_missing(exc) and missing_ok:
                    return None
                if attempt < self.retry.tries and _transient(exc):
                    self.retry.sleep(delay)
                    delay *= 2
                    continue
                raise self._error(action, url, exc, attempt) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, action: str, url: str, exc: BaseException, tries: int) -> RemoteError:
        reason = redact(_one_line(exc))
        missing = False
        if _bucket_missing(exc):
            fix = (
                f"the bucket `{self.bucket}` does not exist: create it (e.g. `aws s3 mb s3://{self.bucket}`) or fix "
                "ckpt.dir; for MinIO or another S3-compatible server also check ckpt.storage_options.endpoint_url"
            )
        elif isinstance(exc, FileNotFoundError):
            missing, reason, fix = True, "no such object", "it was deleted, or the checkpoint was never committed"
        elif _credentials_missing(exc):
            fix = (
                "no credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                "~/.aws/credentials"
            )
        elif isinstance(exc, PermissionError) or "AccessDenied" in reason or "Forbidden" in reason:
            fix = (
                "access denied: check the AWS credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                "~/.aws/credentials) and the bucket's permissions"
            )
        elif _transient(exc):
            fix = (
                f"gave up after {tries} {'try' if tries == 1 else 'tries'}: check the network and "
                "ckpt.storage_options.endpoint_url, then try again"
            )
        else:
            fix = "check ckpt.dir, ckpt.storage_options and the storage service, then try again"
        return RemoteError(action, url, reason, fix, missing=missing)

    # -- reading ---------------------------------------------------------------------------------
    def check(self) -> None:
        """Fail early, with the fix, when the prefix cannot be listed (missing bucket, bad endpoint).
        One try: the client library already retried a connection error, and nothing is at stake yet."""
        retry, self.retry = self.retry, Retry(tries=1)
        try:
            self.scan()
        finally:
            self.retry = retry

    def scan(self) -> Listing:
        """One recursive listing of the prefix, grouped into markers, pins and checkpoint folders."""
        self.fs.invalidate_cache()
        found = self.call("listing", self.url, self.fs.find, self.root, detail=True, missing_ok=True) or {}
        listing = Listing()
        prefix = self.root + "/"
        for full, info in found.items():
            full = full.rstrip("/")
            if not full.startswith(prefix) or info.get("type", "file") != "file":
                continue
            rel = full[len(prefix) :]
            folder, sep, inner = rel.partition("/")
            if sep:
                listing.files.setdefault(folder, {})[inner] = info
            elif rel.endswith(COMMIT_SUFFIX):
                listing.markers[rel[: -len(COMMIT_SUFFIX)]] = info
            elif rel.endswith(PIN_SUFFIX):
                listing.pins.add(rel[: -len(PIN_SUFFIX)])
            else:
                listing.other[rel] = info
        return listing

    def cat(self, name: str, file: str | None = None) -> bytes:
        parts = (name, file) if file else (name,)
        return self.call("reading", self.url_of(*parts), self.fs.cat_file, self.path(*parts))

    def read_marker(self, name: str) -> str:
        """The manifest SHA-256 that the commit marker of `name` holds."""
        url = self.url_of(name + COMMIT_SUFFIX)
        data = self.cat(name + COMMIT_SUFFIX)
        try:
            doc = json.loads(data[:MARKER_MAX_BYTES].decode("utf-8"))
            ok = doc.get("format") == MARKER_FORMAT and doc.get("version") == MARKER_VERSION
            digest = doc.get("manifest_sha256")
            ok = ok and isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise CheckpointError(
                f"checkpoint {self.url_of(name)}: commit marker {url} is malformed; "
                "the checkpoint is corrupt or was tampered with; resume from an earlier checkpoint"
            )
        return digest

    def download(self, name: str, files: Iterable[str], dest: Path) -> None:
        dest.mkdir(parents=True, exist_ok=True)
        for file in files:
            url = self.url_of(name, file)
            self.call("downloading", url, self.fs.get_file, self.path(name, file), str(dest / file))

    # -- writing ---------------------------------------------------------------------------------
    def _upload(self, name: str, local: Path, listing: Listing | None = None) -> None:
        """Upload the verified local checkpoint folder `local` as `name`, then write its marker."""
        listing = listing if listing is not None else self.scan()
        if name in listing.markers:  # a committed checkpoint of this step (resumed from further back)
            self._move_aside(name, listing)
        leftovers = [self.path(name, rel) for rel in listing.files.get(name, {})]
        if leftovers:  # an unfinished upload of this name (a killed save): not a checkpoint, replace it
            self.call("removing", self.url_of(name), self.fs.rm, leftovers)
        sizes, small = {}, {}
        for i, file in enumerate(CHECKPOINT_FILES):
            source = local / file
            sizes[file] = source.stat().st_size
            if sizes[file] <= READBACK_MAX_BYTES:
                small[file] = hashlib.sha256(source.read_bytes()).hexdigest()
            self.call("uploading", self.url_of(name, file), self.fs.put_file, str(source), self.path(name, file))
            if i == 0:
                _crash_point("upload_started")
        self._verify_upload(name, sizes, small)
        manifest_sha = hashlib.sha256((local / MANIFEST_FILE).read_bytes()).hexdigest()
        marker = {"format": MARKER_FORMAT, "version": MARKER_VERSION, "name": name, "manifest_sha256": manifest_sha}
        _crash_point("before_marker")
        marker_path = self.path(name + COMMIT_SUFFIX)
        self.call("committing", self.url_of(name + COMMIT_SUFFIX), self.fs.pipe_file, marker_path, _json(marker))
        _crash_point("after_marker")

    def _verify_upload(self, name: str, sizes: dict[str, int], small: dict[str, str]) -> None:
        """Every uploaded object has the local size; small ones also the local SHA-256 (read back).
        The tensor file is checked by size here and by its manifest checksum on every download. (SHA-256
        here and in the marker: they cover only files of at most 1 MiB, and the marker's format stays.)"""
        self.fs.invalidate_cache()
        for file, size in sizes.items():
            url = self.url_of(name, file)
            info = self.call("checking", url, self.fs.info, self.path(name, file))
            if int(info.get("size") or -1) != size:
                raise RemoteError(
                    "checking", url, f"it is {info.get('size')} bytes after the upload, not {size}", "try again"
                )
            if file in small and hashlib.sha256(self.cat(name, file)).hexdigest() != small[file]:
                raise RemoteError(
                    "checking", url, "its SHA-256 after the upload differs from the local file", "try again"
                )

    def _move_aside(self, name: str, listing: Listing) -> None:
        """Keep an existing committed checkpoint under another (invisible) name rather than overwrite
        it: copy it server-side, then uncommit it (marker first), like the local rename aside."""
        aside = f"{name}{SUPERSEDED}{int(time.time())}"
        for rel in listing.files.get(name, {}):
            url = self.url_of(aside, rel)
            self.call("copying", url, self.fs.copy, self.path(name, rel), self.path(aside, rel))
        self.call("uncommitting", self.url_of(name + COMMIT_SUFFIX), self.fs.rm_file, self.path(name + COMMIT_SUFFIX))

    def _delete(self, name: str, listing: Listing | None = None) -> None:
        """Marker first, so a kill mid-delete leaves an invisible uncommitted folder, never half a checkpoint."""
        self.call(
            "deleting",
            self.url_of(name + COMMIT_SUFFIX),
            self.fs.rm_file,
            self.path(name + COMMIT_SUFFIX),
            missing_ok=True,
        )
        files = (listing.files if listing is not None else self.scan().files).get(name, {})
        if files:
            self.call("deleting", self.url_of(name), self.fs.rm, [self.path(name, rel) for rel in files])

    def _remove_uncommitted(self, listing: Listing, older_than: float | None) -> list[str]:
        """Remove checkpoint folders that have no marker (killed uploads and deletions) whose objects
        are all older than `older_than` (server time), so a concurrent writer elsewhere is spared."""
        removed = []
        for folder, files in listing.files.items():
            if SUPERSEDED in folder and superseded_of(folder) not in listing.markers:
                # A copy moved aside lives as long as the checkpoint that replaced it (as in a folder).
                self.call("removing", self.url_of(folder), self.fs.rm, [self.path(folder, rel) for rel in files])
                removed.append(folder)
                continue
            if folder in listing.markers or not folder.startswith("ckpt-") or SUPERSEDED in folder:
                continue
            times = [modified_time(info) for info in files.values()]
            if older_than is None or any(t is None or t >= older_than for t in times):
                continue
            self.call("removing", self.url_of(folder), self.fs.rm, [self.path(folder, rel) for rel in files])
            removed.append(folder)
        return removed

    def _set_pin(self, name: str, pinned: bool) -> None:
        path, url = self.path(name + PIN_SUFFIX), self.url_of(name + PIN_SUFFIX)
        if pinned:
            self.call("pinning", url, self.fs.pipe_file, path, b"")
        else:
            self.call("unpinning", url, self.fs.rm_file, path, missing_ok=True)

    # -- the Store protocol ----------------------------------------------------------------------
    def entries(self) -> dict[str, Entry]:
        listing = self._rescan()
        return {name: self._entry(name, listing) for name in sorted(listing.markers) if NAME_RE.match(name)}

    def entry(self, name: str) -> Entry:
        listing = self._rescan()
        self._require_committed(name, listing)
        return self._entry(name, listing)

    def read_meta(self, name: str) -> dict:
        """The cheap checks of `format.read_listed_meta` against the listing and the commit marker,
        cached per version of the objects (a listing of many checkpoints reads each meta.json once)."""
        listing = self._listing_of(name)
        files = listing.files.get(name, {})
        key = (name, _object_key(listing.markers[name]), tuple(sorted((f, _object_key(i)) for f, i in files.items())))
        if key not in self._meta_cache:
            url = self.url_of(name)
            nested = sorted(f for f in files if "/" in f)
            if nested:
                raise CheckpointError(
                    f"checkpoint {url}: {nested[0]!r}: unexpected entry that is not a regular file; "
                    "the checkpoint is corrupt or was tampered with; resume from an earlier checkpoint"
                )
            sizes = {f: int(info.get("size") or 0) for f, info in files.items()}
            expected = self.read_marker(name)
            self._meta_cache[key] = read_listed_meta(
                url, sizes, lambda file, limit: self.cat(name, file)[:limit], manifest_sha256=expected
            )
        return self._meta_cache[key]

    def verify(self, name: str) -> None:
        """Download every file, check the manifest against the marker, then verify every byte. The
        verified copy is kept (only the newest one) for `open`, so a resume downloads once."""
        self.read_meta(name)  # the cheap checks first: refuse a wrong file set before downloading
        downloads = self.staging_dir() / DOWNLOADS
        with self._verified_download(name) as part:
            for old in downloads.glob("ckpt-*"):
                shutil.rmtree(old, ignore_errors=True)
            try:
                os.rename(part, downloads / name)
            except OSError:  # a concurrent reader put its own copy there first: that one serves
                pass

    @contextmanager
    def open(self, name: str) -> Iterator[Path]:
        """A verified local copy private to this call (other processes, e.g. the ranks of a DDP job, get
        their own): the copy `verify` kept when its manifest still matches the marker (claimed by an
        atomic rename: one claimant wins, the others download), else a fresh download. Errors about
        the copy name the checkpoint's URL."""
        url = self.url_of(name)
        expected = self.read_marker(name)
        downloads = self.staging_dir() / DOWNLOADS
        private = downloads / f".claim-{name}-{os.getpid()}-{threading.get_ident()}"
        shutil.rmtree(private, ignore_errors=True)
        try:
            claimed = False
            try:
                os.rename(downloads / name, private)
                claimed = hashlib.sha256((private / MANIFEST_FILE).read_bytes()).hexdigest() == expected
            except OSError:
                pass
            if not claimed:
                shutil.rmtree(private, ignore_errors=True)
                self._require_committed(name, self._rescan())
                self.read_meta(name)
                with self._verified_download(name) as part:
                    os.rename(part, private)
            with _reported_as(private, url):
                yield private
        finally:
            shutil.rmtree(private, ignore_errors=True)

    def commit(self, name: str, state: dict, meta: dict) -> None:
        """Write locally (fsynced, verified) into the staging folder, upload, check, commit by the marker."""
        from .format import write_checkpoint

        self._check_lease(f"saving checkpoint {name}")
        staging = self.staging_dir()
        staging.mkdir(parents=True, exist_ok=True)
        for entry in staging.iterdir():  # staged copies of saves that were killed: scratch
            if NAME_RE.match(entry.name):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        local = staging / name
        write_checkpoint(staging, name, state, meta)
        try:
            self._upload(name, local, self.scan())
        except RemoteError as exc:
            raise CheckpointError(
                f"saving checkpoint {name} to {self.url} failed while {exc.action} {exc.url}: {exc.reason}; "
                f"committed checkpoints are untouched; {exc.fix}"
            ) from exc
        finally:
            shutil.rmtree(local, ignore_errors=True)

    def delete(self, name: str) -> None:
        self._check_lease(f"deleting checkpoint {name}")
        self._delete(name, self._listing_of(name))

    def lease(self, holder: Holder) -> ObjectLease:
        return ObjectLease(self, holder)

    def _check_lease(self, doing: str) -> None:
        why = leases.lost(self.url)
        if why is not None:
            raise CheckpointError(f"{doing} in {self.url} refused: {why}; this process no longer writes the run")

    def pin(self, name: str, pinned: bool) -> None:
        if pinned:
            self._require_committed(name, self._rescan())
        self._set_pin(name, pinned)

    def sweep(self, committed: str) -> None:
        """Unfinished uploads and deletions older than the commit of `committed` (server time) are garbage."""
        listing = self._rescan()
        marker = listing.markers.get(committed)
        self._remove_uncommitted(listing, modified_time(marker) if marker else None)

    def staging_dir(self) -> Path:
        """Local scratch for uploads and downloads (`<run>/.staging`, else a private temporary folder)."""
        if self._staging_dir is None:
            self._staging_dir = Path(tempfile.mkdtemp(prefix="yolo-resume-staging-"))
            atexit.register(shutil.rmtree, self._staging_dir, True)
        return self._staging_dir

    def _rescan(self) -> Listing:
        self._listing = self.scan()
        return self._listing

    def _listing_of(self, name: str) -> Listing:
        """The newest listing when it holds `name`, else a fresh one; CheckpointError when not committed."""
        listing = self._listing
        if listing is None or name not in listing.markers:
            listing = self._rescan()
        self._require_committed(name, listing)
        return listing

    def _require_committed(self, name: str, listing: Listing) -> None:
        if name not in listing.markers:
            raise CheckpointError(f"no committed checkpoint {self.url_of(name)}; see `yolo-resume ckpt list`")

    @staticmethod
    def _entry(name: str, listing: Listing) -> Entry:
        mtime = modified_time(listing.markers[name])
        return Entry(name, listing.folder_size(name), mtime if mtime is not None else 0.0, name in listing.pins)

    @contextmanager
    def _verified_download(self, name: str) -> Iterator[Path]:
        """A download of `name` into a private `.part-` folder, checked against the marker and verified
        byte for byte; removed afterwards unless the caller renamed it away."""
        url = self.url_of(name)
        downloads = self.staging_dir() / DOWNLOADS
        part = downloads / f".part-{name}-{os.getpid()}-{threading.get_ident()}"
        _remove_dead_downloads(downloads)
        shutil.rmtree(part, ignore_errors=True)
        try:
            self.download(name, CHECKPOINT_FILES, part)
            expected = self.read_marker(name)
            if hashlib.sha256((part / MANIFEST_FILE).read_bytes()).hexdigest() != expected:
                raise CheckpointError(
                    f"checkpoint {url}: {MANIFEST_FILE}: SHA-256 does not match the commit marker (modified after "
                    "the commit); the checkpoint is corrupt or was tampered with; resume from an earlier checkpoint"
                )
            with _reported_as(part, url):
                verify_checkpoint(part)
            yield part
        except OSError as exc:  # the local disk of the staging folder
            raise StagingError(
                f"checkpoint {url}: could not download it into {downloads}: {exc}; free disk space and try again"
            ) from exc
        finally:
            shutil.rmtree(part, ignore_errors=True)


def _open_filesystem(url: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    """(filesystem, root path) of an fsspec URL; a missing backend or bad option is one clear line."""
    try:
        import fsspec.core
    except ImportError:  # pragma: no cover - fsspec is a dependency
        raise CheckpointError(f"ckpt.dir {url} needs fsspec; pip install fsspec") from None
    try:
        # A fresh filesystem, not fsspec's cached instance for these arguments: that one keeps the endpoint and
        # credentials the environment had when it was first made (in a long-lived process, or another store
        # opened earlier with the same options), which may point at a server that is gone.
        return fsspec.core.url_to_fs(url, **{"skip_instance_cache": True, **storage_options})
    except ImportError as exc:
        raise CheckpointError(
            f"ckpt.dir {url} needs a storage backend that is not installed ({_one_line(exc)}); "
            "install it, e.g. `pip install 'yolo-resume[s3]'` for s3://"
        ) from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(
            f"ckpt.dir {url} cannot be opened: {_one_line(exc)}; check ckpt.dir and ckpt.storage_options"
        ) from None


def _json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("ascii")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:400]


def _chain(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _bucket_missing(exc: BaseException) -> bool:
    for e in _chain(exc):
        code = ((getattr(e, "response", None) or {}).get("Error") or {}).get("Code")
        if code == "NoSuchBucket" or "bucket does not exist" in str(e).lower():
            return True
    return False


def _credentials_missing(exc: BaseException) -> bool:
    return any(type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError") for e in _chain(exc))


_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)


def _transient(exc: BaseException) -> bool:
    """Worth another try: network trouble, timeouts, throttling, 5xx. Not: missing things, access
    denied, bad parameters, missing credentials."""
    if isinstance(exc, _PERMANENT) or _bucket_missing(exc) or _credentials_missing(exc):
        return False
    if isinstance(exc, (OSError, TimeoutError, ConnectionError)):  # s3fs turns 5xx/throttling into OSError
        return True
    module = type(exc).__module__.split(".")[0]
    if module in ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "google", "azure"):
        name = type(exc).__name__
        return not any(word in name for word in ("ParamValidation", "NoRegion", "Credential", "Unknown"))
    return False


DOWNLOADS = "downloads"  # in the staging folder: verified copies of remote checkpoints


class StagingError(CheckpointError):
    """The local staging folder failed (e.g. a full disk), not the checkpoint."""

    unavailable = True


def _remove_dead_downloads(downloads: Path) -> None:
    """Downloads (`.part-` / `.claim-<name>-<pid>-<thread>`) of processes that died before removing them."""
    for entry in [*downloads.glob(".part-*"), *downloads.glob(".claim-*")] if downloads.is_dir() else []:
        pid = entry.name.split("-")[-2]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _object_key(info: dict) -> tuple:
    """What identifies one version of an object in a listing (a changed object changes it)."""
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


class ObjectLease:
    """The single-writer lease of a prefix: the object `<prefix>/.lease` (see lease.py).

    Taken by a create-if-absent put (`If-None-Match: *`), renewed every TTL/3 by a put conditional
    on its own ETag (`If-Match`), given back by deleting it. A lease object not renewed within its
    TTL (by the holder's clock, which it records) is stale: it is replaced by a put conditional on
    that stale ETag, so two processes breaking it cannot both win. Filesystems without conditional
    puts (anything but S3 here) get the best fsspec offers: an exclusive create (`mode="create"`),
    a stale lease removed before that create, and a read-back of our token after each write."""

    def __init__(self, store: ObjectStore, holder: Holder):
        self.store, self.holder = store, holder
        self.path, self.where = store.path(LEASE_NAME), store.url_of(LEASE_NAME)
        self.etag: str | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.conditional = any(p in ("s3", "s3a") for p in _protocols(store.fs))

    # -- acquiring -------------------------------------------------------------------------------
    def try_acquire(self) -> Holder | None:
        if self._renewer is not None:
            return None
        self.holder.renewed = time.time()
        if not self._create():
            current, etag = self._read()
            if current is None and etag is None:
                return UNKNOWN  # deleted between our create and our read: try again
            if current is not None and not current.expired():
                return current
            if not self._replace_stale(etag):
                return current or UNKNOWN
        self._renewer = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._renewer.start()
        return None

    def _create(self) -> bool:
        try:
            out = self.store.fs.pipe_file(self.path, self.holder.to_bytes(), mode="create")
        except Exception as exc:
            if _precondition_failed(exc):
                return False
            raise self.store._error("taking the lease", self.where, exc, 1) from exc
        return self._confirm(out)

    def _replace_stale(self, etag: str | None) -> bool:
        """Break a stale lease: overwrite exactly the stale version (S3), else remove it and create."""
        if self.conditional and etag:
            try:
                out = self.store.fs.pipe_file(self.path, self.holder.to_bytes(), IfMatch=etag)
            except Exception as exc:
                if _precondition_failed(exc) or isinstance(exc, FileNotFoundError):
                    return False
                raise self.store._error("breaking a stale lease", self.where, exc, 1) from exc
            return self._confirm(out)
        self.store.call("breaking a stale lease", self.where, self.store.fs.rm_file, self.path, missing_ok=True)
        return self._create()

    def _confirm(self, out: Any) -> bool:
        """Ours after the write? Keep the ETag (from the put's answer, else a fresh read) for renewals."""
        etag = out.get("ETag") if isinstance(out, dict) else None
        if etag is None:
            current, etag = self._read()
            if current is None or current.token != self.holder.token:
                return False
        self.etag = etag
        return True

    def _read(self) -> tuple[Holder | None, str | None]:
        fs = self.store.fs
        fs.invalidate_cache()
        info = self.store.call("reading the lease", self.where, fs.info, self.path, missing_ok=True)
        if info is None:
            return None, None
        data = self.store.call("reading the lease", self.where, fs.cat_file, self.path, missing_ok=True)
        etag = info.get("ETag") or info.get("etag") or str(info.get("created") or info.get("mtime") or "")
        return (Holder.from_bytes(data) if data is not None else None), etag

    # -- holding ---------------------------------------------------------------------------------
    def _renew_loop(self) -> None:
        while not self._stop.wait(self.holder.ttl_s / 3):
            try:
                self.renew()
            except CheckpointError:
                continue  # a network error: try again at the next tick, the TTL leaves room for two
            if leases.lost(self.store.url):
                return

    def renew(self) -> None:
        self.holder.renewed = time.time()
        data = self.holder.to_bytes()
        if self.conditional and self.etag:
            try:
                out = self.store.fs.pipe_file(self.path, data, IfMatch=self.etag)
                self.etag = out.get("ETag", self.etag) if isinstance(out, dict) else self.etag
                return
            except Exception as exc:
                if not (_precondition_failed(exc) or isinstance(exc, FileNotFoundError)):
                    raise self.store._error("renewing the lease", self.where, exc, 1) from exc
            current, _ = self._read()
            taker = current.describe() if current else "another process"
            leases.mark_lost(self.store.url, f"the lease {self.where} was taken over by {taker}")
            return
        current, _ = self._read()
        if current is None or current.token != self.holder.token:
            taker = current.describe() if current else "another process (the lease object was removed)"
            leases.mark_lost(self.store.url, f"the lease {self.where} was taken over by {taker}")
            return
        self.store.call("renewing the lease", self.where, self.store.fs.pipe_file, self.path, data)

    def release(self) -> None:
        if self._renewer is None:
            return
        self._stop.set()
        self._renewer.join()
        self._renewer = None
        if leases.lost(self.store.url):
            return  # another process holds it now: its object is not ours to delete
        try:
            current, _ = self._read()
            if current is not None and current.token == self.holder.token:
                self.store.call("releasing the lease", self.where, self.store.fs.rm_file, self.path, missing_ok=True)
        except CheckpointError:
            pass  # it expires by itself


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = getattr(fs, "protocol", ())
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _precondition_failed(exc: BaseException) -> bool:
    """A conditional put lost (HTTP 412) or an exclusive create found the object (s3fs and fsspec say
    FileExistsError for If-None-Match; a lost If-Match is a plain OSError from s3fs)."""
    for e in _chain(exc):
        if isinstance(e, FileExistsError):
            return True
        code = ((getattr(e, "response", None) or {}).get("Error") or {}).get("Code")
        if code == "PreconditionFailed" or "pre-condition" in str(e).lower() or "precondition" in str(e).lower():
            return True
    return False
