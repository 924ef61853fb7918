"""Optimizer with the usual YOLO parameter groups, and an LR schedule that is a pure function of the step.

Because `lr_at(step)` depends only on the global step (and the plan: epochs, batches per epoch,
warmup), resuming needs no scheduler object at all, and `--epochs N` on resume re-plans the
schedule from the current step simply by building a new `LRSchedule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from .config import TrainConfig


def accumulate_steps(cfg: TrainConfig) -> int:
    """Micro-batches per optimizer step, so the effective batch is about `nbs`."""
    return max(round(cfg.nbs / cfg.batch), 1)


def accumulate_at(step: int, nominal: int, warmup_steps: int) -> int:
    """Micro-batches per optimizer step at global batch `step`, as ultralytics' trainer ramps it: from 1 at the
    start of warmup to `nominal` at its last batch (np.interp, rounded half to even), then `nominal`."""
    if warmup_steps and step <= warmup_steps:
        return max(1, int(np.interp(step, [0, warmup_steps], [1, nominal]).round()))
    return nominal


# optimizer: auto, as ultralytics decides it (BaseTrainer.build_optimizer): AdamW for short runs.
AUTO_MAX_ADAMW_STEPS = 10000


def resolve_optimizer(cfg: TrainConfig, num_classes: int, num_images: int) -> TrainConfig:
    """`cfg` with `optimizer: auto` replaced by what it means for this run, as ultralytics decides it: AdamW with
    a fitted lr0 for runs of up to 10000 optimizer steps, else SGD; no bias warmup either way. Ultralytics >= 8.4
    picks its MuSGD for long runs; we pick SGD there, as ultralytics 8.0-8.3 did. SGD keeps `cfg.momentum`, which
    is where ultralytics' warmup takes its momentum to. The trainer resolves this once, at the start of a run,
    and the run's config records the choice (as ultralytics' train_args do), so `--epochs N` on resume can never
    switch optimizers."""
    if cfg.optimizer != "auto":
        return cfg
    iterations = math.ceil(num_images / max(cfg.batch, cfg.nbs)) * cfg.epochs
    if iterations > AUTO_MAX_ADAMW_STEPS:
        return replace(cfg, optimizer="SGD", lr0=0.01, warmup_bias_lr=0.0)
    lr_fit = round(0.002 * 5 / (4 + num_classes), 6)
    return replace(cfg, optimizer="AdamW", lr0=lr_fit, momentum=0.9, warmup_bias_lr=0.0)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Three groups: weights with decay, norm weights without, biases without (as in YOLOv5/v8)."""
    if cfg.optimizer not in ("SGD", "AdamW"):
        raise ValueError(f"resolve optimizer `{cfg.optimizer}` first (resolve_optimizer)")
    decay, no_decay, bias = [], [], []
    norm_types = tuple(v for k, v in nn.__dict__.items() if "Norm" in k and isinstance(v, type))
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias":
                bias.append(param)
            elif isinstance(module, norm_types):
                no_decay.append(param)
            else:
                decay.append(param)
    # Weight decay is per nominal batch: scale it by the effective batch size.
    weight_decay = cfg.weight_decay * cfg.batch * accumulate_steps(cfg) / cfg.nbs
    if cfg.optimizer == "SGD":
        opt = torch.optim.SGD(bias, lr=cfg.lr0, momentum=cfg.momentum, nesterov=True)
    else:
        opt = torch.optim.AdamW(bias, lr=cfg.lr0, betas=(cfg.momentum, 0.999), weight_decay=0.0)
    opt.param_groups[0]["name"] = "bias"
    opt.add_param_group({"params": decay, "weight_decay": weight_decay, "name": "decay"})
    opt.add_param_group({"params": no_decay, "weight_decay": 0.0, "name": "no_decay"})
    return opt


@dataclass(frozen=True)
class LRSchedule:
    """Warmup then linear or cosine decay, evaluated from the global step (the batch index of the run).

    The defaults follow ultralytics' trainer: the decay factor lf(epoch) changes once per epoch (its
    LambdaLR is stepped per epoch); during warmup every LR rises linearly from 0 (biases fall from
    warmup_bias_lr) to lr0 * lf(epoch), and SGD's momentum rises from warmup_momentum; Adam's beta1 is
    left alone unless `warmup_beta1`."""

    lr0: float
    lrf: float
    epochs: int
    batches_per_epoch: int
    warmup_epochs: float
    schedule: str = "linear"
    momentum: float = 0.937
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.0
    per_epoch: bool = True  # lf steps once per epoch (False: smoothly every batch)
    warm_momentum: bool = True  # ramp the momentum (SGD) / beta1 (Adam, when asked) during warmup

    @classmethod
    def from_config(cls, cfg: TrainConfig, batches_per_epoch: int) -> LRSchedule:
        return cls(
            lr0=cfg.lr0,
            lrf=cfg.lrf,
            epochs=cfg.epochs,
            batches_per_epoch=batches_per_epoch,
            warmup_epochs=cfg.warmup_epochs,
            schedule=cfg.schedule,
            momentum=cfg.momentum,
            warmup_momentum=cfg.warmup_momentum,
            warmup_bias_lr=cfg.warmup_bias_lr,
            per_epoch=cfg.lr_decay_every == "epoch",
            warm_momentum=cfg.optimizer == "SGD" or cfg.warmup_beta1,
        )

    @property
    def warmup_steps(self) -> int:
        """Warmup batches, leaving at least the last epoch for regular training."""
        epochs = min(self.warmup_epochs, max(self.epochs - 1, 0))
        return round(epochs * self.batches_per_epoch)

    def factor(self, step: int) -> float:
        """Decay factor at `step` (batches since the start): lf(epoch), or lf of the fractional epoch."""
        if self.per_epoch:
            progress = min(step // self.batches_per_epoch / max(self.epochs, 1), 1.0)
        else:  # written as before lr_decay_every existed, so that old runs resume bit for bit
            progress = min(step / max(self.epochs * self.batches_per_epoch, 1), 1.0)
        if self.schedule == "cosine":
            return self.lrf + (1 - self.lrf) * (1 + math.cos(math.pi * progress)) / 2
        return (1 - progress) * (1 - self.lrf) + self.lrf

    def lr_at(self, step: int, group: str = "decay") -> float:
        target = self.lr0 * self.factor(step)
        nw = self.warmup_steps
        if nw and step < nw:
            start = self.warmup_bias_lr if group == "bias" else 0.0
            return start + (target - start) * step / nw
        return target

    def momentum_at(self, step: int) -> float:
        nw = self.warmup_steps
        if self.warm_momentum and nw and step < nw:
            return self.warmup_momentum + (self.momentum - self.warmup_momentum) * step / nw
        return self.momentum

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's LR and momentum for `step`; returns the main group's LR."""
        momentum = self.momentum_at(step)
        for group in optimizer.param_groups:
            group["lr"] = self.lr_at(step, group.get("name", "decay"))
            if "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            elif "momentum" in group:
                group["momentum"] = momentum
        return self.lr_at(step)
