"""The pictures people look at, written to the run folder in the background (never stalling a step).

<run>/labels.png                       the train split's labels: class histogram, box sizes and positions
<run>/train_batch0.jpg .. 2.jpg         the first three augmented batches of epoch 0, with their boxes
<run>/PR_curve.png, F1_curve.png,       of the best validation (drawn at most once a minute, and when
<run>/confusion_matrix_normalized.png   training stops): ultralytics' curves and matrix
<run>/val_batch0_labels.jpg, _pred.jpg  the first val batch with its labels / the model's detections

The numbers are ultralytics': `ap_per_class` (the curves), `ConfusionMatrix.process_batch` (the
matrix, at confidence 0.25 and IoU 0.45) and `plot_images` (the batch grids, PIL drawing). The
matplotlib figures are drawn here with the object API on an Agg canvas: ultralytics' own plotting
goes through pyplot, whose figure manager and rcParams are process-wide (its `plt_settings` even
switches the backend), so it is not safe in a thread, and drawing on the main thread would stall
training for the ~1 s a figure takes. A `Figure` with its own canvas shares no state, so every
picture is drawn in one background thread from copies taken when the data was ready.

The train batches come from the pure (seed, epoch, index) items, so a resumed run draws the same
pixels; they are drawn only when missing, and only for epoch 0's first batches.
"""

from __future__ import annotations

import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

LABELS = "labels.png"
TRAIN_BATCHES = 3
PR_CURVE = "PR_curve.png"
F1_CURVE = "F1_curve.png"
CONFUSION = "confusion_matrix_normalized.png"
VAL_LABELS = "val_batch0_labels.jpg"
VAL_PRED = "val_batch0_pred.jpg"
VAL_PICTURES = (PR_CURVE, F1_CURVE, CONFUSION, VAL_LABELS, VAL_PRED)
MAX_IMAGES = 16  # what plot_images draws of a batch (its max_subplots)
CONFUSION_CONF, CONFUSION_IOU = 0.25, 0.45  # ConfusionMatrix.process_batch's defaults
PRED_CONF = 0.25  # plot_images draws detections above this confidence (its conf_thres)
REDRAW_EVERY_S = 60.0  # as results.png: three figures cost ~1 s of CPU, a whole epoch on a tiny run


def train_batch_name(i: int) -> str:
    return f"train_batch{i}.jpg"


# -- saving ---------------------------------------------------------------------------------------
def _atomic(out: Path, write: Callable[[Path], None]) -> Path:
    """`write` to a temporary sibling with the same suffix (the format is chosen by it), then rename: a
    reader or a kill sees the old picture or the new one."""
    out = Path(out)
    tmp = out.with_name(f".{out.stem}.tmp-{secrets.token_hex(4)}{out.suffix}")
    try:
        write(tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, out: Path, dpi: int = 100) -> Path:
    return _atomic(out, lambda tmp: fig.savefig(tmp, dpi=dpi))


def _color(i: int) -> tuple[float, float, float]:
    from ultralytics.utils.plotting import colors

    return tuple(c / 255 for c in colors(int(i)))


