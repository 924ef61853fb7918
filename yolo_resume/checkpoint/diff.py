"""`ckpt diff`: what differs between two checkpoints - config, metadata, and tensor by tensor."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import from_stored
from ..drift import config_drift
from ..errors import ConfigError
from .format import load_checkpoint

META_KEYS = (
    "epoch",
    "step_in_epoch",
    "global_step",
    "epochs",
    "finished",
    "metrics",
    "git",
    "versions",
    "dataset_fingerprint",
    "device",
    "threads",
    "host",
    "created",
    "segment",
    "resumed_from",
)
TENSOR_GROUPS = ("model", "ema", "optimizer")


@dataclass
class TensorDiff:
    name: str
    shape: tuple
    n_diff: int
    frac_diff: float
    max_abs: float
    mean_abs: float


@dataclass
class DiffReport:
    metadata: list[tuple[str, object, object]] = field(default_factory=list)
    tensors: list[TensorDiff] = field(default_factory=list)
    equal: int = 0
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)


def flat_tensors(obj, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    else:
        return {}
    out: dict[str, torch.Tensor] = {}
    for key, value in items:
        out |= flat_tensors(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def compare_tensor(name: str, a: torch.Tensor, b: torch.Tensor) -> TensorDiff | None:
    """None when bitwise equal; otherwise how much they differ (shape/dtype changes count as all)."""
    if a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b):
        return None
    if a.shape != b.shape:
        return TensorDiff(name, tuple(a.shape), a.numel(), 1.0, float("inf"), float("inf"))
    delta = (a.double() - b.double()).abs()
    differ = a != b
    n = int(differ.sum())
    return TensorDiff(name, tuple(a.shape), n, n / max(a.numel(), 1), float(delta.max()), float(delta.mean()))


def _meant_config(meta: dict, path: Path) -> dict:
    """The stored config as it was meant when saved (an older version's config gets its old recipe), so two
    checkpoints of one run never differ by keys that were only added later."""
    raw = meta.get("config", {})
    try:
        return from_stored(raw, source=f"checkpoint {path}").to_dict()
    except ConfigError:
        return raw if isinstance(raw, dict) else {}


def diff_checkpoints(path_a: Path, path_b: Path) -> DiffReport:
    state_a, meta_a = load_checkpoint(path_a)
    state_b, meta_b = load_checkpoint(path_b)
    report = DiffReport()
    for d in config_drift(_meant_config(meta_a, path_a), _meant_config(meta_b, path_b)):
        report.metadata.append((f"config {d.what}", d.stored, d.current))
    for key in META_KEYS:
        if meta_a.get(key) != meta_b.get(key):
            report.metadata.append((key, meta_a.get(key), meta_b.get(key)))
    flat_a = {k: v for g in TENSOR_GROUPS for k, v in flat_tensors(state_a.get(g), g).items()}
    flat_b = {k: v for g in TENSOR_GROUPS for k, v in flat_tensors(state_b.get(g), g).items()}
    report.only_a = sorted(flat_a.keys() - flat_b.keys())
    report.only_b = sorted(flat_b.keys() - flat_a.keys())
    for name in sorted(flat_a.keys() & flat_b.keys()):
        diff = compare_tensor(name, flat_a[name], flat_b[name])
        if diff is None:
            report.equal += 1
        else:
            report.tensors.append(diff)
    report.tensors.sort(key=lambda t: t.max_abs, reverse=True)
    return report
