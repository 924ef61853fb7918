"""`yolo-resume val`: score a checkpoint on a split of its dataset (or another), without exporting.

The checkpoint is reached and verified through `checkpoint.ref` (the same refusals as `--resume`: a
corrupt, truncated or hostile checkpoint never reaches the model), its weights become a model as
`ckpt export` makes them (interop), and the metrics are evaluate.py's, from one forward pass: the
COCO figures `best` is chosen by, the ultralytics-style mAP, a per-class table and the precision and
recall at the best-F1 confidence. The report is written as JSON to the run's `val/` folder, and the
validation pictures (PR and F1 curves, normalised confusion matrix, first batch with its labels and
with the detections; pictures.py) to a folder of the same name beside it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from .checkpoint.ref import CheckpointRef, best_of, resolve
from .config import Config, DataConfig, apply_overrides, from_stored, load_config
from .errors import UserError
from .files import atomic_write

SPLITS = ("val", "test")
WEIGHTS = ("ema", "model")


@dataclass(frozen=True)
class ValRequest:
    target: str | None = None  # a checkpoint, a run (its best checkpoint), or None: the most recent run
    config: Path | None = None  # its `data:` section replaces the checkpoint's
    overrides: tuple[str, ...] = ()
    split: str = "val"
    weights: str = "ema"
    imgsz: int | None = None
    batch: int | None = None
    conf: float | None = None
    iou: float | None = None
    device: str | None = None
    save_dir: Path | None = None


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint's model, the config it was trained with, and where it came from."""

    ref: CheckpointRef
    meta: dict
    cfg: Config
    names: list[str]
    model: torch.nn.Module
    weights: str  # "ema" or "model": what was loaded


def pick_checkpoint(arg: str | None) -> CheckpointRef:
    """The checkpoint `arg` names; for a run, its best valid one (the `*` of `ckpt list`), else its newest."""
    target = resolve(arg)
    if target.name is not None:
        return target.one()
    infos = target.infos()
    valid = [info for info in infos if info.valid]
    if not valid:
        where = target.store.location
        raise UserError(f"no valid checkpoint in `{where}`; name one (see `yolo-resume ckpt list {arg or ''}`)")
    best = best_of(valid)
    chosen = next((info for info in reversed(valid) if info.name in best), valid[-1])
    return chosen.ref


