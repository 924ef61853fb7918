"""One `train` invocation: pick the run and config (fresh or resumed), then hand over to the Trainer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import apply_overrides, from_dict, load_config, set_key
from .errors import UserError
from .runs import CONFIG_FILE, find_resume_point, has_checkpoints, new_run_dir
from .trainer import EXIT_INTERRUPTED, Trainer


def run_training(
    config: Path | None,
    run_dir: Path | None,
    overrides: list[str],
    epochs: int | None,
    device: str | None,
    resume: bool,
    resume_from: Path | None,
    quiet: bool,
    say: Callable[[str], None],
    warn: Callable[[str], None],
) -> int:
    if resume:
        run_dir, info = find_resume_point(run_dir, resume_from, warn)
        cfg = from_dict(info.meta["config"], source=f"checkpoint {info.path}")
        say(
            f"resuming run [bold]{run_dir}[/bold] from {info.name} "
            f"(epoch {info.get('epoch')}, step {info.get('step_in_epoch')} of the epoch, "
            f"global step {info.get('global_step')})"
        )
        if config is not None:
            warn("--config is ignored on resume: the run's config is taken from its checkpoint")
    else:
        cfg = load_config(config)
        run_dir = _fresh_run_dir(run_dir, Path(config).stem if config else "demo", say)
    apply_overrides(cfg, overrides)
    if epochs is not None:
        set_key(cfg, "train.epochs", epochs)
    if device is not None:
        set_key(cfg, "train.device", device)
    apply_overrides(cfg, [])  # re-validate after the CLI shortcuts

    if resume:
        done = int(info.get("epoch", 0)) >= cfg.train.epochs and int(info.get("step_in_epoch", 0)) == 0
        if done:
            say(
                f"run {run_dir} is complete ({info.get('epoch')} of {cfg.train.epochs} epochs); "
                "pass --epochs N with a larger N to train further"
            )
            return 0
        if epochs is not None and epochs != info.get("epochs"):
            say(
                f"re-planning the LR schedule for {epochs} epochs (was {info.get('epochs')}) "
                f"from global step {info.get('global_step')}"
            )

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(cfg.to_yaml())
    trainer = Trainer(cfg, run_dir, quiet=quiet)
    if resume:
        trainer.resume(info)
    else:
        say(
            f"training {cfg.model.cfg} on {cfg.data.format} data ({len(trainer.train_ds)} train / "
            f"{len(trainer.val_ds)} val images) on {trainer.device}; run folder [bold]{run_dir}[/bold]"
        )
    code = trainer.fit()
    if code == EXIT_INTERRUPTED:
        say(
            f"stopped by {trainer.stop_signal} after global step {trainer.state.global_step}; checkpoint saved. "
            f"Resume with: yolo-resume train --resume --run-dir {run_dir}"
        )
    else:
        say(f"done: results in {run_dir}/results.csv, checkpoints in {trainer.ckpt.directory}")
    return code


def _fresh_run_dir(run_dir: Path | None, stem: str, say) -> Path:
    if run_dir is not None:
        if has_checkpoints(run_dir):
            raise UserError(
                f"run folder `{run_dir}` already holds checkpoints; continue it with --resume "
                "or choose another --run-dir"
            )
        return run_dir
    chosen, unfinished = new_run_dir(stem)
    if unfinished is not None:
        say(
            f"note: {unfinished} holds an unfinished run; `yolo-resume train --resume --run-dir {unfinished}` "
            "continues it. Starting a new run instead."
        )
    return chosen
