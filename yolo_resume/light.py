"""`best.safetensors` and `last.safetensors` in the run folder: the weights a user ships.

Small EMA-only files (the model's EMA weights, or its raw weights when the run keeps no EMA), in the
format of `ckpt export --format safetensors` (same `__metadata__`), so `--init-weights` and any
safetensors reader take them. They live beside the run's files, not in its checkpoint store, so
retention never sees them and a resume never starts from one (they hold no optimizer, RNG or data
position). Each is written through a temporary sibling and renamed (a kill leaves the old file or the
new one), in a background thread from a copy taken at the epoch end: training never waits for the disk.

Every `ckpt.light_every_epochs` epochs (default 5; 0 = off) the same weights are also kept as a milestone,
`weights/epoch-N.safetensors`, never overwritten: the run's history a user can compare or ship. Like
best/last it lives outside the checkpoint store: retention never counts, keeps or deletes it, and nothing
resumes from it.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

BEST, LAST = "best.safetensors", "last.safetensors"
MILESTONES = "weights"  # <run>/weights/epoch-N.safetensors


def milestone_name(epoch: int) -> str:
    return f"{MILESTONES}/epoch-{epoch}.safetensors"


FORMAT = "yolo-resume-weights"  # interop.SAFETENSORS_FORMAT: the same file as the safetensors export


class LightWeights:
    def __init__(self, run_dir: Path, model_cfg: str, names: list[str], imgsz: int, notice: Callable[[str], None]):
        self.run_dir = Path(run_dir)
        self.base_meta = {"format": FORMAT, "model_cfg": model_cfg, "names": json.dumps(names), "imgsz": str(imgsz)}
        self.notice = notice
        self._writer: threading.Thread | None = None
        self._error: str | None = None

    def update(
        self, weights: dict[str, torch.Tensor], used: str, epoch: int, best: bool, milestone: bool = False
    ) -> None:
        """Copy `weights` now; write last.safetensors (and best.safetensors when `best`, the epoch's milestone
        file when `milestone`) in the background."""
        self.wait()
        tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in weights.items()}
        meta = self.base_meta | {"weights": used, "epoch": str(epoch), "source": f"epoch {epoch}"}
        names = [LAST] + [BEST] * best + [milestone_name(epoch)] * milestone
        self._writer = threading.Thread(target=self._write, args=(tensors, meta, names), name="light weights")
        self._writer.start()

    def wait(self) -> None:
        """Let the write in flight finish; say once if it failed (training goes on: checkpoints are intact)."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            self.notice(f"could not write the light weights files: {self._error} (checkpoints are unaffected)")
            self._error = None

    def _write(self, tensors: dict[str, torch.Tensor], meta: dict[str, str], names: list[str]) -> None:
        for name in names:
            path = self.run_dir / name
            tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except (OSError, RuntimeError) as exc:
                self._error = f"{path}: {exc}"
            finally:
                tmp.unlink(missing_ok=True)
