"""The `yolo-resume` command line: a thin noun-verb layer over the library.

User errors (bad config, missing data, corrupt checkpoint) print one line and exit 2; nothing here
holds training logic.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="YOLO training that resumes exactly.")
ckpt_app = typer.Typer(no_args_is_help=True, help="Inspect, verify and prune checkpoints.")
data_app = typer.Typer(no_args_is_help=True, help="Dataset tools.")
app.add_typer(ckpt_app, name="ckpt")
app.add_typer(data_app, name="data")

# Piped output (logs, CI, grep) gets a wide console instead of rich's 80-column default.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 400)


def user_errors(fn):
    """Turn a UserError into one red line on stderr and its exit code; no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            err.print(f"[red]error:[/red] {exc}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None

    return wrapper


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=True)


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
    resume_from: Path = typer.Option(None, "--resume-from", help="Continue from this checkpoint folder."),
    allow_drift: bool = typer.Option(False, "--allow-drift", help="Resume despite breaking config/data changes."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or per-epoch lines."),
):
    """Train a detector; with --resume, continue an interrupted run exactly where it stopped."""
    from .session import run_training

    try:
        code = run_training(
            config=config,
            run_dir=run_dir,
            overrides=set_,
            epochs=epochs,
            device=device,
            resume=resume or resume_from is not None,
            resume_from=resume_from,
            quiet=quiet,
            say=out.print,
            warn=warn,
            allow_drift=allow_drift,
        )
    except KeyboardInterrupt:
        # Second Ctrl-C: abort at once (click would turn this into "Aborted!" and exit 1).
        err.print("aborted. Resume from the newest checkpoint with: yolo-resume train --resume")
        raise typer.Exit(130) from None
    raise typer.Exit(code)


# -- ckpt ------------------------------------------------------------------------------------
@ckpt_app.command("list")
@user_errors
def ckpt_list(
    run: Path = typer.Argument(None, help="Run folder (default: the most recent run under runs/)."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON array."),
):
    """List a run's checkpoints with their epoch, step, size, mAP and status."""
    from .runs import resolve_checkpoint

    rows = [info.to_json() for info in resolve_checkpoint(run)]
    best = _best_name(rows)
    for row in rows:
        row["best"] = row["name"] == best
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table(title=f"checkpoints ({len(rows)})")
    for col in ("name", "epoch", "step", "kind", "size", "mAP@.5", "mAP@.5:.95", "git", "created", "status"):
        table.add_column(col)
    for row in rows:
        metrics = row["metrics"]
        table.add_row(
            row["name"] + (" *" if row["best"] else ""),
            str(row["epoch"]),
            str(row["global_step"]),
            str(row["kind"]),
            _human_bytes(row["size_bytes"]),
            _fmt(metrics.get("map50")),
            _fmt(metrics.get("map")),
            (row["git_commit"] or "-")[:8] + ("+" if row["git_dirty"] else ""),
            str(row["created"] or "-"),
            "valid" if row["valid"] else f"[red]invalid: {row['error']}[/red]",
        )
    out.print(table)
    out.print("[dim]* best by fitness; + uncommitted changes in the working tree[/dim]")


@ckpt_app.command("show")
@user_errors
def ckpt_show(
    ckpt: Path = typer.Argument(..., help="Checkpoint folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the metadata as JSON."),
):
    """Show a checkpoint's metadata, including the SHA-256 digests of its model, EMA and optimizer."""
    from .checkpoint.format import read_meta

    meta = read_meta(Path(ckpt))
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
def ckpt_verify(target: Path = typer.Argument(None, help="Run folder or checkpoint folder.")):
    """Verify sizes and SHA-256 of every file; exit 1 if any checkpoint is invalid."""
    from .checkpoint.manager import inspect
    from .runs import resolve_checkpoint

    infos = [inspect(i.path, deep=True) for i in resolve_checkpoint(target)]
    if not infos:
        raise UserError(f"no checkpoint found in `{target or 'the most recent run'}`")
    for info in infos:
        if info.valid:
            out.print(f"[green]ok[/green]      {info.path}")
        else:
            out.print(f"[red]invalid[/red] {info.path}: {info.error}", soft_wrap=True)
    raise typer.Exit(0 if all(i.valid for i in infos) else 1)


# -- data ------------------------------------------------------------------------------------
@data_app.command("synth")
@user_errors
def data_synth(
    out_dir: Path = typer.Argument(..., help="Output folder."),
    num_train: int = typer.Option(400, help="Training images."),
    num_val: int = typer.Option(100, help="Validation images."),
    num_classes: int = typer.Option(3, help="Shape classes (1-6)."),
    image_size: int = typer.Option(160, help="Image side in pixels."),
    seed: int = typer.Option(0, help="Generator seed."),
):
    """Write the synthetic shapes dataset (COCO format) to OUT_DIR."""
    from .config import Config, DataConfig, validate
    from .data import ensure_synthetic

    cfg = Config(
        data=DataConfig(
            format="synthetic",
            root=str(out_dir),
            num_train=num_train,
            num_val=num_val,
            num_classes=num_classes,
            image_size=image_size,
            seed=seed,
        )
    )
    validate(cfg)
    path = ensure_synthetic(cfg.data)
    out.print(f"synthetic dataset ready in {path} ({num_train} train, {num_val} val images)")


def _best_name(rows: list[dict]) -> str | None:
    scored = [r for r in rows if r["valid"] and r["metrics"].get("fitness") is not None]
    return max(scored, key=lambda r: (r["metrics"]["fitness"], r["global_step"]))["name"] if scored else None


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
