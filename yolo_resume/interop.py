"""Interoperability with the ultralytics ecosystem: export checkpoints, initialise models from weights.

Export (`export_checkpoint`) reads a verified yolo-resume checkpoint folder (never a pickle) and writes

- ``ultralytics``: a ``.pt`` shaped like the checkpoints ultralytics' own trainer writes after
  `strip_optimizer` (FP16 `DetectionModel` under ``model``, ``train_args``, ``epoch = -1``, ...), so
  ``ultralytics.YOLO(path)`` predicts, validates, exports and fine-tunes with it. A ``.pt`` is a pickle
  by definition of that format; nothing in this package ever loads one without ``trust_pickle``.
- ``safetensors``: the chosen weights only, with the model config, class names and image size in the
  safetensors ``__metadata__``.
- ``onnx``: through the ultralytics exporter (needs the optional ``onnx`` package).

Initialisation (`load_init_weights`) copies every tensor whose name and shape match from a checkpoint
folder, a ``.safetensors`` file or, only when the caller trusts it, a pickled ``.pt``/``.pth`` file.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from copy import deepcopy
from datetime import datetime
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from .checkpoint.format import PICKLE_SUFFIXES, is_checkpoint_dir, load_checkpoint
from .config import Config, from_stored
from .errors import CheckpointError, UserError
from .run_dir import RunDir

__all__ = ["EXPORT_FORMATS", "SAFETENSORS_META_KEYS", "export_checkpoint", "load_init_weights"]

EXPORT_FORMATS = ("ultralytics", "safetensors", "onnx")
WEIGHT_CHOICES = ("ema", "model")
_SUFFIX = {"ultralytics": ".pt", "safetensors": ".safetensors", "onnx": ".onnx"}
# Keys of the safetensors `__metadata__` (a str -> str map) written by the safetensors export.
SAFETENSORS_META_KEYS = ("format", "model_cfg", "names", "imgsz", "weights", "epoch", "source")
SAFETENSORS_FORMAT = "yolo-resume-weights"
ONNX_EXTRA_HINT = "pip install 'yolo-resume[onnx]'"


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------


def export_checkpoint(ckpt: Path, fmt: str, out: Path, weights: str = "ema") -> Path:
    """Export the checkpoint folder `ckpt` as `fmt` to `out`; returns the file written.

    `out` is the output file, or an existing folder to write `<checkpoint name><suffix>` into.
    `weights` picks the EMA weights (the default; falls back to the raw model weights when the run kept
    no EMA) or the raw model weights ("model"). The checkpoint is fully verified before use.
    """
    if fmt not in EXPORT_FORMATS:
        raise UserError(f"unknown export format `{fmt}`; formats are {', '.join(EXPORT_FORMATS)}")
    if weights not in WEIGHT_CHOICES:
        raise UserError(f"unknown weights `{weights}`; choose {' or '.join(WEIGHT_CHOICES)}")
    ckpt, out = Path(ckpt), Path(out)
    out = _output_path(ckpt, fmt, out)
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:
        # Checked before anything is loaded: the ultralytics exporter would otherwise try to pip install it.
        raise UserError(f"ONNX export needs the optional onnx extra: {ONNX_EXTRA_HINT}")

    state, meta = _load_yolo_resume_checkpoint(ckpt)
    cfg = _checkpoint_config(ckpt, meta)
    names = _checkpoint_names(ckpt, meta)
    sd, used = _pick_weights(ckpt, state, weights)

    if fmt == "safetensors":
        tensors, metadata = _safetensors_payload(sd, cfg, names, used, meta, ckpt)
        _atomic_write(out, lambda tmp: safetensors.torch.save_file(tensors, str(tmp), metadata=metadata))
        return out
    model = _build_loaded_model(ckpt, cfg, names, sd)
    if fmt == "ultralytics":
        payload = _ultralytics_ckpt(model, cfg, meta, ckpt, used)
        _atomic_write(out, lambda tmp: torch.save(payload, tmp))
        return out
    return _export_onnx(model, cfg, meta, ckpt, used, out)


def _output_path(ckpt: Path, fmt: str, out: Path) -> Path:
    suffix = _SUFFIX[fmt]
    if out.is_dir():
        return out / f"{ckpt.resolve().name}{suffix}"
    if out.suffix.lower() != suffix:
        raise UserError(f"the {fmt} export must be written to a `{suffix}` file, got `{out}`")
    if not out.parent.is_dir():
        raise UserError(f"output folder `{out.parent}` does not exist; create it or choose another path")
    return out


def _load_yolo_resume_checkpoint(ckpt: Path) -> tuple[dict, dict]:
    checkpoints = RunDir(ckpt).default_checkpoints
    if ckpt.is_dir() and not is_checkpoint_dir(ckpt) and checkpoints.is_dir():
        raise CheckpointError(
            f"`{ckpt}` is a run folder, not a checkpoint; pass one of its checkpoints, e.g. {checkpoints}/ckpt-..."
        )
    return load_checkpoint(ckpt)


def _checkpoint_config(ckpt: Path, meta: dict) -> Config:
    raw = meta.get("config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint {ckpt}: meta.json has no config; it was not written by yolo-resume")
    return from_stored(raw, source=f"the config stored in checkpoint {ckpt}")


def _checkpoint_names(ckpt: Path, meta: dict) -> list[str]:
    names = meta.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"checkpoint {ckpt}: meta.json has no list of class names")
    return names


def _pick_weights(ckpt: Path, state: dict, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, "ema" | "model"): the EMA unless the model weights were asked for or there is no EMA."""
    ema = state.get("ema")
    if weights == "ema" and isinstance(ema, dict) and isinstance(ema.get("weights"), dict):
        return ema["weights"], "ema"
    sd = state.get("model")
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"checkpoint {ckpt} holds no model weights")
    return sd, "model"