# -- labels.png -----------------------------------------------------------------------------------
def split_labels(records) -> tuple[np.ndarray, np.ndarray]:
    """Every box of a split as normalised xywh (n, 4), with its class (n,)."""
    boxes, classes = [], []
    for rec in records:
        xyxy = np.asarray(rec.boxes, np.float32).reshape(-1, 4)
        if not len(xyxy):
            continue
        size = np.float32([rec.width, rec.height, rec.width, rec.height])
        xyxy = xyxy / size
        boxes.append(np.concatenate([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1))
        classes.append(np.asarray(rec.cls, np.int64).reshape(-1))
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros(0, np.int64)
    return np.concatenate(boxes), np.concatenate(classes)


def draw_labels(boxes: np.ndarray, cls: np.ndarray, names: list[str], out: Path) -> Path:
    """Ultralytics' labels picture (plot_labels' four panels): instances per class, the boxes' outlines
    centred, the centres' and the sizes' 2-D histograms."""
    from matplotlib.colors import LinearSegmentedColormap

    nc = len(names)
    fig = _figure((8, 8))
    ax = fig.subplots(2, 2).ravel()
    counts = np.bincount(cls, minlength=nc)[:nc] if len(cls) else np.zeros(nc, int)
    # ultralytics' palette (its third colour is near white: the grey edge keeps that bar visible)
    bars = ax[0].bar(range(nc), counts, color=[_color(i) for i in range(nc)], edgecolor="gray", linewidth=0.5)
    ax[0].set_ylabel("instances")
    if nc < 30:
        ax[0].set_xticks(range(nc))
        ax[0].set_xticklabels(names, rotation=90, fontsize=10)
        ax[0].bar_label(bars)
    else:
        ax[0].set_xlabel("classes")
    for c, (w, h) in zip(cls[:500], boxes[:500, 2:4], strict=True):
        ax[1].add_patch(_rectangle(0.5 - w / 2, 0.5 - h / 2, w, h, _color(c)))
    ax[1].set_xlim(0, 1)
    ax[1].set_ylim(1, 0)
    ax[1].set_aspect("equal")
    ax[1].set_xticks([])
    ax[1].set_yticks([])
    white_blue = LinearSegmentedColormap.from_list("white_blue", ["white", "blue"])
    for a, (i, j, xlabel, ylabel) in zip(ax[2:], ((0, 1, "x", "y"), (2, 3, "width", "height")), strict=True):
        if len(boxes):
            a.hist2d(boxes[:, i], boxes[:, j], bins=50, cmap=white_blue)
        a.set_xlabel(xlabel)
        a.set_ylabel(ylabel)
    for a in ax:
        for side in ("top", "right", "left", "bottom"):
            a.spines[side].set_visible(False)
    fig.suptitle(f"{len(cls)} labels")
    fig.tight_layout()
    return _save_figure(fig, out)


def _rectangle(x: float, y: float, w: float, h: float, color):
    from matplotlib.patches import Rectangle

    return Rectangle((x, y), w, h, fill=False, linewidth=0.5, edgecolor=color)


# -- batch grids ----------------------------------------------------------------------------------
@dataclass
class BatchPicture:
    """What `plot_images` draws: images (n, 3, h, w) uint8 RGB and boxes as normalised (labels) or pixel
    (detections) xywh, with their image index, class and, for detections, confidence."""

    images: torch.Tensor
    batch_idx: np.ndarray
    cls: np.ndarray
    bboxes: np.ndarray
    conf: np.ndarray | None = None

    @classmethod
    def of_labels(cls, batch: dict) -> BatchPicture:
        """A copy of a collated batch's first images and their labels (the loader may reuse the memory)."""
        n = min(len(batch["img"]), MAX_IMAGES)
        mine = batch["batch_idx"] < n
        return cls(
            batch["img"][:n].detach().to("cpu", copy=True),
            batch["batch_idx"][mine].cpu().numpy().copy(),
            batch["cls"][mine].view(-1).cpu().numpy().copy(),
            batch["bboxes"][mine].cpu().numpy().copy(),
        )

    @classmethod
    def of_detections(cls, images: torch.Tensor, dets: list[torch.Tensor], max_det: int = 300) -> BatchPicture:
        """Detections (xyxy in the images' pixels, conf, cls per row) of the first images."""
        n = min(len(images), MAX_IMAGES)
        rows = [(i, det[:max_det].float().cpu()) for i, det in enumerate(dets[:n])]
        xyxy = torch.cat([d[:, :4] for _, d in rows]) if rows else torch.zeros(0, 4)
        xywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1)
        return cls(
            images[:n].detach().to("cpu", copy=True),
            np.concatenate([np.full(len(d), i, np.float32) for i, d in rows]) if rows else np.zeros(0, np.float32),
            torch.cat([d[:, 5] for _, d in rows]).numpy() if rows else np.zeros(0, np.float32),
            xywh.numpy(),
            torch.cat([d[:, 4] for _, d in rows]).numpy() if rows else np.zeros(0, np.float32),
        )


def draw_batch(picture: BatchPicture, names: list[str], out: Path) -> Path:
    """Ultralytics' `plot_images` grid (PIL drawing: no matplotlib), synchronously in this thread."""
    from ultralytics.utils.plotting import plot_images

    labels: dict[str, Any] = {
        "batch_idx": picture.batch_idx.copy(),
        "cls": picture.cls.copy(),
        "bboxes": picture.bboxes.copy(),
    }
    if picture.conf is not None:
        labels["conf"] = picture.conf.copy()
    images = picture.images.float().numpy()
    by_index = dict(enumerate(names))
    return _atomic(
        out,
        lambda tmp: plot_images(
            labels, images, fname=tmp, names=by_index, conf_thres=PRED_CONF, threaded=False, max_subplots=MAX_IMAGES
        ),
    )


