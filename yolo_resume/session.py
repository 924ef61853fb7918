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
from .checkpoint.ref import CheckpointInfo, CheckpointRef, Target, resolve
from .checkpoint.store import is_remote
from .config import Config, apply_overrides, from_dict, from_stored, legacy_recipe, load_config, set_key
from .distributed import Distributed, is_collective_failure
from .drift import BREAKING, Drift, config_drift, environment_drift
from .errors import CheckpointError, ExitCode, UserError
from .files import atomic_write
from .hardware import check_world_size
from .lease import RunLease
from .model import load_model_definition
from .progress import finished_run_lines
from .provenance import utc_now
from .run_dir import RunDir, most_recent_run, new_run_dir
from .stopping import watch_parent
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
    auto_resume: bool = False  # --auto-resume: resume when the run has a checkpoint (decided under the lease)
    wait_for_lock: float | None = None  # --wait-for-lock SECONDS: wait for another writer of the run


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
    watch_parent()  # an attempt of --max-restarts stops when its supervisor dies
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
        session.release()
        dist.close()


def write_last_exit(run_dir: Path, code: int) -> None:
    """Rank 0's exit code, for the supervisor: torchrun reports any failing job as plain exit 1, which
    would hide a config error (2), a divergence (65) or a graceful stop (75)."""
    try:
        atomic_write(RunDir(run_dir).last_exit_file, json.dumps({"code": int(code), "time": utc_now()}) + "\n")
    except (OSError, UserError):
        pass  # a full disk must not replace the real error


