"""The run folder: every file name in one place, and the checkpoint store its config names.

<run>/config.yaml        the run's resolved config (what `--resume` trains with)
<run>/checkpoints/       its checkpoints, unless `ckpt.dir` puts them elsewhere (a folder or a URL)
<run>/.staging/          local scratch of remote checkpoints (written and downloaded here)
<run>/steps.csv          one row per trained batch (losses, lr)
<run>/results.csv        one row per finished epoch, rewritten from the checkpointed history
<run>/results.png        drawn from results.csv, resume points marked
<run>/segments.jsonl     one line per process that trained the run, and how it ended
<run>/last_exit.json     rank 0's exit code under torchrun, for the supervisor
<run>/tensorboard/       with --tensorboard
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError, UserError

if TYPE_CHECKING:
    from .checkpoint.manager import CheckpointManager
    from .checkpoint.store import Store
    from .config import CkptConfig

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

    # -- its checkpoints -----------------------------------------------------------------------
    def saved_ckpt_config(self) -> CkptConfig | None:
        """The `ckpt` section of the run's saved config.yaml, read as every config is (validated);
        None when there is no readable one (the checkpoints are then in the default place)."""
        from .config import load_config

        if not self.config_file.is_file():
            return None
        try:
            return load_config(self.config_file).ckpt
        except ConfigError:
            return None

    def store(self, ckpt: CkptConfig | None = None) -> Store:
        """Where the run's checkpoints live: `ckpt.dir` (a folder, or a URL read with
        `ckpt.storage_options`, staged in `<run>/.staging`) of `ckpt`, else of the saved config,
        else `<run>/checkpoints`."""
        from .checkpoint.store import open_store

        ckpt = ckpt if ckpt is not None else self.saved_ckpt_config()
        if ckpt is None or not ckpt.dir:
            return open_store(self.default_checkpoints)
        return open_store(ckpt.dir, ckpt.storage_options, staging_dir=self.staging)

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