# -- validation -----------------------------------------------------------------------------------
@dataclass
class ValPictures:
    """Filled during one validation pass (evaluate.py feeds it the detections the metrics use): the
    confusion matrix and the first batch; `stats` (ultralytics' tp/conf/pred_cls/target_cls) at the end."""

    names: list[str]
    matrix: Any = None  # ultralytics ConfusionMatrix
    first_labels: BatchPicture | None = None
    first_preds: BatchPicture | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    epoch: int | None = None

    def __post_init__(self) -> None:
        from ultralytics.utils.metrics import ConfusionMatrix

        self.matrix = ConfusionMatrix(names=dict(enumerate(self.names)))

    def update(self, dets: list[torch.Tensor], batch: dict) -> None:
        """One batch: `dets` per image (letterboxed xyxy, conf, cls), `batch` the collated ground truth."""
        from .evaluate import image_truth  # evaluate imports this module

        height, width = batch["img"].shape[2:]
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        for i, det in enumerate(dets):
            det = det.float().cpu()
            true_cls, true_xyxy = image_truth(batch, i, scale)
            truth = {"cls": true_cls, "bboxes": true_xyxy}
            found = {"bboxes": det[:, :4], "conf": det[:, 4], "cls": det[:, 5]}
            self.matrix.process_batch(found, truth, conf=CONFUSION_CONF, iou_thres=CONFUSION_IOU)
        if self.first_labels is None:
            self.first_labels = BatchPicture.of_labels(batch)
            self.first_preds = BatchPicture.of_detections(batch["img"], dets)

    def draw(self, folder: Path) -> list[Path]:
        """Every validation picture into `folder`; the ones that could not be drawn are skipped (say why)."""
        from ultralytics.utils.metrics import ap_per_class

        folder = Path(folder)
        suffix = f" (epoch {self.epoch})" if self.epoch is not None else ""
        written = [draw_confusion(self.matrix.matrix, self.names, folder / CONFUSION, suffix)]
        stats = self.stats
        if len(stats.get("target_cls", ())):
            tp, conf, pred_cls, target = (stats[k] for k in ("tp", "conf", "pred_cls", "target_cls"))
            if not len(tp):
                tp = np.zeros((0, 10), bool)
            _, _, _, _, _, ap, classes, _, _, f1_curve, x, prec_values = ap_per_class(tp, conf, pred_cls, target)
            labelled = [self.names[int(c)] for c in classes]
            written.append(draw_pr_curve(x, prec_values, ap, labelled, folder / PR_CURVE, suffix))
            written.append(draw_f1_curve(x, f1_curve, labelled, folder / F1_CURVE, suffix))
        if self.first_labels is not None and self.first_preds is not None:
            written.append(draw_batch(self.first_labels, self.names, folder / VAL_LABELS))
            written.append(draw_batch(self.first_preds, self.names, folder / VAL_PRED))
        return written


def draw_pr_curve(
    recall: np.ndarray, precision: np.ndarray, ap: np.ndarray, names: list[str], out: Path, suffix: str = ""
) -> Path:
    """Ultralytics' PR curve (plot_pr_curve): precision at IoU .5 over recall, per class and their mean."""
    fig = _figure((9, 6))
    ax = fig.subplots()
    for i, y in enumerate(precision):
        label = f"{names[i]} {ap[i, 0]:.3f}" if len(names) < 21 else None
        ax.plot(recall, y, linewidth=1, color=None if label else "gray", label=label)
    ax.plot(recall, precision.mean(0), linewidth=3, color="blue", label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
    _curve_axes(ax, "Recall", "Precision", f"Precision-Recall Curve{suffix}")
    fig.tight_layout()
    return _save_figure(fig, out)


def draw_f1_curve(conf: np.ndarray, f1: np.ndarray, names: list[str], out: Path, suffix: str = "") -> Path:
    """Ultralytics' F1-confidence curve (plot_mc_curve): per class, and the smoothed mean with its maximum."""
    from ultralytics.utils.metrics import smooth

    fig = _figure((9, 6))
    ax = fig.subplots()
    for i, y in enumerate(f1):
        label = names[i] if len(names) < 21 else None
        ax.plot(conf, y, linewidth=1, color=None if label else "gray", label=label)
    mean = smooth(f1.mean(0), 0.1)
    best = int(mean.argmax())
    ax.plot(conf, mean, linewidth=3, color="blue", label=f"all classes {mean[best]:.2f} at {conf[best]:.3f}")
    _curve_axes(ax, "Confidence", "F1", f"F1-Confidence Curve{suffix}")
    fig.tight_layout()
    return _save_figure(fig, out)


def _curve_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set_title(title)


def draw_confusion(matrix: np.ndarray, names: list[str], out: Path, suffix: str = "") -> Path:
    """Ultralytics' normalised confusion matrix (ConfusionMatrix.plot): columns are the true classes plus
    background, each summing to 1; rows the predicted ones."""
    import warnings

    with np.errstate(invalid="ignore", divide="ignore"):
        array = matrix / (matrix.sum(0).reshape(1, -1) + 1e-9)
    array[array < 0.005] = np.nan  # not annotated (it would read 0.00)
    n = len(array)
    ticks = [*names, "background"] if n < 99 else None
    fig = _figure((12, 9))
    ax = fig.subplots()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an all-NaN matrix (nothing found, nothing labelled)
        im = ax.imshow(array, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="none")
    if n < 30:
        for i in range(n):
            for j in range(n):
                if not np.isnan(array[i, j]):
                    color = "white" if array[i, j] > 0.45 else "black"
                    ax.text(j, i, f"{array[i, j]:.2f}", ha="center", va="center", fontsize=10, color=color)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.05)
    if ticks is not None:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xticklabels(ticks, rotation=90)
        ax.set_yticklabels(ticks)
    ax.set_xlabel("True")
    ax.set_ylabel("Predicted")
    ax.set_title(f"Confusion Matrix Normalized{suffix}")
    fig.tight_layout()
    return _save_figure(fig, out)


