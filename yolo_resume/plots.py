"""results.png: losses, mAP@.5, mAP@.5:.95 and LR per epoch, with every resume point marked."""

from __future__ import annotations

import csv
from pathlib import Path

from .model import LOSS_NAMES


def read_results(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def resume_points(rows: list[dict]) -> list[float]:
    """Epoch positions where a new segment (a resumed process) took over."""
    points = []
    for prev, row in zip(rows, rows[1:], strict=False):
        if row.get("segment") != prev.get("segment"):
            points.append(float(prev["epoch"]) + 0.5)
    return points


def plot_results(results_csv: Path, out: Path | None = None) -> Path:
    # The object API with an Agg canvas, not pyplot: no global state, so it is safe in a thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    rows = read_results(results_csv)
    out = out or results_csv.with_name("results.png")
    epochs = [float(r["epoch"]) for r in rows]

    def series(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]

    panels = [(name, [name]) for name in LOSS_NAMES] + [("mAP@.5", ["map50"]), ("mAP@.5:.95", ["map"]), ("lr", ["lr"])]
    fig = Figure(figsize=(12, 6.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    for ax, (title, keys) in zip(axes.flat, panels, strict=True):
        for key in keys:
            if rows and key in rows[0]:
                ax.plot(epochs, series(key), marker="o", markersize=3)
        for x in resume_points(rows):
            ax.axvline(x, color="tab:red", linestyle="--", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if resume_points(rows):
        fig.legend([Line2D([], [], color="tab:red", linestyle="--")], ["resumed"], loc="upper right", frameon=False)
    fig.suptitle(f"{results_csv.parent.name}: {len(rows)} epochs")
    fig.tight_layout()
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(out)
    return out
