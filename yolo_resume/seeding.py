"""Seeding, RNG state capture/restore and the determinism switches."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def configure_determinism(deterministic: bool) -> None:
    """Deterministic kernels: the precondition for bitwise-equal runs on the same hardware."""
    if deterministic:
        # cuBLAS needs a fixed workspace to be deterministic; must be set before the first cuBLAS call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # warn_only: a few ultralytics ops lack deterministic CUDA kernels; a warning beats a crash.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic


def rng_state() -> dict:
    """Every global RNG the training process touches, in a checkpointable form."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    for i, cuda_state in enumerate(state.get("cuda", [])):
        if i < torch.cuda.device_count():
            torch.cuda.set_rng_state(cuda_state.cpu(), i)


def _as_tuple(obj):
    """random.setstate wants nested tuples; be lenient with lists from older encodings."""
    return tuple(_as_tuple(x) for x in obj) if isinstance(obj, (list, tuple)) else obj
