"""Build the detector: an ultralytics `DetectionModel` from a model YAML, with its own loss."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch
from ultralytics.nn.tasks import DetectionModel

from .config import TrainConfig
from .errors import ConfigError

MODEL_CFG_DIR = Path(__import__("ultralytics").__file__).parent / "cfg" / "models"


def resolve_model_cfg(name: str) -> str:
    """Accept a path to a YAML, or a bare name ultralytics ships (`yolov5s.yaml` -> v5/yolov5.yaml, scale s)."""
    if Path(name).is_file():
        return name
    stem = Path(name).stem
    # Ultralytics names scaled variants `yolov5s.yaml`, resolved from `yolov5.yaml` + scale letter.
    base = stem[:-1] if stem[-1:] in "nsmlx" else stem
    if not any(MODEL_CFG_DIR.rglob(f"{base}.yaml")) and not any(MODEL_CFG_DIR.rglob(f"{stem}.yaml")):
        raise ConfigError(
            f"model config `{name}` not found: give a path to a model YAML or a name ultralytics ships "
            "(e.g. yolov5s.yaml, yolov5n.yaml, yolov8n.yaml)"
        )
    return name


def build_model(model_cfg: str, num_classes: int, names: list[str], hyp: TrainConfig) -> DetectionModel:
    """A freshly initialised detector (weights drawn from the global torch RNG: seed first)."""
    model = DetectionModel(resolve_model_cfg(model_cfg), nc=num_classes, verbose=False)
    model.names = dict(enumerate(names))
    # The ultralytics loss reads its gains from `model.args`.
    model.args = SimpleNamespace(box=hyp.box, cls=hyp.cls, dfl=hyp.dfl)
    return model


def compute_loss(
    model: torch.nn.Module, batch: dict, net: torch.nn.Module | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to backpropagate, detached per-component losses [box, cls, dfl]). The forward pass goes
    through `net` when given (the DDP wrapper, which all-reduces gradients in backward)."""
    loss, items = model.loss(batch, (net or model)(batch["img"]))
    return loss.sum(), torch.stack([v.detach().float() for v in items.values()])


LOSS_NAMES = ("box_loss", "cls_loss", "dfl_loss")