def _build_loaded_model(ckpt: Path, cfg: Config, names: list[str], sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    from .model import build_model

    # Building draws random init weights from the global RNG; they are all overwritten below, but leave
    # the caller's RNG where it was.
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.model.cfg, len(names), names, cfg.train)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(
            f"checkpoint {ckpt}: its weights do not fit model {cfg.model.cfg} with {len(names)} classes ({first})"
        ) from None
    return model.float().eval()


def _atomic_write(out: Path, write) -> None:
    """Write through a temporary sibling, then rename: `out` is never left half-written."""
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise UserError(f"could not write `{out}`: {exc.strerror or exc}") from None
    except RuntimeError as exc:  # torch's zip writer reports a failed write (disk full) as a RuntimeError
        raise UserError(f"could not write `{out}`: {' '.join(str(exc).split())[:200]}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _safetensors_payload(
    sd: dict[str, torch.Tensor], cfg: Config, names: list[str], used: str, meta: dict, ckpt: Path
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in sd.items()}  # clone: no shared storage
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "model_cfg": cfg.model.cfg,
        "names": json.dumps(names),
        "imgsz": str(cfg.model.imgsz),
        "weights": used,
        "epoch": str(meta.get("epoch")),
        "source": ckpt.resolve().name,
    }
    return tensors, metadata


