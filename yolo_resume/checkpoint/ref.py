"""One way from a user's argument to a checkpoint.

`resolve(arg)` takes what a user types — a URL (`s3://b/run/ckpt-N`), a checkpoint folder, `RUN/ckpt-N`
of a run whose checkpoints live elsewhere (`ckpt.dir`), a run folder, a `checkpoints` folder, a URL
prefix, or nothing (the most recent run) — and returns a `Target`: a store, and the one checkpoint
named, if any. A `CheckpointRef(store, name)` is then the only handle the CLI, the resume plan and
the trainer use: they never ask whether a checkpoint is local or remote.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, UserError
from . import retention
from .format import MANIFEST_FILE, load_checkpoint
from .store import NAME_RE, Entry, Store, is_remote, open_store


@dataclass
class CheckpointInfo:
    """One checkpoint as its store lists it: its metadata, or why it cannot be used. `path` is a local
    `Path`, or the URL (a `str`, never a Path) of a checkpoint in object storage."""

    name: str
    path: Path | str
    meta: dict | None
    error: str | None = None
    pinned: bool = False
    size: int | None = None  # bytes, from the store's listing
    mtime: float | None = None  # commit time, from the store's listing
    store: Store | None = field(default=None, repr=False, compare=False)

    @property
    def ref(self) -> CheckpointRef:
        """The way back to this checkpoint: load it, open it, pin it."""
        assert self.store is not None, "a CheckpointInfo made by a store always has one"
        return CheckpointRef(self.store, self.name)

    @property
    def valid(self) -> bool:
        return self.error is None

    def modified(self) -> float:
        """When it was committed (seconds since the epoch)."""
        return self.mtime or 0.0

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
        return self.size or 0

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
            timeline=self.timeline,
        )

    @property
    def timeline(self) -> str:
        """When the segment that wrote it started (its last lineage entry), "" for a run's first segment:
        what orders a branch after the timeline it abandoned (see retention.newest_first)."""
        lineage = self.get("lineage")
        last = lineage[-1] if isinstance(lineage, list) and lineage else None
        return str(last.get("when") or "") if isinstance(last, dict) else ""


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of one store."""

    store: Store
    name: str

    @property
    def where(self) -> Path | str:
        return self.store.where(self.name)

    def info(self, deep: bool = False) -> CheckpointInfo:
        """Its metadata, or why it cannot be used (`deep`: every byte checked)."""
        try:
            entry = self.store.entry(self.name)
        except CheckpointError as err:
            if getattr(err, "unavailable", False):
                raise
            return CheckpointInfo(self.name, self.where, None, str(err), store=self.store)
        return describe(self.store, entry, deep)

    def load(self, map_location: Any = "cpu") -> tuple[dict, dict]:
        """Verify it completely and return (state, meta)."""
        with self.store.open(self.name) as local:
            return load_checkpoint(local, map_location=map_location)

    @contextmanager
    def local(self) -> Iterator[Path]:
        """A local folder of its files (a verified download for an object store), for the context."""
        with self.store.open(self.name) as local:
            yield local

    def pin(self, pinned: bool) -> None:
        self.store.pin(self.name, pinned)

    def to_json(self) -> dict:
        """What another process (a DDP rank) needs to reach it (storage options hold no secrets)."""
        return {"store": self.store.address(), "name": self.name}

    @classmethod
    def from_json(cls, doc: dict) -> CheckpointRef:
        return cls(open_store(**doc["store"]), doc["name"])


def describe(store: Store, entry: Entry, deep: bool) -> CheckpointInfo:
    """A listed checkpoint's metadata, or why it cannot be used (recorded, not raised). A failing store
    raises instead: that must never make a good checkpoint look corrupt (resume would fall back past
    it, prune would delete it)."""
    info = CheckpointInfo(
        entry.name, store.where(entry.name), None, pinned=entry.pinned, size=entry.size, mtime=entry.mtime, store=store
    )
    try:
        info.meta = store.read_meta(entry.name)
        if deep:
            store.verify(entry.name)
    except CheckpointError as err:
        if getattr(err, "unavailable", False):
            raise
        info.meta, info.error = None, str(err)
    except (RecursionError, MemoryError, ValueError, TypeError, KeyError, UnicodeError) as err:
        # A crafted checkpoint must cost its own use, never the whole command: skipped, with the reason.
        # (Not OSError: a disk or permission error is the store failing, and must not make prune delete it.)
        info.meta = None
        info.error = (
            f"checkpoint {info.path}: cannot be read ({type(err).__name__}: {' '.join(str(err).split())[:200]})"
        )
    return info


@dataclass(frozen=True)
class Target:
    """What a user's argument names: a store, and one checkpoint of it or (name None) all of them."""

    store: Store
    name: str | None = None

    def one(self) -> CheckpointRef:
        if self.name is None:
            raise UserError(
                f"`{self.store.location}` holds a run's checkpoints, not one checkpoint; "
                "name one (RUN/ckpt-N, a checkpoint folder or its URL; see `yolo-resume ckpt list`)"
            )
        return CheckpointRef(self.store, self.name)

    def infos(self, deep: bool = False) -> list[CheckpointInfo]:
        """The named checkpoint, or every checkpoint of the store, oldest first."""
        if self.name is not None:
            return [self.one().info(deep)]
        return [describe(self.store, entry, deep) for entry in self.store.entries().values()]


def resolve(arg: str | Path | None) -> Target:
    """The store (and checkpoint) a user's argument names; see the module docstring."""
    from ..run_dir import RunDir, most_recent_run

    if arg is None:
        return Target(RunDir(most_recent_run()).store())
    if is_remote(arg):  # a bare URL is read with fsspec's defaults and the standard environment
        parent, _, name = str(arg).rstrip("/").rpartition("/")
        return Target(open_store(parent), name) if NAME_RE.match(name) else Target(open_store(str(arg)))
    path = Path(arg)
    if path.is_file() or (path / MANIFEST_FILE).exists() or (path.is_dir() and NAME_RE.match(path.name)):
        return Target(open_store(path.parent), path.name)  # a checkpoint folder (or a file that is none)
    if NAME_RE.match(path.name) and RunDir(path.parent).names_a_store():
        return Target(RunDir(path.parent).store(), path.name)  # RUN/ckpt-N of a run with its own ckpt.dir
    if path.is_dir() and path.name == RunDir.CHECKPOINTS:
        return Target(open_store(path))
    if path.is_dir():
        return Target(RunDir(path).store())
    raise UserError(f"`{path}` does not exist; give a run folder or a checkpoint folder")


def best_of(infos: list[CheckpointInfo]) -> set[str]:
    """The names `ckpt list` stars: the same rule retention keeps by."""
    return retention.keep_best([info.candidate() for info in infos], 1)
