"""The `yolo-resume` command line: a thin noun-verb layer over the library.

User errors (bad config, missing data, corrupt checkpoint) print one line and exit 2; nothing here
holds training logic.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import NoReturn

import typer
from rich.markup import escape
from rich.table import Table

from . import __version__
from .cli_common import err, out, user_errors, warn
from .cli_data import data_app
from .cli_use import register as register_use_commands
from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="YOLO training that resumes exactly.")
ckpt_app = typer.Typer(no_args_is_help=True, help="Inspect, verify and prune checkpoints.")
app.add_typer(ckpt_app, name="ckpt")
app.add_typer(data_app, name="data")
register_use_commands(app)  # val, predict


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    if version:
        out.print(__version__)
        raise typer.Exit(0)


@app.command()
@user_errors
def train(
    config: Path = typer.Option(None, "--config", "-c", help="Config YAML (default: the packaged demo)."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Run folder (default: runs/<config stem>)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set train.epochs=3 (repeatable)."),
    epochs: int = typer.Option(None, "--epochs", help="Number of epochs (on resume: extend or shorten)."),
    device: str = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N."),
    resume: bool = typer.Option(False, "--resume", help="Continue the newest valid checkpoint of the run."),
    resume_from: str = typer.Option(
        None, "--resume-from", help="Continue from this checkpoint (a folder, or a URL such as s3://b/run/ckpt-N)."
    ),
    auto_resume: bool = typer.Option(
        False,
        "--auto-resume",
        help="Resume --run-dir if it has a checkpoint, else start it: one command for schedulers and pods.",
    ),
    allow_drift: bool = typer.Option(False, "--allow-drift", help="Resume despite breaking config/data changes."),
    tensorboard: bool = typer.Option(False, "--tensorboard", help="Also log scalars per step to <run>/tensorboard."),
    init_weights: Path = typer.Option(
        None, "--init-weights", help="Start a new run from these weights (checkpoint, .safetensors or .pt)."
    ),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle", help="Allow --init-weights to unpickle a .pt (can run code: trusted files only)."
    ),
    stop_after_steps: int = typer.Option(None, "--stop-after-steps", hidden=True, help="Used by `doctor`."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-epoch lines."),
    nproc: int = typer.Option(
        1, "--nproc", min=1, help="Processes on this machine (one per GPU): launches torchrun for you."
    ),
    max_restarts: int = typer.Option(
        0, "--max-restarts", min=0, help="After a crash or kill, resume automatically up to K times, with backoff."
    ),
    alert_cmd: str = typer.Option(
        None, "--alert-cmd", help="Shell command run on each failure, restart, give-up and completion (JSON on stdin)."
    ),
    alert_webhook: str = typer.Option(None, "--alert-webhook", help="URL that receives the same JSON by POST."),
    wait_for_lock: float = typer.Option(
        None,
        "--wait-for-lock",
        min=0,
        help="When another process is writing the run, wait up to SECONDS for it instead of exiting (code 2).",
    ),
):
    """Train a detector; with --resume, continue an interrupted run exactly where it stopped."""
    if auto_resume:
        if run_dir is None:
            raise UserError("--auto-resume needs --run-dir: the run folder to resume, or to start when it is empty")
    if nproc > 1 or max_restarts > 0 or alert_cmd or alert_webhook:
        from .launch import launch_supervised
        from .run_dir import RunDir

        if auto_resume:  # the attempts decide again, under the lease; this picks the first command
            resume = resume or RunDir(run_dir).has_checkpoints()
        raise typer.Exit(
            launch_supervised(
                sys.argv,
                config=config,
                run_dir=run_dir,
                resume=resume or resume_from is not None,
                resume_from=resume_from,
                nproc=nproc,
                max_restarts=max_restarts,
                alert_cmd=alert_cmd,
                alert_webhook=alert_webhook,
                say=out.print,
                warn=warn,
            )
        )
    from .errors import ExitCode
    from .session import TrainRequest, run_training

    request = TrainRequest(
        config=config,
        run_dir=run_dir,
        overrides=tuple(set_),
        epochs=epochs,
        device=device,
        resume=resume or resume_from is not None,
        resume_from=resume_from,
        quiet=quiet,
        allow_drift=allow_drift,
        stop_after_steps=stop_after_steps,
        tensorboard=tensorboard,
        init_weights=init_weights,
        trust_pickle=trust_pickle,
        auto_resume=auto_resume,
        wait_for_lock=wait_for_lock,
    )
    try:
        code = run_training(request, say=out.print, warn=warn)
    except KeyboardInterrupt:
        # Second Ctrl-C: abort at once (click would turn this into "Aborted!" and exit 1).
        err.print("aborted. Resume from the newest checkpoint with: yolo-resume train --resume")
        _exit_now(ExitCode.ABORTED)
    raise typer.Exit(code)


# -- ckpt ------------------------------------------------------------------------------------
@ckpt_app.command("list")
@user_errors
def ckpt_list(
    run: str = typer.Argument(None, help="Run folder or checkpoint URL prefix (default: the most recent run)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array."),
    fast: bool = typer.Option(False, "--fast", help="Check manifests and metadata only, do not hash tensors."),
):
    """List a run's checkpoints: epoch, step, kind, size, mAP, git commit, created, status, best, pinned."""
    from .checkpoint.ref import best_of, resolve

    infos = resolve(run).infos(deep=not fast)
    best = best_of(infos)
    rows = [info.to_json() | {"best": info.name in best} for info in infos]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"checkpoints ({len(rows)})")
    columns = ("name", "epoch", "step", "kind", "size", "mAP@.5", "mAP@.5:.95", "git", "segment", "created", "status")
    for col in columns:
        table.add_column(col, no_wrap=col != "status")
    for row in rows:
        metrics = row["metrics"]
        table.add_row(
            row["name"] + (" *" if row["best"] else "") + (" [pinned]" if row["pinned"] else ""),
            f"{row['epoch']}" + (f"+{row['step_in_epoch']}" if row["step_in_epoch"] else ""),
            str(row["global_step"]),
            str(row["kind"] or "-"),
            _human_bytes(row["size_bytes"]),
            _fmt(metrics.get("map50")),
            _fmt(metrics.get("map")),
            (row["git_commit"] or "-")[:8] + ("+" if row["git_dirty"] else ""),
            "-" if row["segment"] is None else str(row["segment"]),
            str(row["created"] or "-"),
            "valid" if row["valid"] else f"[red]corrupt: {escape(row['error'])}[/red]",
        )
    out.print(table)
    out.print("[dim]epoch E+S: S batches into epoch E+1; * best by fitness; + uncommitted changes in the tree[/dim]")