def _train_args(cfg: Config, ckpt: Path) -> dict[str, Any]:
    """Ultralytics `train_args`: its defaults overlaid with this run's equivalents."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    data = cfg.data.root if cfg.data.format == "yolo" and cfg.data.root.endswith((".yaml", ".yml")) else None
    t, a = cfg.train, cfg.augment
    ours = {
        "task": "detect",
        "mode": "train",
        "model": cfg.model.cfg,
        "data": data,
        "imgsz": cfg.model.imgsz,
        "epochs": t.epochs,
        "batch": t.batch,
        "nbs": t.nbs,
        "workers": max(t.workers, 0),  # -1 (auto) is ours, not ultralytics'
        "seed": t.seed,
        "deterministic": t.deterministic,
        "optimizer": t.optimizer,
        "lr0": t.lr0,
        "lrf": t.lrf,
        "cos_lr": t.schedule == "cosine",
        "momentum": t.momentum,
        "weight_decay": t.weight_decay,
        "warmup_epochs": t.warmup_epochs,
        "warmup_momentum": t.warmup_momentum,
        "warmup_bias_lr": t.warmup_bias_lr,
        "box": t.box,
        "cls": t.cls,
        "dfl": t.dfl,
        "amp": t.amp,
        "fliplr": a.fliplr,
        "hsv_h": a.hsv_h,
        "hsv_s": a.hsv_s,
        "hsv_v": a.hsv_v,
        "scale": a.scale,
        "translate": a.translate,
        "mosaic": a.mosaic,
        "close_mosaic": a.close_mosaic,
        "iou": cfg.eval.iou,
        "max_det": cfg.eval.max_det,
        "name": ckpt.resolve().name,
    }
    return {**DEFAULT_CFG_DICT, **{k: v for k, v in ours.items() if k in DEFAULT_CFG_DICT}}


def _ultralytics_ckpt(model: torch.nn.Module, cfg: Config, meta: dict, ckpt: Path, used: str) -> dict[str, Any]:
    """The dict ultralytics' trainer saves (after `strip_optimizer`): what `YOLO(path)` loads."""
    from ultralytics import __version__ as ultralytics_version

    train_args = _train_args(cfg, ckpt)
    model = deepcopy(model).half().to(memory_format=torch.contiguous_format)
    for p in model.parameters():
        p.requires_grad = False
    # Plain builtins only (a SimpleNamespace is not on ultralytics' ULTRALYTICS_SAFE_LOAD allow-list).
    model.args = dict(train_args)
    model.task = "detect"
    if hasattr(model, "criterion"):
        model.criterion = None
    metrics = meta.get("metrics") or {}
    train_metrics = {
        "metrics/mAP50(B)": metrics.get("map50"),
        "metrics/mAP50-95(B)": metrics.get("map"),
        "fitness": metrics.get("fitness"),
    }
    return {
        "date": datetime.now().astimezone().isoformat(),
        "version": ultralytics_version,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1,  # a finished model, not a resumable ultralytics run
        "best_fitness": None,
        "model": model,
        "ema": None,
        "updates": None,
        "optimizer": None,
        "scaler": None,
        "stopper": None,
        "train_args": train_args,
        "train_metrics": {k: v for k, v in train_metrics.items() if v is not None},
        "yolo_resume": {  # provenance; ultralytics ignores unknown keys
            "checkpoint": ckpt.resolve().name,
            "weights": used,
            "epoch": meta.get("epoch"),
            "global_step": meta.get("global_step"),
            "best_fitness": meta.get("best_fitness"),
            "config_hash": meta.get("config_hash"),
        },
    }


def _export_onnx(model: torch.nn.Module, cfg: Config, meta: dict, ckpt: Path, used: str, out: Path) -> Path:
    from ultralytics import YOLO

    with tempfile.TemporaryDirectory(prefix="yolo-resume-onnx-", dir=out.parent) as tmp:
        pt = Path(tmp) / f"{out.stem}.pt"
        torch.save(_ultralytics_ckpt(model, cfg, meta, ckpt, used), pt)
        try:
            produced = YOLO(str(pt)).export(
                format="onnx", imgsz=cfg.model.imgsz, simplify=False, dynamic=False, device="cpu", verbose=False
            )
        except Exception as exc:  # the exporter raises a mix of types; one line for the user
            raise UserError(f"ONNX export failed: {' '.join(str(exc).split())[:300]}") from None
        shutil.move(str(produced), out)
    return out


# ---------------------------------------------------------------------------------------------------
# Initialisation from existing weights
# ---------------------------------------------------------------------------------------------------