class Session:
    """One process's part of a `train` command; `say`/`warn` print (nothing on ranks other than 0)."""

    def __init__(self, request: TrainRequest, dist: Distributed, say: Callable, warn: Callable[[str], None]):
        self.request, self.dist, self.say, self.warn = request, dist, say, warn
        self.lease: RunLease | None = None  # rank 0's hold on the run, from the plan to the end of training

    # -- the plan (rank 0) ------------------------------------------------------------------------
    def plan(self) -> Plan:
        """Rank 0's decisions: run folder, config, checkpoint to resume. The run's lease is taken first
        (one writer per run), so everything after it reads a run no other process is writing."""
        request = self.request
        resume = request.resume
        target = resolve(request.resume_from) if request.resume_from is not None else None
        if not resume:
            self._check_new_run_settings()  # a bad --config or --set: one line before any folder exists
        run_dir = self._run_folder(resume, target)
        self._take_lease(run_dir)
        RunDir(run_dir).check_files()  # a FIFO or a device in place of a run file: one line now, never a hang
        if not resume and RunDir(run_dir).has_checkpoints():
            if request.auto_resume:
                resume = True
            elif _torchrun_restarted(run_dir):
                self.say(f"torchrun restarted this job: resuming run {run_dir} from its newest valid checkpoint")
                resume = True
            else:
                _fresh_run_dir(run_dir, "", self.say)  # refuses: it got a checkpoint while we waited for it
        cfg, info = self._choose_config(run_dir, resume, target)
        stored = info.meta["config"] if info is not None else None
        # Read once, with the meaning it had when saved; a stored config that no longer loads fails here.
        stored_cfg = from_stored(stored, source=f"checkpoint {info.path}") if stored is not None else None
        if stored is not None and request.config:
            _keep_stored_recipe(cfg, Path(request.config), stored)
        _apply_cli_settings(cfg, list(request.overrides), request.epochs, request.device)
        if stored_cfg is not None:
            _keep_resolved_optimizer(cfg, stored_cfg)
            self._write_where_the_run_folder_says(cfg, run_dir)
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

    def _check_new_run_settings(self) -> None:
        request = self.request
        _apply_cli_settings(load_config(request.config), list(request.overrides), request.epochs, request.device)

    def _run_folder(self, resume: bool, target: Target | None) -> Path:
        """The run folder this command writes: --run-dir; for --resume-from, the run folder the checkpoint
        is in (never a folder named inside the checkpoint); for --resume, the most recent run."""
        request = self.request
        if not resume and request.run_dir is not None and (request.auto_resume or _torchrun_restarted(request.run_dir)):
            return request.run_dir  # resumed or started once the lease is held
        if not resume:
            stem = Path(request.config).stem if request.config else "demo"
            return _fresh_run_dir(request.run_dir, stem, self.say)
        if target is not None:
            return request.run_dir if request.run_dir is not None else _in_place_run_dir(request.resume_from)
        return request.run_dir or most_recent_run()

    def _take_lease(self, run_dir: Path) -> None:
        from .lease import Holder

        run = RunDir(run_dir)
        store = run.store(self._user_ckpt_config())
        lease = run.lease(Holder.me(), store)
        lease.acquire(self.request.wait_for_lock, say=self.say)
        self.lease = lease
        entries = store.entries()
        if entries:  # under the lease nobody else writes: what killed saves and deletions left is garbage
            store.sweep(list(entries)[-1])

    def release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def _user_ckpt_config(self):
        """The ckpt section the user's own command names (--config, --set ckpt.*), else None (the run
        folder decides)."""
        if not self._user_names_the_store():
            return None
        cfg = load_config(self.request.config)
        apply_overrides(cfg, [o for o in self.request.overrides if o.startswith("ckpt.")])
        return cfg.ckpt

    def _user_names_the_store(self) -> bool:
        overrides = self.request.overrides
        return self.request.config is not None or any(
            o.startswith(("ckpt.dir=", "ckpt.storage_options")) for o in overrides
        )

    def _write_where_the_run_folder_says(self, cfg: Config, run_dir: Path) -> None:
        """A resumed run writes its checkpoints where its run folder keeps them (or where the user's
        command says), never where the checkpoint's stored config says: a checkpoint copied from
        another run must not write into, rewind or prune that run."""
        if self._user_names_the_store():
            return
        location = RunDir(run_dir).saved_location() or ("", {})
        if (cfg.ckpt.dir, cfg.ckpt.storage_options) != (location[0], location[1]):
            stored = cfg.ckpt.dir or "its run's checkpoints folder"
            self.say(
                f"checkpoints go to {RunDir(run_dir).store(None).location} (the checkpoint's config said {stored})"
            )
        cfg.ckpt.dir, cfg.ckpt.storage_options = location[0], dict(location[1])

    def _choose_config(
        self, run_dir: Path, resume: bool, target: Target | None
    ) -> tuple[Config, CheckpointInfo | None]:
        """(config, checkpoint to resume or None). On resume the config is the run's own, unless the
        user hands in an edited one (then the drift table shows what changed)."""
        config = self.request.config
        if not resume:
            return load_config(config), None
        _, info = self._resume_point(run_dir, target)
        cfg = load_config(config) if config else from_stored(info.meta["config"], source=f"checkpoint {info.path}")
        self.say(
            f"resuming run [bold]{run_dir}[/bold] from {info.name} (epoch {info.get('epoch')}, "
            f"step {info.get('step_in_epoch')} of the epoch, global step {info.get('global_step')})"
        )
        return cfg, info

    def _resume_point(self, run_dir: Path, target: Target | None = None) -> tuple[Path, CheckpointInfo]:
        """(run folder, checkpoint to resume): the one --resume-from names, or the newest valid one of the run."""
        if target is not None:
            info = target.one().info(deep=True)
            if not info.valid:
                raise CheckpointError(info.error)
            where = "into --run-dir" if self.request.run_dir is not None else "in place, in its own run folder"
            self.say(f"continuing {info.path} {where} {run_dir}")
            return run_dir, info
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
        trainer = Trainer(cfg, run_dir, quiet=request.quiet, dist=self.dist, config_file=request.config)
        if info is not None:
            stored = from_dict(plan.stored)
            self.dist.decide(lambda: self._check_resume(trainer, info, stored))
            trainer.resume(info)
        else:
            self._start_fresh(trainer)
        if self.dist.is_main:
            RunDir(run_dir).write_config(cfg)
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
            if self.dist.is_main:  # last: the paths a user wants
                for line in finished_run_lines(run_dir, trainer.ckpt.list(), trainer.cfg.train.epochs):
                    self.say(escape(line), soft_wrap=True)  # a path is copied whole, never wrapped
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
    """Resuming a run of an older version with a config file: keys the file does not set keep the meaning
    they had for that run (config.legacy_recipe), instead of this version's new defaults."""
    try:
        named = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return  # load_config has already read this file; nothing more to learn from it
    for section, keys in legacy_recipe(stored).items():
        given = named.get(section) if isinstance(named, dict) else None
        for key, value in keys.items():
            if not isinstance(given, dict) or key not in given:
                setattr(getattr(cfg, section), key, value)


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


def plan_run_dir(config: Path | None, run_dir: Path | None, resume: bool, say, resume_from: str | None = None) -> Path:
    """The run folder a `train` command will use, decided before any worker starts (see launch.py)."""
    if resume:
        if run_dir is None and resume_from is not None:
            return _in_place_run_dir(resume_from)
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
    """--run-dir for a new run (refused when it holds checkpoints), else a new numbered `runs/<stem>`."""
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


def _in_place_run_dir(resume_from: str | Path) -> Path:
    """The run folder a local checkpoint lives in (`RUN/checkpoints/ckpt-N`, or `RUN/ckpt-N` of a run
    whose checkpoints live elsewhere). Anything else needs --run-dir: the user says where it continues."""
    if is_remote(resume_from):
        raise UserError(
            f"pass --run-dir: the run folder that continues {resume_from} (it is not in a local run folder)"
        )
    path = Path(resume_from).resolve()
    if path.parent.name == RunDir.CHECKPOINTS:
        return path.parent.parent
    if RunDir(path.parent).names_a_store():
        return path.parent
    raise UserError(
        f"pass --run-dir: {resume_from} is not inside a run folder (RUN/checkpoints/ckpt-N), "
        "so the run folder that continues it is yours to choose"
    )
