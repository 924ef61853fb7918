"""`yolo-resume data ...`: dataset tools."""

from __future__ import annotations

from pathlib import Path

import typer

from .cli_common import out, user_errors, warn
from .data.check import summary_table

data_app = typer.Typer(no_args_is_help=True, help="Dataset tools.")


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


@data_app.command("check")
@user_errors
def data_check(
    config: Path = typer.Argument(None, help="Training config YAML (default: the packaged demo)."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config key: KEY=VALUE (repeatable)."),
):
    """Check the dataset of CONFIG as training would before its first step: every image verified, every label
    parsed, a summary table; exit 2 when training would refuse it. The result is cached for training."""
    from .config import load_config
    from .data import check_dataset

    cfg = load_config(config, overrides)
    train, val = check_dataset(cfg.data)
    for line in train.report.warnings() + val.report.warnings():
        warn(line)
    out.print(summary_table([train.report, val.report]))
    out.print(
        f"dataset ok: {len(train.records)} train / {len(val.records)} val images (index cached in "
        f"{Path(train.report.cache_file).parent})"
    )
