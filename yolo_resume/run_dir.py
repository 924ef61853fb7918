"""The run folder: every file name in one place, and the checkpoint store its config names.

<run>/config.yaml        the run's resolved config (what `--resume` trains with)
<run>/checkpoints/       its checkpoints, unless `ckpt.dir` puts them elsewhere (a folder or a URL)
<run>/.staging/          local scratch of remote checkpoints (written and downloaded here)
<run>/steps.csv          one row per trained batch (losses, lr)
<run>/results.csv        one row per finished epoch, rewritten from the checkpointed history
<run>/results.png        drawn from results.csv, resume points marked
<run>/best.safetensors, last.safetensors   the EMA weights a user ships (light.py)
<run>/weights/epoch-N.safetensors          milestone EMA weights, every ckpt.light_every_epochs epochs
<run>/labels.png, train_batch0-2.jpg,      the pictures (pictures.py): labels, first augmented batches,
  PR_curve.png, F1_curve.png, confusion_matrix_normalized.png, val_batch0_labels.jpg, val_batch0_pred.jpg
<run>/val/               `yolo-resume val` reports (JSON) and their pictures; <run>/predict/: `predict`
<run>/segments.jsonl     one line per process that trained the run, and how it ended
<run>/last_exit.json     rank 0's exit code under torchrun, for the supervisor
<run>/store.json         where the checkpoints live (a copy of config.yaml's ckpt.dir, for a torn config.yaml)
<run>/.lock              the run folder's single-writer lock (flock; see lease.py)
<run>/tensorboard/       with --tensorboard

Files that resume depends on (config.yaml, store.json) are written by temp file + fsync + rename.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, UserError
from .files import RunFileError, atomic_write, check_regular, read_text

if TYPE_CHECKING:
    from .checkpoint.manager import CheckpointManager
    from .checkpoint.store import Store
    from .config import CkptConfig, Config
    from .lease import Holder, RunLease

RUNS_ROOT = Path("runs")


@dataclass(frozen=True)
class RunDir:
    """One run folder's layout. Nothing here touches the disk; `path` may not exist yet."""

    path: Path

    CONFIG = "config.yaml"
    CHECKPOINTS = "checkpoints"
    STAGING = ".staging"
    STEPS = "steps.csv"
    RESULTS = "results.csv"
    PLOT = "results.png"
    SEGMENTS = "segments.jsonl"
    LAST_EXIT = "last_exit.json"
    TENSORBOARD = "tensorboard"
    STORE = "store.json"
    LOCK = ".lock"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def default_checkpoints(self) -> Path:
        """Where checkpoints go when the config names no `ckpt.dir`."""
        return self.path / self.CHECKPOINTS

    @property
    def staging(self) -> Path:
        return self.path / self.STAGING

    @property
    def steps_file(self) -> Path:
        return self.path / self.STEPS

    @property
    def results_file(self) -> Path:
        return self.path / self.RESULTS

    @property
    def plot_file(self) -> Path:
        return self.path / self.PLOT

    @property
    def segments_file(self) -> Path:
        return self.path / self.SEGMENTS

    @property
    def last_exit_file(self) -> Path:
        return self.path / self.LAST_EXIT

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def store_file(self) -> Path:
        return self.path / self.STORE

    @property
    def lock_file(self) -> Path:
        return self.path / self.LOCK

    def check_files(self) -> None:
        """Every run file that exists is a regular file (RunFileError naming it otherwise): they are
        read and appended to, and opening a FIFO would block forever."""
        for path in (
            self.config_file,
            self.store_file,
            self.steps_file,
            self.results_file,
            self.segments_file,
            self.last_exit_file,
        ):
            check_regular(path)

    def write_config(self, cfg: Config) -> None:
        """The run's resolved config, and (separately) where its checkpoints live: both atomic, so a
        kill mid-write leaves the old file, and a torn config.yaml still leaves the store findable."""
        atomic_write(self.store_file, json.dumps({"dir": cfg.ckpt.dir, "storage_options": cfg.ckpt.storage_options}))
        atomic_write(self.config_file, cfg.to_yaml())

    # -- its checkpoints -----------------------------------------------------------------------
    def saved_ckpt_config(self) -> CkptConfig | None:
        """The `ckpt` section of the run's saved config.yaml, read as every config is (validated);
        None when there is no readable one."""
        from .config import load_config

        try:
            if read_text(self.config_file) is None:
                return None
        except RunFileError:
            return None
        try:
            return load_config(self.config_file).ckpt
        except ConfigError:
            return None

    def saved_location(self) -> tuple[str, dict[str, Any]] | None:
        """(ckpt.dir, ckpt.storage_options) this run folder names: store.json's (atomic, written with
        config.yaml), else the ckpt section of config.yaml (runs of older versions; a config.yaml torn
        by a kill has none); None when neither says."""
        try:
            doc = json.loads(read_text(self.store_file) or "null")
        except (ValueError, RunFileError):
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("dir"), str) and isinstance(doc.get("storage_options"), dict):
            return doc["dir"], doc["storage_options"]
        try:
            text = read_text(self.config_file) or ""
        except RunFileError:
            return None
        if not any(line.startswith("ckpt:") for line in text.splitlines()):
            return None  # missing, empty or torn before its ckpt section: it names nothing
        ckpt = self.saved_ckpt_config()
        return (ckpt.dir, dict(ckpt.storage_options)) if ckpt is not None else None

    def names_a_store(self) -> bool:
        return self.saved_location() is not None

    def store(self, ckpt: CkptConfig | None = None) -> Store:
        """Where the run's checkpoints live: `ckpt.dir` (a folder, or a URL read with
        `ckpt.storage_options`, staged in `<run>/.staging`) of `ckpt`, else of the run folder's own
        record (`saved_location`), else `<run>/checkpoints`."""
        from .checkpoint.store import open_store

        if ckpt is not None:
            location = (ckpt.dir, ckpt.storage_options)
        else:
            location = self.saved_location() or ("", {})
        if not location[0]:
            return open_store(self.default_checkpoints)
        return open_store(location[0], location[1], staging_dir=self.staging)

    def lease(self, holder: Holder, store: Store | None = None) -> RunLease:
        """The single-writer lease of this run: its folder's lock and its checkpoint store's lease."""
        from .lease import FileLease, RunLease

        store = store if store is not None else self.store()
        return RunLease(str(self.path), [FileLease(self.lock_file, holder), store.lease(holder)])

    def checkpoints(self, ckpt: CkptConfig) -> CheckpointManager:
        """The manager of the run's checkpoints with the config's retention and async settings. A
        remote store is listed once here, so a missing bucket or a wrong endpoint stops the run
        before training starts, with the fix."""
        from .checkpoint.manager import CheckpointManager

        store = self.store(ckpt)
        store.check()
        return CheckpointManager(
            store,
            keep_last=ckpt.keep_last,
            keep_best=ckpt.keep_best,
            keep_every=ckpt.keep_every,
            async_save=ckpt.async_,
        )

    def has_checkpoints(self) -> bool:
        return bool(self.store().entries())