@ckpt_app.command("prune")
@user_errors
def ckpt_prune(
    run: str = typer.Argument(None, help="Run folder or checkpoint URL prefix (default: the most recent run)."),
    keep_last: int = typer.Option(None, "--keep-last", min=0, help="Keep the newest N (default: the run's own)."),
    keep_best: int = typer.Option(None, "--keep-best", min=0, help="Keep the K best by fitness (default: the run's)."),
    keep_every: int = typer.Option(
        None, "--keep-every", min=0, help="Keep epoch-end checkpoints every E epochs (default: the run's)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only print what would be deleted."),
):
    """Delete checkpoints no policy keeps; pinned ones and the newest valid one always stay. Without flags,
    the run's own retention settings (ckpt.keep_last / keep_best / keep_every of its config) apply."""
    from .checkpoint.manager import CheckpointManager
    from .checkpoint.ref import resolve
    from .lease import Holder, RunLease
    from .run_dir import RunDir, most_recent_run

    target = resolve(run)
    if target.name is not None:
        raise UserError(f"`{run}` is one checkpoint; `ckpt prune` takes a run folder or a checkpoint URL prefix")
    manager = CheckpointManager(target.store)
    policy, source = _run_retention(run, manager)
    given = {"keep_last": keep_last, "keep_best": keep_best, "keep_every": keep_every}
    policy |= {key: value for key, value in given.items() if value is not None}
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items() if v is not None)
    settings = ", ".join(f"{k}={v}" for k, v in policy.items())
    out.print(f"retention: {settings} ({source}{'; overridden by ' + flags if flags else ''})", soft_wrap=True)
    doomed = manager.prune(dry_run=True, **policy)
    freed = sum(info.size_bytes() for info in doomed)
    verb = "would delete" if dry_run else "deleting"
    for info in doomed:
        out.print(f"{verb} {info.path} ({_human_bytes(info.size_bytes())})")
    if not dry_run:
        # Deleting is writing: never while a training writes the run (one writer per run).
        folder = RunDir(run if run is not None else most_recent_run()) if not is_remote_arg(run) else None
        if folder is not None and folder.default_checkpoints != Path(str(target.store.location)):
            folder = None if not folder.names_a_store() else folder  # `run` named a bare checkpoints folder
        lease = (
            folder.lease(Holder.me(), target.store)
            if folder is not None
            else RunLease(str(target.store.location), [target.store.lease(Holder.me())])
        )
        with lease:
            lease.acquire()
            manager.prune(**policy)
            entries = target.store.entries()
            if entries:
                target.store.sweep(list(entries)[-1])
    out.print(f"{len(doomed)} checkpoint(s), {_human_bytes(freed)} {'would be ' if dry_run else ''}freed")


