"""The run folder's logs: steps.csv, results.csv, results.png, TensorBoard and segments.jsonl.

The Trainer says what happened (`on_resume`, `on_step`, `on_epoch`, `close`), the session when this
process's segment starts and ends (`on_start`, `on_end`); a RunLog turns that into files. Only rank 0
writes: on the other ranks every method does nothing (or only reads).
"""

from __future__ import annotations

import csv
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .lineage import SegmentLog
from .model import LOSS_NAMES
from .plots import plot_results
from .run_dir import RunDir

if TYPE_CHECKING:
    from .trainer import TrainState

STEP_FIELDS = ("global_step", "epoch", "step_in_epoch", "lr", *LOSS_NAMES)
PLOT_EVERY_S = 60.0


class RunLog:
    def __init__(self, run_dir: RunDir | Path, is_main: bool, notice: Callable[[str], None]):
        self.run_dir, self.is_main, self.notice = RunDir(run_dir), is_main, notice
        self.tb = None  # the TensorBoard writer, with --tensorboard
        self._segment: SegmentLog | None = None
        self._plotter: threading.Thread | None = None
        # The first picture comes after a minute of training (and at the end), not after the first
        # epoch: on short epochs a draw (~0.3 s of CPU) would cost more than the epoch's own logging.
        self._last_plot = time.monotonic()

    # -- the segment ------------------------------------------------------------------------------
    def on_start(self, segment: int, resumed_from: str | None) -> None:
        """This process starts training segment `segment` (from checkpoint `resumed_from`, or fresh)."""
        if not self.is_main:
            return
        if resumed_from is None:
            truncate_step_log(self.run_dir.steps_file, 0)  # a fresh start owns the run folder's logs
        self._segment = SegmentLog(self.run_dir.path, segment, resumed_from)

    def on_end(self, status: str) -> None:
        """How this process's segment ended (a segment without an end line was killed, see lineage.py)."""
        if self._segment is not None:
            self._segment.end(status)

    def on_resume(self, global_step: int) -> int | None:
        """Training continues after `global_step`: the step log forgets the steps after it (they are
        trained again). Returns the step the log had reached, for the lineage."""
        reached = last_logged_step(self.run_dir.steps_file)
        if self.is_main:
            truncate_step_log(self.run_dir.steps_file, global_step)
        return reached

    # -- training ---------------------------------------------------------------------------------
    def enable_tensorboard(self, global_step: int) -> None:
        if not self.is_main:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "--tensorboard needs the tensorboard package: pip install 'yolo-resume[tensorboard]'"
            ) from None
        # purge_step drops events a killed segment logged after the checkpoint we resumed from.
        self.tb = SummaryWriter(str(self.run_dir.tensorboard_dir), purge_step=global_step + 1)

    def on_step(self, state: TrainState, losses: list[float], lr: float) -> None:
        """A batch was trained on (`state` is the TrainState after it)."""
        if self.is_main:
            append_step_log(self.run_dir.steps_file, state, losses, lr)
        scalars = {f"train/{name}": value for name, value in zip(LOSS_NAMES, losses, strict=True)}
        self._scalars(scalars | {"lr": lr}, state.global_step)

    def on_epoch(self, history: list[dict], metrics: dict[str, float], global_step: int) -> None:
        """An epoch ended: `history` holds its row (last), `metrics` its validation (empty when skipped)."""
        self._scalars({f"val/{k}": v for k, v in metrics.items()}, global_step)
        if self.is_main:
            write_results_csv(self.run_dir.results_file, history)
            self.redraw_plot()

    def close(self, history: list[dict]) -> None:
        """Training stopped: draw the final, complete picture and flush TensorBoard."""
        if history and self.is_main:
            self.redraw_plot(wait=True)
        if self.tb is not None:
            self.tb.close()

    def _scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    # -- results.png ------------------------------------------------------------------------------
    def redraw_plot(self, wait: bool = False) -> None:
        """Redraw results.png in a background thread, at most once a minute (matplotlib takes ~0.3 s of
        CPU, a whole step on a small CPU run). `wait` draws the final, complete one."""
        if not wait and time.monotonic() - self._last_plot < PLOT_EVERY_S:
            return
        if self._plotter is not None and self._plotter.is_alive():
            if not wait:
                return
            self._plotter.join()
        self._last_plot = time.monotonic()
        self._plotter = threading.Thread(target=self._draw_plot, name="results.png", daemon=True)
        self._plotter.start()
        if wait:
            self._plotter.join()

    def _draw_plot(self) -> None:
        try:
            plot_results(self.run_dir.results_file, self.run_dir.plot_file)
        except Exception as exc:  # a plot must never stop training
            self.notice(f"could not draw results.png: {type(exc).__name__}: {exc}")


# -- the files ------------------------------------------------------------------------------------
def append_step_log(path: Path, state: TrainState, losses: list[float], lr: float) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(STEP_FIELDS)
        writer.writerow([state.global_step, state.epoch, state.step_in_epoch, repr(lr), *map(repr, losses)])


def truncate_step_log(path: Path, global_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (those steps are trained again), and any
    torn last line from a kill mid-write. Atomic, so a kill here cannot lose the log."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)

    def keep(line: str) -> bool:
        fields = line.rstrip("\n").split(",")
        complete = line.endswith("\n") and len(fields) == len(STEP_FIELDS) and fields[0].isdigit()
        return complete and int(fields[0]) <= global_step

    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text("".join([f"{','.join(STEP_FIELDS)}\n"] + [ln for ln in lines[1:] if keep(ln)]))
    tmp.replace(path)


def last_logged_step(path: Path) -> int | None:
    """The highest global step in the step log (what the interrupted segment had reached)."""
    if not path.exists():
        return None
    steps = [int(ln.split(",", 1)[0]) for ln in path.read_text().splitlines()[1:] if ln.split(",", 1)[0].isdigit()]
    return max(steps, default=None)


def write_results_csv(path: Path, history: list[dict]) -> None:
    """Rewritten from the checkpointed history each epoch, so a resumed run never duplicates rows."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
            )
    tmp.replace(path)