def load_for_inference(
    ref: CheckpointRef, weights: str = "ema", device: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Verify `ref` completely (CheckpointRef.load: what a resume does) and build its model in eval mode."""
    from .interop import _build_loaded_model, _checkpoint_config, _checkpoint_names, _pick_weights

    if weights not in WEIGHTS:
        raise UserError(f"unknown weights `{weights}`; choose {' or '.join(WEIGHTS)}")
    state, meta = ref.load(map_location="cpu")
    where = Path(str(ref.where))
    cfg = _checkpoint_config(where, meta)
    names = _checkpoint_names(where, meta)
    sd, used = _pick_weights(where, state, weights)
    model = _build_loaded_model(where, cfg, names, sd).to(device)
    return LoadedCheckpoint(ref, meta, cfg, names, model, used)


def val_config(stored: Config, request: ValRequest) -> Config:
    """The checkpoint's config, with the data of `--config` and the `--set` overrides; the model section
    is always the checkpoint's (its weights fit nothing else)."""
    cfg = from_stored(stored.to_dict(), source="the checkpoint's config")
    if request.config is not None:
        cfg.data = load_config(request.config).data
    apply_overrides(cfg, list(request.overrides))
    cfg.model = stored.model
    return cfg


def load_eval_split(data: DataConfig, split: str):
    """The `val` split as training loads it, or the `test` split (a dataset YAML's `test:`, `images/test`,
    or `annotations/instances_test.json`)."""
    from .data import load_split
    from .data.coco import load_coco_split
    from .data.yolo import load_yolo_split

    if split not in SPLITS:
        raise UserError(f"unknown split `{split}`; choose {' or '.join(SPLITS)}")
    if split == "val":
        return load_split(data, "val")
    checks = {"on_bad_image": data.on_bad_image, "fingerprint": data.fingerprint}
    if data.format == "synthetic":
        raise UserError("the synthetic dataset has no test split; use --split val, or --config a dataset with one")
    if data.format == "yolo":
        return load_yolo_split(data.root, "", "test", data.names, **checks)
    return load_coco_split(Path(data.root), "", "", "test", data.names, **checks)


def report_dir(ref: CheckpointRef, save_dir: Path | None, name: str = "val") -> Path:
    """`save_dir`, else the `name` folder of the run the checkpoint belongs to (RUN/checkpoints/ckpt-N),
    else `name` in the working directory (a remote or loose checkpoint)."""
    if save_dir is not None:
        return Path(save_dir)
    where = ref.where
    if isinstance(where, Path) and where.parent.name == "checkpoints":
        return where.parent.parent / name
    return Path(name)


def run_val(request: ValRequest) -> tuple[dict, Path]:
    """Evaluate; returns the report and the JSON file it was written to."""
    from .data.dataset import DetectionDataset, collate_fn
    from .evaluate import evaluate_detailed
    from .pictures import ValPictures

    # Every argument is checked before the checkpoint is read (a large download for a remote one).
    if request.split not in SPLITS:
        raise UserError(f"unknown split `{request.split}`; choose {' or '.join(SPLITS)}")
    check_inference_args(request.conf, request.iou, request.imgsz)
    device = inference_device(request.device)
    ref = pick_checkpoint(request.target)
    loaded = load_for_inference(ref, request.weights)
    cfg = val_config(loaded.cfg, request)
    model = loaded.model.to(device)
    imgsz = request.imgsz or cfg.model.imgsz
    eval_cfg = replace(
        cfg.eval,
        conf=cfg.eval.conf if request.conf is None else request.conf,
        iou=cfg.eval.iou if request.iou is None else request.iou,
    )
    split = load_eval_split(cfg.data, request.split)
    if split.names != loaded.names:
        raise UserError(
            f"the {request.split} split has classes {split.names} but the checkpoint was trained on {loaded.names}; "
            "evaluate on a dataset with the same classes"
        )
    dataset = DetectionDataset(split, imgsz)
    loader = DataLoader(dataset, batch_size=request.batch or cfg.train.batch * 2, shuffle=False, collate_fn=collate_fn)
    started = time.perf_counter()
    pictures = ValPictures(loaded.names)
    result = evaluate_detailed(model, loader, dataset, device, eval_cfg, pictures)
    report = {
        "checkpoint": str(ref.where),
        "epoch": loaded.meta.get("epoch"),
        "global_step": loaded.meta.get("global_step"),
        "weights": loaded.weights,
        "split": request.split,
        "imgsz": imgsz,
        "conf": eval_cfg.conf,
        "iou": eval_cfg.iou,
        "device": str(device),
        "seconds": round(time.perf_counter() - started, 3),
    } | result
    folder = report_dir(ref, request.save_dir)
    stem = f"{ref.name}-{request.split}-{loaded.weights}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        report["pictures"] = draw_val_pictures(pictures, folder / stem)
        path = folder / f"{stem}.json"
        atomic_write(path, json.dumps(report, indent=2) + "\n")
    except OSError as exc:
        raise UserError(f"could not write the report to `{folder}`: {exc.strerror or exc}; pass --save-dir") from None
    return report, path


def draw_val_pictures(pictures, folder: Path) -> list[str]:
    """The pictures of this evaluation; one that cannot be drawn is a warning, never a failed `val` (the
    figures are the report)."""
    import sys

    folder.mkdir(exist_ok=True)
    try:
        return [str(p) for p in pictures.draw(folder)]
    except Exception as exc:  # the report is written regardless
        print(f"warning: could not draw the validation pictures: {type(exc).__name__}: {exc}", file=sys.stderr)
        return []


def inference_device(name: str | None) -> torch.device:
    """--device (default auto: CUDA when there is one); the run's own train.device is not reused, since a
    checkpoint trained on a GPU is often scored on a laptop."""
    from .hardware import select_device

    name = name or "auto"
    if not (name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got `{name}`")
    return select_device(name, None)


def check_inference_args(conf: float | None, iou: float | None, imgsz: int | None) -> None:
    """--conf, --iou and --imgsz of `val` and `predict` (None: the default, valid by construction)."""
    if conf is not None and not 0 <= conf < 1:
        raise UserError(f"--conf must be >= 0 and < 1, got {conf}")
    if iou is not None and not 0 < iou <= 1:
        raise UserError(f"--iou must be > 0 and <= 1, got {iou}")
    if imgsz is not None and (imgsz <= 0 or imgsz % 32):
        raise UserError(f"--imgsz must be a positive multiple of 32, got {imgsz}")
