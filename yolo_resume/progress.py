"""Rich progress display: a bar per epoch with loss components, images/s and ETA; a line per epoch;
a final table. Kept apart from the loop so the loop reads as training, not printing."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from .model import LOSS_NAMES

console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)


class TrainProgress:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(bar_width=28),
            MofNCompleteColumn(),
            TextColumn("{task.fields[losses]}"),
            TextColumn("{task.fields[speed]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=quiet,
        )
        self.task = None
        self._t0 = time.monotonic()
        self._images = 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def start_epoch(self, epoch: int, epochs: int, total: int, done: int) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(
            "train", total=total, completed=done, epoch=f"{epoch + 1}/{epochs}", losses="", speed=""
        )
        self._t0, self._images = time.monotonic(), 0

    def step(self, state, images: int) -> None:
        self._images += images
        n = max(state.step_in_epoch, 1)
        losses = " ".join(f"{name[:3]} {v / n:.3f}" for name, v in zip(LOSS_NAMES, state.epoch_loss_sum, strict=True))
        speed = f"{self._images / max(time.monotonic() - self._t0, 1e-9):.1f} img/s"
        self.progress.update(self.task, advance=1, losses=losses, speed=speed)

    def end_epoch(self, row: dict, batches: int) -> None:
        if self.quiet:
            return
        parts = [f"epoch {row['epoch']}"]
        parts += [f"{name} {row[name]:.4f}" for name in LOSS_NAMES]
        if "map50" in row:
            parts += [f"mAP@.5 {row['map50']:.4f}", f"mAP@.5:.95 {row['map']:.4f}"]
            if "ultralytics_map" in row:
                parts.append(f"(ultralytics-style {row['ultralytics_map']:.4f})")
        elapsed = time.monotonic() - self._t0
        parts.append(f"{elapsed:.1f}s")
        self.progress.console.print("  ".join(parts))

    def saved(self, result) -> None:
        if not self.quiet:
            self.progress.console.print(
                f"[dim]saved checkpoint {result.name} (state copied in {result.snapshot_s * 1000:.0f} ms, "
                f"written in {result.write_s:.2f} s)[/dim]"
            )

    def notice(self, message: str) -> None:
        self.progress.console.print(f"[yellow]{escape(message)}[/yellow]")

    def summary(self, history: list[dict]) -> None:
        if self.quiet or not history:
            return
        table = Table(title="training summary")
        columns = ["epoch", *LOSS_NAMES, "map50", "map", "lr"]
        for col in columns:
            table.add_column(col, justify="right")
        for row in history:
            table.add_row(*(_fmt(row.get(col)) for col in columns))
        console.print(table)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def print_dataset_check(progress: TrainProgress, reports: list) -> None:
    """The up-front check's warnings (always) and its summary table (unless quiet)."""
    from .data.check import summary_table

    for report in reports:
        for line in report.warnings():
            progress.notice(f"data: {line}")
    if not progress.quiet:
        console.print(summary_table(reports))


def finished_run_lines(run_dir, checkpoints: list, epochs: int) -> list[str]:
    """What a user wants last from a finished run: the weights to ship (the best valid checkpoint, the one
    `ckpt export` should be given), the plot, and the commands to use, resume or extend the run."""
    from .checkpoint.ref import best_of

    run_dir = Path(run_dir).resolve()  # absolute: copied into another shell, they still point here
    valid = [info for info in checkpoints if info.valid]
    best = best_of(valid)
    chosen = next((info for info in reversed(valid) if info.name in best), valid[-1] if valid else None)
    lines = []
    for name, what in (("best.safetensors", "EMA weights of the best epoch"), ("last.safetensors", "of the last")):
        if (run_dir / name).is_file():
            lines.append(f"weights:    {run_dir / name} ({what})")
    if chosen is not None:
        fitness = chosen.fitness
        why = f"best, fitness {fitness:.4f}" if fitness is not None and chosen.name in best else "newest"
        where = chosen.path.resolve() if isinstance(chosen.path, Path) else chosen.path  # a str is a URL
        lines.append(f"checkpoint: {where} ({why})")
        lines.append(f"  export:   yolo-resume ckpt export {where} -o best.pt")
        lines.append(f"  score:    yolo-resume val {where}")
    lines.append(f"plot:       {run_dir}/results.png")
    lines.append(f"extend:     yolo-resume train --resume --run-dir {run_dir} --epochs {epochs + max(epochs // 2, 1)}")
    return lines
