"""The run folder: every file name in one place.

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
