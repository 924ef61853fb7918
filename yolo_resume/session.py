"""One `train` invocation: pick the run and config (fresh or resumed), then hand over to the Trainer."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from rich.markup import escape
from rich.table import Table

from .checkpoint.manager import CheckpointManager
from .checkpoint.ref import CheckpointInfo, CheckpointRef, resolve
from .config import Config, apply_overrides, from_dict, from_stored, legacy_recipe, load_config, set_key
from .distributed import Distributed, is_collective_failure
from .drift import BREAKING, Drift, config_drift, environment_drift
from .errors import CheckpointError, ExitCode, UserError
from .hardware import check_world_size
from .model import load_model_definition
from .provenance import utc_now
from .run_dir import RunDir, most_recent_run, new_run_dir
from .trainer import Trainer


@dataclass(frozen=True)
class TrainRequest:
    """What `yolo-resume train` was asked to do (the CLI's options, as given)."""

    config: Path | None = None
    run_dir: Path | None = None
    overrides: tuple[str, ...] = ()  # --set KEY=VALUE
    epochs: int | None = None
    device: str | None = None
    resume: bool = False  # --resume, or --resume-from given
    resume_from: str | Path | None = None  # a checkpoint folder or URL
    quiet: bool = False
    allow_drift: bool = False
    stop_after_steps: int | None = None  # `doctor`
    tensorboard: bool = False
    init_weights: Path | None = None
    trust_pickle: bool = False


@dataclass
class Plan:
    """Rank 0's decisions, sent to the other ranks as JSON: the run folder, its config, what to resume."""

    run_dir: Path
    config: dict  # the config to train with (Config.to_dict)
    stored: dict | None  # the config the checkpoint was saved with, on resume
    checkpoint: dict | None  # the checkpoint to resume (CheckpointRef.to_json), or None for a fresh start
    complete: bool  # the checkpoint already finished every epoch: nothing to train

    def to_json(self) -> dict:
        return asdict(self) | {"run_dir": str(self.run_dir)}

    @classmethod
    def from_json(cls, data: dict) -> Plan:
        return cls(**(data | {"run_dir": Path(data["run_dir"])}))


def run_training(request: TrainRequest, say: Callable, warn: Callable[[str], None]) -> int:
    """Train in this process: alone, or as one rank of a torchrun job (which rank 0 speaks for)."""
    if request.resume and request.init_weights is not None:
        raise UserError("--init-weights starts a new run; a resumed run continues from its own checkpoint")
    dist = Distributed.from_env()
    session = Session(request, dist, say, warn) if dist.is_main else Session(request, dist, _silent, _silent)
    plan, code = None, ExitCode.FAILED
    try:
        plan = Plan.from_json(dist.decide(lambda: session.plan().to_json()))
        code = ExitCode.OK if plan.complete else session.train(plan)
        return code
    except UserError as exc:
        code = exc.exit_code
        raise
    except KeyboardInterrupt:
        code = ExitCode.ABORTED
        raise
    except Exception as exc:
        if dist.enabled and is_collective_failure(exc):
            hint = f"Resume with: yolo-resume train --resume --run-dir {plan.run_dir}" if plan else ""
            failure = dist.collective_failure(exc, hint)
            code = failure.exit_code
            raise failure from None
        raise
    finally:
        if dist.enabled and dist.is_main and plan:
            write_last_exit(plan.run_dir, code)
        dist.close()


def write_last_exit(run_dir: Path, code: int) -> None:
    """Rank 0's exit code, for the supervisor: torchrun reports any failing job as plain exit 1, which
    would hide a config error (2), a divergence (65) or a graceful stop (75)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        RunDir(run_dir).last_exit_file.write_text(json.dumps({"code": int(code), "time": utc_now()}) + "\n")
    except OSError:
        pass  # a full disk must not replace the real error


class Session:
    """One process's part of a `train` command; `say`/`warn` print (nothing on ranks other than 0)."""

    def __init__(self, request: TrainRequest, dist: Distributed, say: Callable, warn: Callable[[str], None]):
        self.request, self.dist, self.say, self.warn = request, dist, say, warn

    # -- the plan (rank 0) ------------------------------------------------------------------------
    def plan(self) -> Plan:
        """Rank 0's decisions: run folder, config, checkpoint to resume."""
        request = self.request
        resume = request.resume
        if not resume and _torchrun_restarted(request.run_dir):
            self.say(f"torchrun restarted this job: resuming run {request.run_dir} from its newest valid checkpoint")
            resume = True
        run_dir, cfg, info = self._choose_run(resume)
        stored = info.meta["config"] if info is not None else None
        # Read once, with the meaning it had when saved; a stored config that no longer loads fails here.
        stored_cfg = from_stored(stored, source=f"checkpoint {info.path}") if stored is not None else None
        if stored is not None and request.config:
            _keep_stored_recipe(cfg, Path(request.config), stored)
        _apply_cli_settings(cfg, list(request.overrides), request.epochs, request.device)
        if stored_cfg is not None:
            _keep_resolved_optimizer(cfg, stored_cfg)
        check_world_size(cfg, self.dist.world_size)
        load_model_definition(cfg.model.cfg)  # a bad or unsafe model YAML fails here, before any training
        complete = info is not None and _is_complete(info, cfg)
        if complete:
            self.say(
                f"run {run_dir} is complete ({info.get('epoch')} of {cfg.train.epochs} epochs); "
                "pass --epochs N with a larger N to train further"
            )
        return Plan(
            run_dir=Path(run_dir),
            config=cfg.to_dict(),
            stored=stored_cfg.to_dict() if stored_cfg is not None else None,
            checkpoint=info.ref.to_json() if info is not None else None,
            complete=complete,
        )

    def _choose_run(self, resume: bool) -> tuple[Path, Config, CheckpointInfo | None]:
        """(run folder, config, checkpoint to resume or None). On resume the config is the run's own,
        unless the user hands in an edited one (then the drift table shows what changed)."""
        config, run_dir = self.request.config, self.request.run_dir
        if not resume:
            stem = Path(config).stem if config else "demo"
            return _fresh_run_dir(run_dir, stem, self.say), load_config(config), None
        run_dir, info = self._resume_point(run_dir)
        cfg = load_config(config) if config else from_stored(info.meta["config"], source=f"checkpoint {info.path}")
        self.say(
            f"resuming run [bold]{run_dir}[/bold] from {info.name} (epoch {info.get('epoch')}, "
            f"step {info.get('step_in_epoch')} of the epoch, global step {info.get('global_step')})"
        )
        return run_dir, cfg, info

    def _resume_point(self, run_dir: Path | None) -> tuple[Path, CheckpointInfo]:
        """(run folder, checkpoint) to resume: the one --resume-from names, or the newest valid one of the run."""
        resume_from = self.request.resume_from
        if resume_from is not None:
            info = resolve(resume_from).one().info(deep=True)
            if not info.valid:
                raise CheckpointError(info.error)
            return run_dir or _run_dir_of(info, resume_from), info
        run_dir = run_dir or most_recent_run()
        manager = CheckpointManager(RunDir(run_dir).store())
        if not manager.list():
            raise UserError(
                f"nothing to resume: `{manager.directory}` holds no checkpoint yet; start the run without --resume"
            )
        info = manager.latest_valid(
            on_invalid=lambda bad: self.warn(
                f"skipping checkpoint {bad.path}: {bad.error}; falling back to an older one"
            )
        )
        if info is None:
            raise CheckpointError(
                f"no valid checkpoint in `{manager.directory}` (all failed verification; see `yolo-resume ckpt verify`)"
            )
        return run_dir, info

    # -- training (every rank) --------------------------------------------------------------------
    def train(self, plan: Plan) -> int:
        request, run_dir, cfg = self.request, plan.run_dir, from_dict(plan.config)
        info = CheckpointRef.from_json(plan.checkpoint).info() if plan.checkpoint else None
        trainer = Trainer(cfg, run_dir, quiet=request.quiet, dist=self.dist)
        if info is not None:
            stored = from_dict(plan.stored)
            self.dist.decide(lambda: self._check_resume(trainer, info, stored))
            trainer.resume(info)
        else:
            self._start_fresh(trainer)
        if self.dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            RunDir(run_dir).config_file.write_text(cfg.to_yaml())
        trainer.stop_after_steps = request.stop_after_steps
        if request.tensorboard:
            trainer.log.enable_tensorboard(trainer.state.global_step)

        code = _fit_and_log_the_end(trainer, info.name if info else None)
        if code == ExitCode.INTERRUPTED:
            self.say(
                f"stopped by {trainer.stop_signal} after global step {trainer.state.global_step}; checkpoint saved. "
                f"Resume with: yolo-resume train --resume --run-dir {run_dir}"
            )
        else:
            self.say(f"done: results in {run_dir}/results.csv, checkpoints in {trainer.ckpt.directory}")
        return code

    def _check_resume(self, trainer: Trainer, info: CheckpointInfo, stored: Config) -> None:
        drifts = config_drift(stored.to_dict(), trainer.cfg.to_dict())
        drifts += environment_drift(info.meta, trainer.environment())
        self._check_drift(drifts)
        if trainer.cfg.train.epochs != info.get("epochs"):
            self.say(
                f"re-planning the LR schedule for {trainer.cfg.train.epochs} epochs (was {info.get('epochs')}) "
                f"from global step {info.get('global_step')}"
            )

    def _check_drift(self, drifts: list[Drift]) -> None:
        if not drifts:
            return
        table = Table(title="differences from the checkpoint")
        for column in ("what", "checkpoint", "now", "class", "note"):
            table.add_column(column)
        colors = {"harmless": "green", "schedule": "yellow", "breaking": "red"}
        for d in drifts:
            table.add_row(
                escape(d.what),
                escape(str(d.stored)),
                escape(str(d.current)),
                f"[{colors[d.kind]}]{d.kind}[/]",
                escape(d.note),
            )
        self.say(table)
        breaking = [d.what for d in drifts if d.kind == BREAKING]
        if breaking and not self.request.allow_drift:
            raise UserError(
                f"refusing to resume: breaking changes to {', '.join(breaking)}; revert them, "
                "or pass --allow-drift to resume anyway"
            )
        if breaking:
            self.warn(f"resuming despite breaking changes to {', '.join(breaking)} (--allow-drift)")

    def _start_fresh(self, trainer: Trainer) -> None:
        init_weights = self.request.init_weights
        if init_weights is not None:
            transferred, total = trainer.init_weights(init_weights, self.request.trust_pickle)
            self.say(f"initialised {transferred} of {total} tensors from {init_weights}")
        self.say(
            f"training {trainer.cfg.model.cfg} on {trainer.cfg.data.format} data ({len(trainer.train_ds)} train / "
            f"{len(trainer.val_ds)} val images) on {trainer.device}; run folder [bold]{trainer.run_dir}[/bold]"
        )
        if trainer.auto_optimizer:
            t = trainer.cfg.train
            self.say(
                f"optimizer auto: {t.optimizer} (lr0 {t.lr0:g}, momentum {t.momentum:g}), chosen as ultralytics does"
            )


def _fit_and_log_the_end(trainer: Trainer, resumed_from: str | None) -> int:
    """Train, recording in segments.jsonl that this process started and how it ended (see lineage.py)."""
    trainer.log.on_start(trainer.state.segment, resumed_from)
    try:
        code = trainer.fit()
    except KeyboardInterrupt:
        trainer.log.on_end("aborted by a second Ctrl-C")
        raise
    except Exception as exc:
        trainer.log.on_end(f"crashed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        raise
    trainer.log.on_end("completed" if code == ExitCode.OK else f"stopped by {trainer.stop_signal}")
    return code


def _keep_stored_recipe(cfg: Config, config: Path, stored: dict) -> None:
    """Resuming a run of an older version with a config file: train keys the file does not set keep the
    meaning they had for that run (config.legacy_recipe), instead of this version's new defaults."""
    try:
        named = (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("train") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return  # load_config has already read this file; nothing more to learn from it
    for key, value in legacy_recipe(stored.get("train") or {}).items():
        if key not in named:
            setattr(cfg.train, key, value)


def _keep_resolved_optimizer(cfg: Config, stored: Config) -> None:
    """A resume with a config that says `optimizer: auto` keeps what auto chose when the run started."""
    if cfg.train.optimizer == "auto" and stored.train.optimizer != "auto":
        for key in ("optimizer", "lr0", "momentum", "warmup_bias_lr"):
            setattr(cfg.train, key, getattr(stored.train, key))


def _torchrun_restarted(run_dir: Path | None) -> bool:
    """torchrun --max-restarts started this process again after a failure, and there is a run to resume."""
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    return restarts > 0 and run_dir is not None and RunDir(run_dir).has_checkpoints()


def _silent(*_args, **_kwargs) -> None:
    """What ranks other than 0 say: nothing (rank 0 speaks for the job)."""


def plan_run_dir(config: Path | None, run_dir: Path | None, resume: bool, say) -> Path:
    """The run folder a `train` command will use, decided before any worker starts (see launch.py)."""
    if resume:
        return run_dir or most_recent_run()
    return _fresh_run_dir(run_dir, Path(config).stem if config else "demo", say)


def _apply_cli_settings(cfg: Config, overrides: list[str], epochs: int | None, device: str | None) -> None:
    apply_overrides(cfg, overrides)
    if epochs is not None:
        set_key(cfg, "train.epochs", epochs)
    if device is not None:
        set_key(cfg, "train.device", device)
    apply_overrides(cfg, [])  # re-validate after the CLI shortcuts


def _is_complete(info, cfg: Config) -> bool:
    return int(info.get("epoch", 0)) >= cfg.train.epochs and int(info.get("step_in_epoch", 0)) == 0


def _fresh_run_dir(run_dir: Path | None, stem: str, say) -> Path:
    if run_dir is not None:
        if RunDir(run_dir).has_checkpoints():
            raise UserError(
                f"run folder `{run_dir}` already holds checkpoints; continue it with --resume "
                "or choose another --run-dir"
            )
        return run_dir
    chosen, unfinished = new_run_dir(stem)
    if unfinished is not None:
        say(
            f"note: {unfinished} holds an unfinished run; "
            f"`yolo-resume train --resume --run-dir {unfinished}` continues it. Starting a new run instead."
        )
    return chosen


def _run_dir_of(info: CheckpointInfo, resume_from: str | Path) -> Path:
    """Where a checkpoint given by --resume-from without --run-dir continues: the run folder it was saved in
    when that is on this machine, else the run folder holding its `checkpoints` folder."""
    stored = Path(info.get("run_dir") or "")
    if stored.is_dir():
        return stored
    if not isinstance(info.path, Path):  # a URL: no local folder it lives in
        raise UserError(f"pass --run-dir: the run folder of {resume_from} ({stored}) is not on this machine")
    return Path(resume_from).resolve().parent.parent
