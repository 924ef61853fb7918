"""`train --nproc / --max-restarts / --alert-*`: build the worker commands, then hand them to the supervisor.

The parent process trains nothing. It fixes the run folder up front (so every restart, and every rank,
works on the same run), turns its own command line into the command of one training attempt (plain,
or under torchrun for --nproc N), and lets `supervisor.supervise` run, watch and restart it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from . import USER_OMP_NUM_THREADS

# Options the launcher consumes; workers never see them (so a worker never launches again).
LAUNCHER_OPTIONS = ("--nproc", "--max-restarts", "--alert-cmd", "--alert-webhook")
# --auto-resume stays on every attempt: each one decides, under the run's lease, whether there is a checkpoint.
LAUNCHER_FLAGS: tuple[str, ...] = ()
# Options that only make sense for the first attempt: a restart continues the run's own checkpoint.
FIRST_ATTEMPT_OPTIONS = ("--init-weights", "--resume-from")
FIRST_ATTEMPT_FLAGS = ("--trust-pickle",)


def train_arguments(argv: list[str]) -> list[str]:
    """The arguments after `train` in a full command line (`yolo-resume train ...`)."""
    return list(argv[argv.index("train") + 1 :]) if "train" in argv else list(argv[1:])


def drop_options(args: list[str], options: tuple[str, ...], flags: tuple[str, ...] = ()) -> list[str]:
    """`args` without `options` (with their value, as `--opt value` or `--opt=value`) and `flags`."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif arg in flags or any(arg.startswith(f"{opt}=") for opt in options):
            continue
        else:
            kept.append(arg)
    return kept


def worker_prefix(nproc: int) -> list[str]:
    """How to start one attempt: this interpreter, or torchrun with `nproc` local workers."""
    if nproc <= 1:
        return [sys.executable, "-m", "yolo_resume", "train"]
    # --standalone: a private rendezvous on a free local port, so parallel jobs never collide.
    # torchrun's own restarts stay off (--max-restarts 0): the supervisor restarts the whole job, with
    # backoff and alerts, exactly as it does for a single process.
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        "0",
        # Forward SLURM's SIGUSR1 too, and give the ranks time to finish a step and save before SIGKILL.
        "--signals-to-handle",
        "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "--shutdown-timeout",
        "300",
        "-m",
        "yolo_resume",
        "train",
    ]


def attempt_commands(argv: list[str], run_dir: Path, nproc: int) -> tuple[list[str], list[str]]:
    """(first attempt, resuming attempt) for the command line `argv`, both pinned to `run_dir`."""
    args = drop_options(train_arguments(argv), LAUNCHER_OPTIONS + ("--run-dir",), LAUNCHER_FLAGS)
    prefix = worker_prefix(nproc) + ["--run-dir", str(run_dir)]
    resume_args = drop_options(args, FIRST_ATTEMPT_OPTIONS, FIRST_ATTEMPT_FLAGS)
    if "--resume" not in resume_args:
        resume_args.append("--resume")
    return prefix + args, prefix + resume_args


def launch_supervised(
    argv: list[str],
    *,
    config: Path | None,
    run_dir: Path | None,
    resume: bool,
    resume_from: str | None = None,
    nproc: int,
    max_restarts: int,
    alert_cmd: str | None,
    alert_webhook: str | None,
    say: Callable,
    warn: Callable[[str], None],
) -> int:
    from .session import plan_run_dir
    from .supervisor import supervise

    run_dir = plan_run_dir(config, run_dir, resume, say, resume_from)
    if nproc > 1 and USER_OMP_NUM_THREADS is None:
        # N processes of one thread per core each would oversubscribe the CPU (and torchrun keeps an
        # inherited OMP_NUM_THREADS): share the cores out, as torchrun does when nothing is set.
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    first, resume_cmd = attempt_commands(argv, run_dir, nproc)
    explicit = any(a in ("--resume", "--resume-from") or a.startswith("--resume-from=") for a in argv)
    if resume and not explicit:
        first = resume_cmd  # --auto-resume found a checkpoint
    return supervise(
        first_cmd=first,
        resume_cmd=resume_cmd,  # restarts continue the newest valid checkpoint, whatever the first attempt was
        run_dir=run_dir,
        max_restarts=max_restarts,
        alert_cmd=alert_cmd,
        alert_webhook=alert_webhook,
        say=say,
        warn=warn,
    )