def load_init_weights(model: torch.nn.Module, path: Path, trust_pickle: bool) -> tuple[int, int]:
    """Copy into `model` every tensor of `path` whose name and shape match; returns (transferred, total).

    `path` is a yolo-resume checkpoint folder (its EMA weights, else its model weights) or a
    `.safetensors` file, both loaded without running code, or a pickled `.pt`/`.pth` file (an ultralytics
    checkpoint, a pickled module or a state dict), which is refused unless `trust_pickle`. Tensors whose
    shape differs (e.g. a head for another number of classes) are left as initialised.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"weights `{path}` not found; pass a checkpoint folder, a .safetensors or a .pt file")
    if path.is_dir():
        source = _checkpoint_weights(path)
    elif path.suffix.lower() == ".safetensors":
        source = _safetensors_weights(path)
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise UserError(
                f"refusing to load `{path}`: {path.suffix} files are pickles that can run arbitrary code when "
                "loaded; pass --trust-pickle to load it if you trust its source (or use a .safetensors export)"
            )
        source = _pickle_weights(path)
    else:
        raise UserError(
            f"unsupported weights file `{path}`; pass a yolo-resume checkpoint folder, a .safetensors file "
            "or (with --trust-pickle) a .pt/.pth file"
        )
    return _transfer(model, source, path)


def _checkpoint_weights(path: Path) -> Mapping[str, Any]:
    state, _ = _load_yolo_resume_checkpoint(path)
    sd, _ = _pick_weights(path, state, "ema")
    return sd


def _safetensors_weights(path: Path) -> Mapping[str, Any]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...: one line either way
        raise UserError(f"`{path}` is not a readable safetensors file: {' '.join(str(exc).split())[:200]}") from None


def _pickle_weights(path: Path) -> Mapping[str, Any]:
    try:
        with _legacy_ultralytics_modules():
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except ModuleNotFoundError as exc:
        raise UserError(f"`{path}` needs Python module `{exc.name}`, which is not installed") from None
    except Exception as exc:
        raise UserError(f"could not load `{path}`: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    sd = _state_dict_of(obj)
    if sd is None:
        raise UserError(
            f"`{path}` holds no model weights (expected an ultralytics checkpoint, a module or a state dict)"
        )
    return sd


def _legacy_ultralytics_modules():
    """The module renames ultralytics' own loader applies, so that older ultralytics .pt files load too."""
    from ultralytics.nn import tasks

    remap = getattr(tasks, "temporary_modules", None)
    if remap is None:
        return contextlib.nullcontext()
    return remap(
        modules={
            "ultralytics.yolo.utils": "ultralytics.utils",
            "ultralytics.yolo.v8": "ultralytics.models.yolo",
            "ultralytics.yolo.data": "ultralytics.data",
        }
    )


def _state_dict_of(obj: Any) -> Mapping[str, Any] | None:
    if isinstance(obj, torch.nn.Module):
        return obj.float().state_dict()
    if not isinstance(obj, Mapping):
        return None
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj  # a plain state dict
    for key in ("ema", "model", "state_dict"):  # ultralytics: ema (old) or model (stripped); lightning: state_dict
        inner = obj.get(key)
        if inner is not None and not isinstance(inner, (str, bytes, int, float)):
            sd = _state_dict_of(inner)
            if sd:
                return sd
    return None


def _transfer(model: torch.nn.Module, source: Mapping[str, Any], path: Path) -> tuple[int, int]:
    target = model.state_dict()
    matched = {
        k: v
        for k, v in source.items()
        if isinstance(v, torch.Tensor) and k in target and tuple(v.shape) == tuple(target[k].shape)
    }
    if not matched:
        raise UserError(
            f"no tensor of `{path}` matches model {type(model).__name__} by name and shape; "
            "is it the same architecture (model.cfg)?"
        )
    model.load_state_dict(matched, strict=False)  # casts to the model's dtypes (an fp16 .pt into fp32)
    return len(matched), len(target)
