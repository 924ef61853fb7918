"""Build the detector: an ultralytics `DetectionModel` from a model YAML, with its own loss.

A model YAML is code in disguise: ultralytics' builder `eval()`s its `activation:` entry and calls
whatever name a layer row gives (`globals()[m](*args)`). Wherever the YAML comes from (a name
ultralytics ships, a path on the command line, or the config stored in a checkpoint someone handed
us), we load it ourselves (safe YAML), check it against an allow-list (`check_model_definition`:
layer modules that are `torch.nn.Module` classes of ultralytics / torch.nn / torchvision.ops,
literal arguments, an activation of the form `nn.Class(literals)`), and build from that very dict,
so what was checked is what is built.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from ultralytics.nn.tasks import DetectionModel, yaml_model_load

from .config import TrainConfig
from .errors import ConfigError

MODEL_CFG_DIR = Path(__import__("ultralytics").__file__).parent / "cfg" / "models"
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".onnx", ".engine")
DETECTION_HEADS = frozenset({"Detect", "v10Detect"})
# The head (last layer) of the tasks ultralytics ships YAMLs for that this trainer does not train.
OTHER_TASK_HEADS = {
    "Segment": "segmentation",
    "Segment26": "segmentation",
    "YOLOESegment": "segmentation",
    "YOLOESegment26": "segmentation",
    "Pose": "pose",
    "Pose26": "pose",
    "OBB": "oriented-box (OBB)",
    "OBB26": "oriented-box (OBB)",
    "Classify": "classification",
    "RTDETRDecoder": "RT-DETR",
    "WorldDetect": "YOLO-World (open-vocabulary)",
    "YOLOEDetect": "YOLOE (open-vocabulary)",
}
DETECTION_EXAMPLES = "yolov8n.yaml, yolo11n.yaml, yolov5s.yaml"
MAX_LAYERS = 1000  # a real model has < 100 rows; a bound keeps a hostile file from costing unbounded time


def resolve_model_cfg(name: str) -> str:
    """Accept a path to a YAML, or a bare name ultralytics ships (`yolov5s.yaml` -> v5/yolov5.yaml, scale s)."""
    _refuse_weights_file(name)
    if Path(name).is_file():
        return name
    stem = Path(name).stem
    # Ultralytics names scaled variants `yolov8n-seg.yaml`, resolved from `yolov8-seg.yaml` + scale letter
    # (the rule of ultralytics' yaml_model_load).
    base = re.sub(r"(\d+)([nslmx])(.+)?$", r"\1\3", stem)
    if not any(MODEL_CFG_DIR.rglob(f"{base}.yaml")) and not any(MODEL_CFG_DIR.rglob(f"{stem}.yaml")):
        raise ConfigError(
            f"model config `{name}` not found: give a path to a model YAML or a name ultralytics ships "
            f"(e.g. {DETECTION_EXAMPLES})"
        )
    return name


def _refuse_weights_file(name: str) -> None:
    suffix = Path(name).suffix.lower()
    if suffix in WEIGHT_SUFFIXES:
        yaml_name = Path(name).with_suffix(".yaml").name
        raise ConfigError(
            f"model.cfg `{name}` is a weights file, not a model definition: set model.cfg to a model YAML "
            f"(e.g. {yaml_name}) and start from the weights with --init-weights {name}"
            + (" --trust-pickle" if suffix in (".pt", ".pth", ".ckpt") else "")
        )


def load_model_definition(name: str) -> dict:
    """The checked model dict of `name` (a shipped name or a path): see the module docstring."""
    path = resolve_model_cfg(name)
    try:
        definition = yaml_model_load(path)
    except Exception as exc:  # a file that is no YAML, a missing file, a YAML that is no mapping
        raise ConfigError(
            f"model config `{name}` cannot be read as a model YAML "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
        ) from None
    check_model_definition(definition, name)
    return definition


def check_model_definition(definition: Any, name: str) -> None:
    """Refuse (ConfigError, one line) any model dict that could run code when built, or that is not a
    detector: rows `[from, repeats, module, args]` with int indices, a `torch.nn.Module` class as
    module and literal args; an activation `nn.Class(literal args)`."""
    if not isinstance(definition, dict):
        raise ConfigError(f"model config `{name}` is not a mapping (a model YAML has backbone: and head: lists)")
    rows = []
    for part in ("backbone", "head"):
        section = definition.get(part)
        if not isinstance(section, list) or not section:
            raise ConfigError(f"model config `{name}` has no `{part}:` list of layers")
        rows += section
    if len(rows) > MAX_LAYERS:
        raise ConfigError(f"model config `{name}` has {len(rows)} layers, more than the {MAX_LAYERS} allowed")
    for i, row in enumerate(rows):
        _check_row(row, i, name)
    if definition.get("activation") is not None:
        _check_activation(definition["activation"], name)
    head = rows[-1][2]
    if head in OTHER_TASK_HEADS:
        raise ConfigError(
            f"model config `{name}` is not a detection model: it is a {OTHER_TASK_HEADS[head]} model (head {head}), "
            f"which yolo-resume does not train; use a detection YAML such as {DETECTION_EXAMPLES}"
        )
    if head not in DETECTION_HEADS:
        raise ConfigError(
            f"model config `{name}` ends in {head}, not a detection head ({', '.join(sorted(DETECTION_HEADS))}); "
            f"use a detection YAML such as {DETECTION_EXAMPLES}"
        )


def _check_row(row: Any, i: int, name: str) -> None:
    where = f"model config `{name}`, layer {i}"
    if not isinstance(row, list) or len(row) != 4:
        raise ConfigError(f"{where}: a layer is [from, repeats, module, args], got {_short(row)}")
    source, repeats, module, args = row
    sources = source if isinstance(source, list) else [source]
    if not sources or not all(type(s) is int for s in sources) or type(repeats) is not int or repeats < 1:
        raise ConfigError(f"{where}: `from` must be integers and `repeats` a positive integer, got {_short(row)}")
    if not isinstance(module, str) or not _is_layer_class(module):
        raise ConfigError(
            f"{where}: module {_short(module)} is not a layer (a torch.nn.Module class of ultralytics, torch.nn "
            "or torchvision.ops); refusing to build it"
        )
    if not isinstance(args, list) or not all(_is_literal(a) for a in args):
        raise ConfigError(f"{where}: arguments must be numbers, strings, booleans, null or lists, got {_short(args)}")


def _is_layer_class(module: str) -> bool:
    """What ultralytics' parse_model would call for `module`, if it is a nn.Module class (never a function)."""
    import ultralytics.nn.tasks as tasks

    if module.startswith("nn."):
        obj = getattr(torch.nn, module[3:], None)
    elif module.startswith("torchvision.ops."):
        obj = getattr(__import__("torchvision").ops, module[16:], None)
    else:
        obj = vars(tasks).get(module)
    return isinstance(obj, type) and issubclass(obj, torch.nn.Module)


