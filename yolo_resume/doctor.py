"""`yolo-resume doctor`: prove exact resume on the user's own hardware before a long run.

From a checkpoint, run A trains STEPS steps in one process; run B trains half of them, stops with
a checkpoint like a preempted job, and a fresh process resumes it for the rest. Exact resume holds
here if A and B end with the same model/EMA/optimizer digests and the same per-step losses.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint.manager import CheckpointManager
from .checkpoint.ref import resolve
from .errors import ExitCode, UserError
from .run_dir import RunDir


@dataclass
class ReplayResult:
    exact: bool
    summary: str


def environment_fingerprint() -> dict:
    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "CUDA": torch.version.cuda if cuda else f"not available (torch built for {torch.version.cuda})",
        "cuDNN": torch.backends.cudnn.version() if cuda else "-",
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine(),
        "torch threads": torch.get_num_threads(),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG", "(set by training when deterministic)"),
    }


def _train(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "yolo_resume", "train", "-q", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def _newest(run: Path):
    infos = CheckpointManager(RunDir(run).store()).list()
    return infos[-1] if infos else None


def replay_check(target: Path | None, steps: int, say) -> ReplayResult:
    infos = [i for i in resolve(target).infos(deep=True) if i.valid]
    if not infos:
        raise UserError(f"no valid checkpoint in `{target or 'the most recent run'}` to replay from")
    start = infos[-1]
    # A finished run has nothing left to train: replay into one extra epoch.
    extra = ["--epochs", str(int(start.get("epochs")) + 1)] if start.get("finished") else []
    half = max(steps // 2, 1)
    say(f"replaying {steps} steps from {start.path} (stop and resume after {half})")
    with tempfile.TemporaryDirectory(prefix="yolo-resume-doctor-") as tmp, start.ref.local() as local:
        tmp = Path(tmp)
        # The replays keep their checkpoints in their own temporary run folders (`ckpt.dir=`), never
        # in the run's checkpoint folder or bucket; a remote start point is a verified local copy.
        common = ["--resume-from", str(Path(local).resolve()), "--set", "ckpt.dir=", *extra]
        runs = [
            _train([*common, "--run-dir", str(tmp / "a"), "--stop-after-steps", str(steps)], tmp),
            _train([*common, "--run-dir", str(tmp / "b"), "--stop-after-steps", str(half)], tmp),
            _train(["--resume", "--run-dir", str(tmp / "b"), "--stop-after-steps", str(steps - half)], tmp),
        ]
        for proc in runs:
            if proc.returncode not in (ExitCode.OK, ExitCode.INTERRUPTED):
                raise UserError(f"a replay failed (exit {proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
        a, b = _newest(tmp / "a"), _newest(tmp / "b")
        if a is None or b is None:
            return ReplayResult(False, "a replay saved no checkpoint")
        same_digests = a.get("digests") == b.get("digests") and a.global_step == b.global_step
        same_losses = RunDir(tmp / "a").steps_file.read_text() == RunDir(tmp / "b").steps_file.read_text()
    if same_digests and same_losses:
        return ReplayResult(
            True,
            f"{a.global_step - start.global_step} steps straight and with a stop + resume "
            "in fresh processes agree bitwise (model, EMA, optimizer digests and per-step losses)",
        )
    what = [name for name, ok in (("tensor digests", same_digests), ("per-step losses", same_losses)) if not ok]
    return ReplayResult(
        False,
        f"{' and '.join(what)} differ between the straight and the resumed replay: "
        "exact resume does not hold on this machine/config (see README, limits)",
    )