def _warm_up() -> None:
    """Import the drawing modules and load matplotlib's font list here, before training: done first in the
    worker, their module initialisation holds the GIL for up to ~0.1 s, stalling the step that runs then."""
    from matplotlib import font_manager
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    from ultralytics.utils.metrics import ConfusionMatrix, ap_per_class  # noqa: F401
    from ultralytics.utils.plotting import plot_images  # noqa: F401

    font_manager.findfont("DejaVu Sans")


# -- the training run's writer --------------------------------------------------------------------
class RunPictures:
    """The training run's pictures: jobs run in order by one background thread; a picture that cannot be
    drawn is one notice line (training never fails for a picture). Only rank 0 makes one."""

    def __init__(self, run_dir: Path, names: list[str], notice: Callable[[str], None]):
        self.run_dir, self.names, self.notice = Path(run_dir), list(names), notice
        self._jobs: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._pending_val: ValPictures | None = None
        self._last_val_draw = time.monotonic()  # the first after a minute (or at the end), as results.png
        _warm_up()

    def labels(self, records) -> None:
        """labels.png of the train split, unless the run already has it (a resume)."""
        out = self.run_dir / LABELS
        if not out.exists():
            self._submit(LABELS, lambda: draw_labels(*split_labels(records), self.names, out))

    def train_batch(self, epoch: int, index: int, batch: dict) -> None:
        """train_batch{index}.jpg for epoch 0's first batches, unless already drawn (identical on a resume)."""
        if epoch != 0 or index >= TRAIN_BATCHES:
            return
        out = self.run_dir / train_batch_name(index)
        if not out.exists():
            picture = BatchPicture.of_labels(batch)
            self._submit(out.name, lambda: draw_batch(picture, self.names, out))

    def validation(self, pictures: ValPictures | None, best: bool) -> None:
        """A validation ended: keep its pictures when it is the best so far; draw the kept ones at most once a
        minute (three figures cost ~1 s of CPU, a whole epoch of a tiny run)."""
        if best and pictures is not None:
            self._pending_val = pictures
        if time.monotonic() - self._last_val_draw >= REDRAW_EVERY_S:
            self._draw_pending()

    def close(self) -> None:
        """Training stopped: draw the best validation's pictures if not yet drawn, and wait for every job."""
        self._draw_pending()
        if self._thread is not None:
            self._jobs.join()

    def _draw_pending(self) -> None:
        pictures, self._pending_val = self._pending_val, None
        if pictures is not None:
            self._last_val_draw = time.monotonic()
            self._submit("the validation pictures", lambda: pictures.draw(self.run_dir))

    def _submit(self, what: str, job: Callable[[], Any]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="pictures", daemon=True)
            self._thread.start()
        self._jobs.put((what, job))

    def _work(self) -> None:
        while True:
            what, job = self._jobs.get()
            try:
                job()
            except Exception as exc:  # a picture must never stop training
                self.notice(f"could not draw {what}: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}")
            finally:
                self._jobs.task_done()