def _is_literal(value: Any, depth: int = 0) -> bool:
    if value is None or type(value) in (bool, int, float, str):
        return True
    return type(value) is list and depth < 4 and all(_is_literal(v, depth + 1) for v in value)


def _check_activation(spec: Any, name: str) -> None:
    """`nn.SiLU()`, `torch.nn.LeakyReLU(0.1)`: a torch.nn class called with literal arguments, nothing else."""
    ok = isinstance(spec, str) and len(spec) <= 200
    try:
        call = ast.parse(spec.strip(), mode="eval").body if ok else None
        ok = isinstance(call, ast.Call)
        if ok:
            attrs, node = [], call.func
            while isinstance(node, ast.Attribute):
                attrs.append(node.attr)
                node = node.value
            attrs.append(node.id if isinstance(node, ast.Name) else "")
            klass = getattr(torch.nn, attrs[0], None)
            ok = (
                attrs[1:] in (["nn"], ["nn", "torch"])
                and isinstance(klass, type)
                and issubclass(klass, torch.nn.Module)
            )
            for arg in [*call.args, *(kw.value for kw in call.keywords)]:
                ast.literal_eval(arg)
    except (SyntaxError, ValueError, TypeError):
        ok = False
    if not ok:
        raise ConfigError(
            f"model config `{name}`: activation {_short(spec)} is not a torch.nn class called with literal arguments "
            "(e.g. nn.SiLU() or nn.LeakyReLU(0.1)); refusing to build it"
        )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def build_model(model_cfg: str, num_classes: int, names: list[str], hyp: TrainConfig) -> DetectionModel:
    """A freshly initialised detector (weights drawn from the global torch RNG: seed first), built from the
    checked definition of `model_cfg` (see the module docstring)."""
    model = DetectionModel(load_model_definition(model_cfg), nc=num_classes, verbose=False)
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
