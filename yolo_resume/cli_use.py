"""`yolo-resume val` and `yolo-resume predict`: using a checkpoint without exporting it first."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from .cli_common import out, user_errors


def register(app: typer.Typer) -> None:
    app.command("val")(val)
    app.command("predict")(predict)


@user_errors
def val(
    target: str = typer.Argument(
        None, help="Checkpoint (folder, URL or RUN/ckpt-N), or a run: its best checkpoint (default: the latest run)."
    ),
    config: Path = typer.Option(None, "--config", "-c", help="Evaluate on the data: section of this config YAML."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set data.root=other (repeatable)."),
    split: str = typer.Option("val", "--split", help="val or test."),
    weights: str = typer.Option("ema", "--weights", help="ema (default) or model."),
    imgsz: int = typer.Option(None, "--imgsz", help="Image size (default: the run's model.imgsz)."),
    batch: int = typer.Option(None, "--batch", min=1, help="Images per batch (default: 2 x train.batch)."),
    conf: float = typer.Option(None, "--conf", help="NMS confidence threshold (default: eval.conf, 0.001)."),
    iou: float = typer.Option(None, "--iou", help="NMS IoU threshold (default: eval.iou, 0.7)."),
    device: str = typer.Option(None, "--device", help="auto (default), cpu, cuda or cuda:N."),
    save_dir: Path = typer.Option(None, "--save-dir", help="Folder of the JSON report (default: <run>/val)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Score a checkpoint: COCO mAP@[.5:.95] and mAP@.5, the ultralytics-style mAP, per-class AP, and
    precision/recall at the best-F1 confidence; the report is written to the run's val/ folder."""
    from .val import ValRequest, run_val

    request = ValRequest(target, config, tuple(set_), split, weights, imgsz, batch, conf, iou, device, save_dir)
    report, path = run_val(request)
    if as_json:
        print(json.dumps(report | {"report": str(path)}, indent=2))
        return
    m, best = report["metrics"], report["best_f1"]
    table = Table(title=f"{report['checkpoint']} ({report['weights']} weights, {report['split']} split)")
    for col in ("class", "labels", "AP@.5:.95", "AP@.5", "ultralytics AP", "P", "R"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for row in report["classes"]:
        table.add_row(
            row["name"],
            str(row["labels"]),
            *(f"{row[k]:.4f}" for k in ("ap", "ap50", "ultralytics_ap", "precision", "recall")),
        )
    out.print(table)
    out.print(
        f"mAP@[.5:.95] {m['map']:.4f}  mAP@.5 {m['map50']:.4f}  ultralytics mAP@.5:.95 {m['ultralytics_map']:.4f} "
        f"mAP@.5 {m['ultralytics_map50']:.4f}  |  at conf {best['conf']:.3f} (best F1 {best['f1']:.3f}): "
        f"P {best['precision']:.4f} R {best['recall']:.4f}  |  {report['images']} images",
        soft_wrap=True,
    )
    out.print(f"report: {path}", soft_wrap=True)
    if report.get("pictures"):
        out.print(f"pictures: {Path(report['pictures'][0]).parent}", soft_wrap=True)


@user_errors
def predict(
    checkpoint: str = typer.Argument(..., help="Checkpoint (folder, URL or RUN/ckpt-N), or a run: its best one."),
    sources: list[str] = typer.Argument(..., help="Image files, folders or glob patterns ('imgs/*.jpg')."),
    conf: float = typer.Option(0.25, "--conf", help="Confidence threshold."),
    iou: float = typer.Option(0.7, "--iou", help="NMS IoU threshold."),
    imgsz: int = typer.Option(None, "--imgsz", help="Image size (default: the run's model.imgsz)."),
    weights: str = typer.Option("ema", "--weights", help="ema (default) or model."),
    device: str = typer.Option(None, "--device", help="auto (default), cpu, cuda or cuda:N."),
    save_dir: Path = typer.Option(None, "--save-dir", help="Output folder (default: <run>/predict)."),
    as_json: bool = typer.Option(False, "--json", help="Print the detections as JSON."),
):
    """Detect objects in images: writes each picture with its boxes and class names drawn, and
    predictions.json with every detection."""
    from .predict import PredictRequest, run_predict

    rows, report = run_predict(PredictRequest(checkpoint, tuple(sources), conf, iou, imgsz, save_dir, weights, device))
    if as_json:
        print(json.dumps({"images": rows, "report": str(report)}, indent=2))
        return
    for row in rows:
        found = ", ".join(f"{d['name']} {d['confidence']:.2f}" for d in row["detections"]) or "nothing"
        out.print(f"{row['image']}: {found} -> {row['output']}", soft_wrap=True)
    out.print(f"{len(rows)} image(s); detections in {report}", soft_wrap=True)