def new_run_dir(stem: str, root: Path = RUNS_ROOT) -> tuple[Path, Path | None]:
    """`runs/<stem>`, or `runs/<stem>2`, 3, ... when it already holds a run. Also returns the
    unfinished run that was skipped over, if any, so the caller can point at `--resume`."""
    from .checkpoint.manager import CheckpointManager

    unfinished = None
    for n in range(1, 10_000):
        candidate = RunDir(root / (stem if n == 1 else f"{stem}{n}"))
        if not candidate.path.exists() or not (candidate.has_checkpoints() or candidate.results_file.exists()):
            return candidate.path, unfinished
        newest = CheckpointManager(candidate.store()).list()
        if newest and not newest[-1].get("finished", False):
            unfinished = candidate.path
    raise UserError(f"too many runs under {root}/{stem}*; pass --run-dir")


def most_recent_run(root: Path = RUNS_ROOT) -> Path:
    """The run under `root` whose newest checkpoint was committed last."""
    best: tuple[float, Path] | None = None
    for run in sorted(root.iterdir()) if root.is_dir() else []:
        for entry in RunDir(run).store().entries().values() if run.is_dir() else []:
            if best is None or entry.mtime > best[0]:
                best = (entry.mtime, run)
    if best is None:
        raise UserError(
            f"no run with checkpoints under `{root}/`; start one with `yolo-resume train` or pass --run-dir"
        )
    return best[1]
