"""The run folder's logs: steps.csv, results.csv, results.png, TensorBoard and segments.jsonl.

The Trainer says what happened (`on_resume`, `on_step`, `on_epoch`, `close`), the session when this
process's segment starts and ends (`on_start`, `on_end`); a RunLog turns that into files. Only rank 0
writes: on the other ranks every method does nothing (or only reads).
"""

from __future__ import annotations

import csv
import io
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UserError
from .files import atomic_write, check_regular, read_text
from .lineage import SegmentLog, record_log_repair
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
            repair_step_log(self.run_dir.steps_file, 0)  # a fresh start owns the run folder's logs
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
            repair = repair_step_log(self.run_dir.steps_file, global_step)
            if repair.message:
                self.notice(repair.message)
            record_log_repair(self.run_dir.path, repair.lineage())
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
STEP_LOG_FIX = "move it away (the log is rebuilt from the next step on) and resume again"


def append_step_log(path: Path, state: TrainState, losses: list[float], lr: float) -> None:
    new = not check_regular(path, STEP_LOG_FIX)  # never open a FIFO: the append would block forever
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(STEP_FIELDS)
        writer.writerow([state.global_step, state.epoch, state.step_in_epoch, repr(lr), *map(repr, losses)])


@dataclass
class StepLogRepair:
    """What resuming did to steps.csv: rows dropped as torn or garbage, duplicate steps, steps missing."""

    dropped: int = 0
    duplicates: int = 0
    missing: list[tuple[int, int]] = field(default_factory=list)  # inclusive ranges of global steps

    @property
    def message(self) -> str:
        parts = []
        if self.dropped:
            parts.append(f"dropped {self.dropped} torn or unreadable row(s)")
        if self.duplicates:
            parts.append(f"removed {self.duplicates} duplicate row(s)")
        if self.missing:
            spans = ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in self.missing)
            parts.append(
                f"it has no rows for global step(s) {spans}, trained before the checkpoint but lost from the log "
                "(a crash or power loss before they reached the disk); they are not trained again, so the gap stays "
                "(recorded in the lineage)"
            )
        return f"steps.csv repaired: {'; '.join(parts)}" if parts else ""

    def lineage(self) -> dict:
        """The lineage entry's record of the repair (empty when there was nothing to repair)."""
        if not (self.dropped or self.duplicates or self.missing):
            return {}
        return {"dropped_rows": self.dropped, "duplicate_rows": self.duplicates, "missing_steps": self.missing}


def _parse_step_row(line: str) -> int | None:
    """The global step of a complete, well-formed row; None for the header, a torn row or garbage."""
    fields = line.rstrip("\n").split(",")
    if not line.endswith("\n") or len(fields) != len(STEP_FIELDS) or not fields[0].isdigit():
        return None
    try:
        [float(v) for v in fields[1:]]
    except ValueError:
        return None
    return int(fields[0])


def repair_step_log(path: Path, global_step: int) -> StepLogRepair:
    """Make the step log agree with the checkpoint we resume from: drop rows after `global_step` (those
    steps are trained again), torn and garbage rows, and duplicates (two writers, an old version); report
    the steps the checkpoint covers that the log lost. Atomic, so a kill here cannot lose the log."""
    repair = StepLogRepair()
    text = read_text(path, STEP_LOG_FIX)
    if text is None:
        return repair
    rows: dict[int, str] = {}
    for line in text.splitlines(keepends=True)[1:]:
        step = _parse_step_row(line)
        if step is None:
            repair.dropped += line.rstrip("\n") != ",".join(STEP_FIELDS)
            continue
        if step > global_step:
            continue
        repair.duplicates += step in rows
        rows[step] = line  # the later row of a step wins: it was written by the newer segment
    if rows:
        present = sorted(rows)
        missing = sorted(set(range(present[0], global_step + 1)) - set(present))
        repair.missing = _ranges(missing)
    atomic_write(path, f"{','.join(STEP_FIELDS)}\n" + "".join(rows[step] for step in sorted(rows)))
    return repair


def _ranges(steps: list[int]) -> list[tuple[int, int]]:
    spans: list[tuple[int, int]] = []
    for step in steps:
        if spans and spans[-1][1] == step - 1:
            spans[-1] = (spans[-1][0], step)
        else:
            spans.append((step, step))
    return spans


def last_logged_step(path: Path) -> int | None:
    """The highest global step in the step log (what the interrupted segment had reached: a row torn by
    the kill counts, its step was trained)."""
    text = read_text(path, STEP_LOG_FIX)
    if text is None:
        return None
    firsts = (line.split(",", 1)[0] for line in text.splitlines()[1:])
    return max((int(first) for first in firsts if first.isdigit() and len(first) < 19), default=None)


def write_results_csv(path: Path, history: list[dict]) -> None:
    """Rewritten from the checkpointed history each epoch, so a resumed run never duplicates rows."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    for row in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()})
    atomic_write(path, buffer.getvalue())