def is_remote_arg(arg: str | None) -> bool:
    from .checkpoint.store import is_remote

    return arg is not None and is_remote(arg)


def _run_retention(run: str | None, manager) -> tuple[dict[str, int], str]:
    """The retention settings of the run itself, and where they were read: its config.yaml, else the
    config stored in its newest checkpoint (a URL prefix has no run folder), else the defaults (said so)."""
    from .config import CkptConfig
    from .run_dir import RunDir, most_recent_run

    def settings(ckpt) -> dict[str, int]:
        return {"keep_last": ckpt.keep_last, "keep_best": ckpt.keep_best, "keep_every": ckpt.keep_every}

    if not is_remote_arg(run):
        folder = RunDir(run if run is not None else most_recent_run())
        saved = folder.saved_ckpt_config() if folder.path.is_dir() else None
        if saved is not None:
            return settings(saved), f"the run's own settings, from {folder.config_file}"
    for info in reversed(manager.list()):
        stored = ((info.meta or {}).get("config") or {}).get("ckpt") or {}
        if info.valid and all(isinstance(stored.get(k), int) for k in ("keep_last", "keep_best", "keep_every")):
            picked = {k: int(stored[k]) for k in ("keep_last", "keep_best", "keep_every")}
            return picked, f"the run's own settings, from the config stored in {info.name}"
    return settings(CkptConfig()), "no config of this run was found: the defaults"


@ckpt_app.command("pin")
@user_errors
def ckpt_pin(ckpt: str = typer.Argument(..., help="Checkpoint folder, RUN/ckpt-N of a remote run, or URL.")):
    """Protect a checkpoint from pruning."""
    _set_pin(ckpt, True)


@ckpt_app.command("unpin")
@user_errors
def ckpt_unpin(ckpt: str = typer.Argument(..., help="Checkpoint folder, RUN/ckpt-N of a remote run, or URL.")):
    """Let retention prune a checkpoint again."""
    _set_pin(ckpt, False)


def _set_pin(ckpt: str, pinned: bool) -> None:
    from .checkpoint.ref import resolve

    ref = resolve(ckpt).one()
    ref.pin(pinned)
    out.print(f"{'pinned' if pinned else 'unpinned'} {ref.where}")


@ckpt_app.command("diff")
@user_errors
def ckpt_diff(
    a: str = typer.Argument(..., help="First checkpoint folder (or URL, or RUN/ckpt-N of a remote run)."),
    b: str = typer.Argument(..., help="Second checkpoint folder (or URL, or RUN/ckpt-N of a remote run)."),
    top: int = typer.Option(15, "--top", help="Show at most this many differing tensors."),
):
    """Config and metadata differences, and which tensors differ and by how much."""
    from .checkpoint.diff import diff_checkpoints
    from .checkpoint.ref import resolve

    with resolve(a).one().local() as local_a, resolve(b).one().local() as local_b:
        report = diff_checkpoints(local_a, local_b)
    if report.metadata:
        table = Table(title="metadata and config")
        for col in ("what", str(a), str(b)):
            table.add_column(col)
        for what, va, vb in report.metadata:
            table.add_row(what, str(va), str(vb))
        out.print(table)
    else:
        out.print("metadata and config: identical")
    out.print(
        f"tensors: {report.equal} equal, {len(report.tensors)} differ, "
        f"{len(report.only_a)} only in A, {len(report.only_b)} only in B"
    )
    if report.tensors:
        table = Table(title=f"differing tensors (largest {min(top, len(report.tensors))})")
        for col in ("tensor", "shape", "elements differing", "max |a-b|", "mean |a-b|"):
            table.add_column(col)
        for t in report.tensors[:top]:
            table.add_row(
                t.name, str(t.shape), f"{t.n_diff} ({t.frac_diff:.1%})", f"{t.max_abs:.3g}", f"{t.mean_abs:.3g}"
            )
        out.print(table)


