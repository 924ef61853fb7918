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

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .format import DATA_FILES, MANIFEST_FILE, _crash_point

COMMIT_SUFFIX = ".committed"
PIN_SUFFIX = ".pin"
MARKER_FORMAT = "yolo-resume-remote-commit"
MARKER_VERSION = 1
MARKER_MAX_BYTES = 64 << 10
CHECKPOINT_FILES = (*DATA_FILES, MANIFEST_FILE)  # upload order: the manifest last
READBACK_MAX_BYTES = 1 << 20  # uploaded files up to this size are read back and hashed; larger: size only

# Test-only crash injection (same switch as format.py's: YOLO_RESUME_TEST_KILL_AT=stage[:N]).
REMOTE_KILL_STAGES = ("upload_started", "before_marker", "after_marker")

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_USERINFO_RE = re.compile(r"(://)[^/@\s]+@")
_CREDENTIAL_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ACCESS_KEY_ID")


def is_remote(location: str | Path | None) -> bool:
    """True for an fsspec URL other than a local file (`s3://b/p`, `gs://b/p`, `memory://p`).

    A `pathlib.Path` is always local: turning an URL into a Path collapses `s3://` into `s3:/`."""
    if location is None or isinstance(location, Path):
        return False
    match = _SCHEME_RE.match(str(location))
    return bool(match) and match.group(1).lower() not in ("file", "local")


def local_path(location: str | Path) -> Path:
    """A local location as a Path (`file:///a/b` -> `/a/b`)."""
    text = str(location)
    for prefix in ("file://", "local://"):
        if text.startswith(prefix):
            return Path(text[len(prefix) :])
    return Path(location)


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


def _fingerprint(info: dict) -> tuple:
    """What identifies one version of an object in a listing (a changed object changes it)."""
    return (info.get("size"), info.get("ETag") or info.get("etag") or info.get("md5Hash"), modified_time(info))


class RemoteStore:
    """A checkpoint prefix in object storage, reached through fsspec."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None, retry: Retry | None = None):
        self.url = str(url).rstrip("/")
        self.retry = retry or Retry()
        try:
            import fsspec.core
        except ImportError:  # pragma: no cover - fsspec is a dependency
            raise CheckpointError(f"ckpt.dir {self.url} needs fsspec; pip install fsspec") from None
        try:
            self.fs, root = fsspec.core.url_to_fs(self.url, **dict(storage_options or {}))
        except ImportError as exc:
            raise CheckpointError(
                f"ckpt.dir {self.url} needs a storage backend that is not installed ({_one_line(exc)}); "
                "install it, e.g. `pip install 'yolo-resume[s3]'` for s3://"
            ) from None
        except (ValueError, TypeError) as exc:
            raise CheckpointError(
                f"ckpt.dir {self.url} cannot be opened: {_one_line(exc)}; check ckpt.dir and ckpt.storage_options"
            ) from None
        self.root = root.rstrip("/")
        self.bucket = self.root.split("/", 1)[0]

    # -- addresses -------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def url_of(self, *parts: str) -> str:
        return "/".join((self.url, *parts))

    def name_of(self, url: str) -> str | None:
        """The checkpoint name of `url` when it lies directly under this prefix."""
        url = str(url).rstrip("/")
        parent, _, name = url.rpartition("/")
        return name if parent == self.url else None

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
    def commit(self, name: str, local: Path, listing: Listing | None = None) -> None:
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
        The tensor file is checked by size here and by SHA-256 on every download."""
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
        aside = f"{name}.superseded-{int(time.time())}"
        for rel in listing.files.get(name, {}):
            url = self.url_of(aside, rel)
            self.call("copying", url, self.fs.copy, self.path(name, rel), self.path(aside, rel))
        self.call("uncommitting", self.url_of(name + COMMIT_SUFFIX), self.fs.rm_file, self.path(name + COMMIT_SUFFIX))

    def delete(self, name: str, listing: Listing | None = None) -> None:
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

    def remove_uncommitted(self, listing: Listing, older_than: float | None) -> list[str]:
        """Remove checkpoint folders that have no marker (killed uploads and deletions) whose objects
        are all older than `older_than` (server time), so a concurrent writer elsewhere is spared."""
        removed = []
        for folder, files in listing.files.items():
            if folder in listing.markers or not folder.startswith("ckpt-") or ".superseded-" in folder:
                continue
            times = [modified_time(info) for info in files.values()]
            if older_than is None or any(t is None or t >= older_than for t in times):
                continue
            self.call("removing", self.url_of(folder), self.fs.rm, [self.path(folder, rel) for rel in files])
            removed.append(folder)
        return removed

    def pin(self, name: str, pinned: bool) -> None:
        path, url = self.path(name + PIN_SUFFIX), self.url_of(name + PIN_SUFFIX)
        if pinned:
            self.call("pinning", url, self.fs.pipe_file, path, b"")
        else:
            self.call("unpinning", url, self.fs.rm_file, path, missing_ok=True)


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
