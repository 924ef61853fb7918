"""Where a run trains: the device, the data-loader workers, the share of the batch of each process."""

from __future__ import annotations

import os

import torch

from .config import Config
from .errors import ConfigError


def select_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device to train on; under torchrun each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device `{name}` requested but CUDA is not available; use --device cpu")
    if name == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_workers(workers: int, device: torch.device, world_size: int = 1) -> int:
    """`train.workers`, with -1 (auto) resolved: none on CPU, a few per process on CUDA."""
    if workers >= 0:
        return workers
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // max(world_size, 1)))


def check_world_size(cfg: Config, world_size: int) -> None:
    if cfg.train.batch % world_size:
        raise ConfigError(
            f"config key `train.batch` ({cfg.train.batch}) is the global batch and must be divisible by the "
            f"number of processes ({world_size})"
        )