@ckpt_app.command("export")
@user_errors
def ckpt_export(
    ckpt: str = typer.Argument(..., help="Checkpoint folder (or URL, or RUN/ckpt-N of a remote run)."),
    fmt: str = typer.Option("ultralytics", "--format", "-f", help="ultralytics (.pt), safetensors or onnx."),
    output: Path = typer.Option(..., "--output", "-o", help="Output file (or folder)."),
    weights: str = typer.Option("ema", "--weights", help="ema (default) or model."),
):
    """Export weights for deployment: an ultralytics .pt that YOLO(...) loads, safetensors, or ONNX."""
    from .checkpoint.ref import resolve
    from .interop import export_checkpoint

    with resolve(ckpt).one().local() as local:
        path = export_checkpoint(local, fmt, Path(output), weights=weights)
    out.print(f"exported {ckpt} ({weights} weights) to {path}")


@ckpt_app.command("show")
@user_errors
def ckpt_show(
    ckpt: str = typer.Argument(..., help="Checkpoint folder (or URL, or RUN/ckpt-N of a remote run)."),
    as_json: bool = typer.Option(False, "--json", help="Print the metadata as JSON."),
):
    """Show a checkpoint's metadata, including the SHA-256 digests of its model, EMA and optimizer."""
    from .checkpoint.ref import resolve
    from .errors import CheckpointError

    info = resolve(ckpt).one().info()
    if not info.valid:
        raise CheckpointError(info.error)
    meta = info.meta
    if as_json:
        print(json.dumps(meta, indent=2))
        return
    table = Table(title=str(ckpt), show_header=False)
    for key in (
        "name",
        "kind",
        "reason",
        "epoch",
        "step_in_epoch",
        "global_step",
        "epochs",
        "finished",
        "metrics",
        "best_fitness",
        "lr",
        "git",
        "versions",
        "device",
        "threads",
        "host",
        "created",
        "config_hash",
        "dataset_fingerprint",
        "digests",
    ):
        value = meta.get(key)
        table.add_row(key, json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    out.print(table)


@ckpt_app.command("verify")
@user_errors
def ckpt_verify(target: str = typer.Argument(None, help="Run folder, checkpoint folder, or URL.")):
    """Verify sizes and SHA-256 of every file; exit 1 if any checkpoint is invalid."""
    from .checkpoint.ref import resolve

    infos = resolve(target).infos(deep=True)  # remote checkpoints: downloaded and verified
    if not infos:
        raise UserError(f"no checkpoint found in `{target or 'the most recent run'}`")
    for info in infos:
        if info.valid:
            out.print(f"[green]ok[/green]      {info.path}")
        else:
            out.print(f"[red]invalid[/red] {info.path}: {escape(info.error)}", soft_wrap=True)
    raise typer.Exit(0 if all(i.valid for i in infos) else 1)


@app.command()
@user_errors
def plot(run: Path = typer.Argument(None, help="Run folder (default: the most recent run under runs/).")):
    """Redraw <run>/results.png from results.csv (losses, mAP, LR per epoch; resume points marked)."""
    from .plots import plot_results
    from .run_dir import RunDir, most_recent_run

    results = RunDir(run or most_recent_run()).results_file
    if not results.is_file():
        raise UserError(f"`{results}` not found: the run has not finished an epoch yet")
    out.print(f"wrote {plot_results(results)}")


@app.command()
@user_errors
def doctor(
    target: Path = typer.Argument(None, help="Run or checkpoint folder (default: the most recent run)."),
    steps: int = typer.Option(4, "--steps", min=2, help="Steps to replay from the checkpoint."),
):
    """Prove exact resume on this machine: replay STEPS steps from a checkpoint in one process, and again
    with a stop and a resume in fresh processes halfway; both must end bitwise identical."""
    from .doctor import environment_fingerprint, replay_check

    table = Table(title="environment", show_header=False)
    for key, value in environment_fingerprint().items():
        table.add_row(key, str(value))
    out.print(table)
    result = replay_check(target, steps, say=out.print)
    if result.exact:
        out.print(f"[green]PASS[/green]: {result.summary}")
        raise typer.Exit(0)
    out.print(f"[red]FAIL[/red]: {result.summary}")
    raise typer.Exit(1)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _exit_now(code: int) -> NoReturn:
    """Exit without interpreter finalization. A second Ctrl-C lands wherever the loop is, possibly while
    native threads (torch, data-loader teardown, a save in flight) are mid-call; finalizing Python under
    them can abort with SIGABRT ("terminate called without an active exception") instead of `code`.
    Nothing saved is lost: commits are atomic, and a half-written save is swept on the next start."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(code))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
