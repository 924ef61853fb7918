"""The training loop: short and linear. Everything stateful has state_dict()/load_state_dict(), and a
checkpoint is the dict of them, so resuming is `load_state_dict` and nothing else."""

from __future__ import annotations

import csv
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from ultralytics.utils.torch_utils import ModelEMA

from .checkpoint.manager import CheckpointInfo, CheckpointManager
from .config import Config
from .data import EpochBatchSampler, build_datasets, collate_fn
from .distributed import Distributed
from .errors import CheckpointError, CheckpointSaveError, ConfigError, UserError
from .evaluate import evaluate
from .interop import load_init_weights
from .lineage import interruption_entry
from .model import LOSS_NAMES, build_model, compute_loss
from .optim import LRSchedule, accumulate_at, accumulate_steps, build_optimizer, resolve_optimizer
from .plots import plot_results
from .progress import TrainProgress
from .provenance import git_info, host, versions
from .seeding import configure_determinism, rng_state, seed_everything, set_rng_state

# Exit code after a graceful stop on SIGTERM / SIGUSR1 / Ctrl-C: "temporary failure, retry" (sysexits
# EX_TEMPFAIL). Schedulers restart on non-zero; `yolo-resume train --resume` continues exactly.
EXIT_INTERRUPTED = 75
# sysexits EX_DATAERR: the loss kept turning non-finite at the same step; restarting cannot help.
EXIT_DIVERGED = 65
NAN_TEST_ENV = "YOLO_RESUME_TEST_NAN_AT"  # tests: "STEP" or "STEP:MARKER" (once, while MARKER is absent)
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
PLOT_EVERY_S = 60.0


@dataclass
class TrainState:
    """The loop's counters and history: the data position is (epoch, step_in_epoch)."""

    epoch: int = 0  # epochs completed == index of the epoch in progress
    step_in_epoch: int = 0  # batches of the current epoch already trained on
    global_step: int = 0  # batches trained on since the start of the run
    optimizer_steps: int = 0
    last_opt_step: int = -1  # global step of the last optimizer step (accumulation windows run across epochs)
    epoch_loss_sum: list[float] = field(default_factory=lambda: [0.0] * len(LOSS_NAMES))
    best_fitness: float | None = None
    history: list[dict] = field(default_factory=list)  # one row per finished epoch (results.csv)
    segment: int = 0  # number of times this run was resumed

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class DivergedError(UserError):
    exit_code = EXIT_DIVERGED


class NonFiniteLoss(Exception):
    """The loss of the step about to be trained is NaN or infinite (raised before backward)."""

    def __init__(self, global_step: int):
        super().__init__(f"non-finite loss at global step {global_step}")
        self.global_step = global_step


def select_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device to train on; under torchrun each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device `{name}` requested but CUDA is not available; use --device cpu")
    if name == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(name)


def resolve_workers(workers: int, device: torch.device, world_size: int = 1) -> int:
    """`train.workers`, with -1 (auto) resolved: none on CPU, a few per process on CUDA."""
    if workers >= 0:
        return workers
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 1) // max(world_size, 1)))


def check_world_size(cfg: Config, world_size: int) -> None:
    if cfg.train.batch % world_size:
        raise ConfigError(
            f"config key `train.batch` ({cfg.train.batch}) is the global batch and must be divisible by the "
            f"number of processes ({world_size})"
        )


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, quiet: bool = False, dist: Distributed | None = None):
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.dist = dist or Distributed()
        self.device = select_device(cfg.train.device, self.dist.local_rank if self.dist.enabled else None)
        self.dist.configure(cfg.dist.backend, self.device, cfg.dist.timeout_s)
        check_world_size(cfg, self.dist.world_size)
        configure_determinism(cfg.train.deterministic)
        seed_everything(cfg.train.seed)
        # Rank 0 generates or indexes the dataset first, then the others read it.
        self.train_ds, self.val_ds = self.dist.main_first(
            lambda: build_datasets(cfg.data, cfg.augment, cfg.model.imgsz, cfg.train.seed, cfg.train.epochs)
        )
        self.model = build_model(cfg.model.cfg, len(self.train_ds.names), self.train_ds.names, cfg.train)
        self.model.to(self.device)
        self.net: torch.nn.Module = self.model  # what the forward pass goes through (DDP under torchrun)
        # Only rank 0 validates and saves, so only rank 0 keeps the EMA.
        self.ema = ModelEMA(self.model, tau=cfg.train.ema_tau) if cfg.train.ema and self.dist.is_main else None
        # `optimizer: auto` is resolved once, when a run starts, into the run's own config (config.yaml and every
        # checkpoint then name the optimizer and lr0 used), so a resume with another --epochs keeps it.
        self.auto_optimizer = cfg.train.optimizer == "auto"
        cfg.train = resolve_optimizer(cfg.train, len(self.train_ds.names), len(self.train_ds))
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp)
        # train.batch is global: each of the world_size ranks takes its share of every global batch.
        self.sampler = EpochBatchSampler(
            len(self.train_ds),
            cfg.train.batch // self.dist.world_size,
            seed=cfg.train.seed,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.schedule = LRSchedule.from_config(cfg.train, self.sampler.batches_per_epoch())
        self.accumulate = accumulate_steps(cfg.train)
        self.state = TrainState()
        self.ckpt = CheckpointManager.for_run(cfg.ckpt, self.run_dir)
        self._save_failures = 0  # consecutive
        self.resumed_from: str | None = None
        self.lineage: list[dict] = []  # one entry per resume (see lineage.py)
        self.stop_after_steps: int | None = None  # `doctor` replays a few steps, then stops
        self._segment_steps = 0
        self.tb = None  # tensorboard writer, when --tensorboard
        self.initial_weights: str | None = None  # --init-weights
        self._plotter: threading.Thread | None = None
        # The first picture comes after a minute of training (and at the end), not after the first
        # epoch: on short epochs a draw (~0.3 s of CPU) would cost more than the epoch's own logging.
        self._last_plot = time.monotonic()
        self.train_loader = self._loader(self.train_ds, batch_sampler=self.sampler)
        self.val_loader = self._loader(self.val_ds, batch_size=cfg.train.batch * 2, shuffle=False)
        self.progress = TrainProgress(quiet=quiet or not self.dist.is_main)
        self.stop_requested: str | None = None  # set by a signal handler on this rank
        self.stop_signal: str | None = None  # the stop every rank agreed on (acted upon after the step)
        self._time_save_due = False  # ckpt.every_minutes, agreed by every rank at the last step
        self._rollbacks = 0
        self._last_save_time = time.monotonic()
        self._last_saved_step = -1
        self.dataset_fingerprint = self.train_ds.fingerprint() + ":" + self.val_ds.fingerprint()
        # Read once: the code that runs is the code loaded at start (and git costs a subprocess).
        self.git, self.versions = git_info(), versions()

    def _loader(self, dataset, **kwargs) -> DataLoader:
        workers = resolve_workers(self.cfg.train.workers, self.device, self.dist.world_size)
        return DataLoader(
            dataset,
            num_workers=workers,
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            worker_init_fn=_ignore_stop_signals if workers > 0 else None,
            # A private generator: creating a loader iterator must not consume the global torch RNG,
            # or the RNG stream would depend on where a run was resumed.
            generator=torch.Generator().manual_seed(self.cfg.train.seed),
            **kwargs,
        )

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": {"weights": self.ema.ema.state_dict(), "updates": self.ema.updates} if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "train_state": self.state.state_dict(),
            "rng": rng_state(),
            # Gradients summed so far in an unfinished accumulation window (empty at window boundaries).
            "pending_grads": {name: p.grad for name, p in self.model.named_parameters() if p.grad is not None},
        }

    def state_for_save(self) -> dict:
        """`state_dict()`, safe to hand to a background save that copies it during the next forward
        pass: that pass updates BatchNorm statistics in place, so the model's buffers are copied
        now; parameters, EMA, optimizer state and gradients only change after `wait_snapshot()`."""
        state = self.state_dict()
        buffers = {name for name, _ in self.model.named_buffers()}
        state["model"] = {k: v.clone() if k in buffers else v for k, v in state["model"].items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema and state["ema"]:
            self.ema.ema.load_state_dict(state["ema"]["weights"])
            self.ema.updates = int(state["ema"]["updates"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.state.load_state_dict(state["train_state"])
        # Each rank continues its own RNG streams; with another world size, rank r takes rank r mod N's.
        rank_rng = state.get("rank_rng") or [state["rng"]]
        set_rng_state(rank_rng[self.dist.rank % len(rank_rng)])
        params = dict(self.model.named_parameters())
        self.optimizer.zero_grad(set_to_none=True)  # a rollback may land here mid accumulation window
        for name, grad in state["pending_grads"].items():
            params[name].grad = grad.to(self.device)

    def resume(self, info: CheckpointInfo, ended: str | None = None) -> None:
        """Load `info`; `ended` says why the previous stretch stopped when this process knows it
        (a rollback), instead of reading it from the segment log."""
        state, _ = info.ref.load(map_location=str(self.device))
        try:
            self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as exc:
            first = " ".join(str(exc).split())[:300]
            raise CheckpointError(
                f"checkpoint {info.path} does not fit the current model/optimizer ({first}); "
                "resume with the config it was saved with"
            ) from None
        self.state.segment += 1
        self.resumed_from = str(info.path)
        self._last_saved_step = self.state.global_step
        steps_log = self.run_dir / "steps.csv"
        entry = interruption_entry(
            self.run_dir, self.state.segment, info.name, self.state.global_step, last_logged_step(steps_log)
        )
        if ended is not None:
            entry["previous_segment_ended"] = ended
        self.lineage = list(info.get("lineage") or []) + [entry]
        if self.dist.is_main:
            truncate_step_log(steps_log, self.state.global_step)

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to `train.epochs`; returns the process exit code (0, or EXIT_INTERRUPTED)."""
        self.net = self.dist.wrap(self.model, self.device)
        with self.progress, _StopOnSignals(self):
            try:
                while self.state.epoch < self.cfg.train.epochs and not self.stop_signal:
                    try:
                        self.train_epoch()
                    except NonFiniteLoss as bad:
                        self.roll_back(bad)
                        continue
                    if not self.stop_signal:
                        self.end_epoch()
                if self.stop_signal:
                    self.save(reason=f"signal:{self.stop_signal}")
            finally:
                if self.state.history and self.dist.is_main:
                    self.redraw_plot(wait=True)  # the final picture, complete
                self.ckpt.wait()  # never exit with a save in flight
                if self.tb is not None:
                    self.tb.close()
            self.check_saves(final=True)
            self.dist.barrier()  # every rank leaves together, after rank 0's last commit
        if self.stop_signal:
            return EXIT_INTERRUPTED
        self.progress.summary(self.state.history)
        return 0

    def train_epoch(self) -> None:
        state, nb = self.state, self.sampler.batches_per_epoch()
        self.sampler.set_epoch(state.epoch, start_batch=state.step_in_epoch)
        self.model.train()
        self.progress.start_epoch(state.epoch, self.cfg.train.epochs, nb, state.step_in_epoch)
        for batch in self.train_loader:
            losses, lr = self.train_step(batch)
            state.step_in_epoch += 1
            state.global_step += 1
            state.epoch_loss_sum = [a + b for a, b in zip(state.epoch_loss_sum, losses, strict=True)]
            if self.dist.is_main:
                append_step_log(self.run_dir / "steps.csv", state, losses, lr)
            self.log_scalars(
                {f"train/{n}": v for n, v in zip(LOSS_NAMES, losses, strict=True)} | {"lr": lr}, state.global_step
            )
            self.progress.step(state, batch["img"].shape[0])
            self.check_saves()
            self._segment_steps += 1
            if self.stop_after_steps is not None and self._segment_steps >= self.stop_after_steps:
                self.stop_signal = "STEP_LIMIT"
            if self.stop_signal:
                return
            if state.step_in_epoch < nb and self.step_save_due():
                self.save(reason="interval")

    def train_step(self, batch: dict) -> tuple[list[float], float]:
        i, nb = self.state.step_in_epoch, self.sampler.batches_per_epoch()
        lr = self.schedule.apply(self.optimizer, self.state.global_step)
        batch = self.to_device(batch)
        with torch.autocast(self.device.type, enabled=self.amp):
            loss, items = compute_loss(self.model, batch, self.net)
        loss = _inject_test_nan(loss, self.state.global_step + 1) * self.dist.world_size
        # One message per step agrees, before backward, on what every rank must do the same way:
        # skip a non-finite step, stop after this step, save by the clock; and averages the losses.
        bad, stop, time_due, *loss_sums = self.dist.sum_(
            [float(not math.isfinite(loss.item())), float(self.stop_requested is not None), float(self._clock_due())]
            + items.tolist()
        )
        if bad:
            raise NonFiniteLoss(self.state.global_step + 1)
        if stop and not self.stop_signal:
            self.stop_signal = self.stop_requested or "a stop signal on another rank"
        self._time_save_due = bool(time_due)
        self.ckpt.wait_snapshot()  # a save in flight must copy the weights before backward changes them
        self.scaler.scale(loss).backward()
        if self.optimizer_step_due(i, nb):
            self.optimizer_step()
        return [v / self.dist.world_size for v in loss_sums], lr

    def optimizer_step_due(self, i: int, nb: int) -> bool:
        """Step the optimizer after batch i of nb? Ultralytics' rule: once the batches since the last step reach
        the (warmup-ramped) accumulation. Before 0.2.0 (`train.accumulate_ramp: false`): fixed windows restarting
        at each epoch. Either way a function of the step and the checkpointed `last_opt_step`."""
        if not self.cfg.train.accumulate_ramp:
            return (i + 1) % self.accumulate == 0 or i + 1 == nb
        step = self.state.global_step
        return step - self.state.last_opt_step >= accumulate_at(step, self.accumulate, self.schedule.warmup_steps)

    def optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        if self.cfg.train.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=self.cfg.train.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema:
            self.ema.update(self.model)
        self.state.optimizer_steps += 1
        self.state.last_opt_step = self.state.global_step

    def to_device(self, batch: dict) -> dict:
        out = dict(batch)
        out["img"] = batch["img"].to(self.device, non_blocking=True).float() / 255
        for key in ("cls", "bboxes", "batch_idx"):
            out[key] = batch[key].to(self.device)
        return out

    def end_epoch(self) -> None:
        state, nb = self.state, self.sampler.batches_per_epoch()
        # Rank 0 validates; the others wait for its metrics, so every rank keeps the same history.
        metrics = self.dist.broadcast_json(self.validate() if self.eval_due() and self.dist.is_main else {})
        row = {"epoch": state.epoch + 1, "segment": state.segment}
        row |= {
            name: value / max(state.step_in_epoch, 1)
            for name, value in zip(LOSS_NAMES, state.epoch_loss_sum, strict=True)
        }
        row |= {"lr": self.schedule.lr_at(state.global_step - 1)} | metrics
        state.history.append(row)
        self.log_scalars({f"val/{k}": v for k, v in metrics.items()}, state.global_step)
        if "fitness" in metrics and (state.best_fitness is None or metrics["fitness"] > state.best_fitness):
            state.best_fitness = metrics["fitness"]
        state.epoch += 1
        state.step_in_epoch = 0
        state.epoch_loss_sum = [0.0] * len(LOSS_NAMES)
        if self.dist.is_main:
            write_results_csv(self.run_dir / "results.csv", state.history)
            self.redraw_plot()
        self.progress.end_epoch(row, nb)
        if self.epoch_save_due() or self.step_save_due():
            self.save(reason="epoch")

    def roll_back(self, bad: NonFiniteLoss) -> None:
        """Continue from the newest valid checkpoint instead of training on a non-finite loss; after
        `train.nan_retries` rollbacks, stop: the divergence then is in the data or the schedule."""
        self._rollbacks += 1
        self.ckpt.wait()
        self.check_saves()
        where = f"global step {bad.global_step} (epoch {self.state.epoch + 1}, batch {self.state.step_in_epoch + 1})"
        retries = self.cfg.train.nan_retries

        def newest_valid() -> str:
            info = self.ckpt.latest_valid()
            if self._rollbacks > retries or info is None:
                last = f"the newest valid checkpoint is {info.name}" if info else "no checkpoint was saved yet"
                raise DivergedError(
                    f"training diverged: the loss is non-finite at {where} after {self._rollbacks - 1} rollback(s) "
                    f"(train.nan_retries={retries}); {last}. Lower train.lr0, raise train.warmup_epochs or check "
                    "that batch's labels, then resume with --resume"
                )
            return info.name

        name = self.dist.decide(newest_valid)
        info = next(i for i in self.ckpt.list() if i.name == name)
        self.progress.notice(
            f"non-finite loss at {where}: rolling back to {name} (rollback {self._rollbacks} of at most {retries})"
        )
        self.resume(info, ended=f"rolled back: non-finite loss at global step {bad.global_step}")
        self.net = self.dist.wrap(self.model, self.device)  # a fresh DDP reducer: the bad step never ran backward

    def init_weights(self, path: Path, trust_pickle: bool) -> tuple[int, int]:
        """Start from existing weights (a fresh run only); the EMA restarts from them too."""
        transferred, total = load_init_weights(self.model, Path(path), trust_pickle)
        if self.ema:
            self.ema = ModelEMA(self.model, tau=self.cfg.train.ema_tau)
        self.initial_weights = str(path)
        return transferred, total

    def enable_tensorboard(self) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError(
                "--tensorboard needs the tensorboard package: pip install 'yolo-resume[tensorboard]'"
            ) from None
        # purge_step drops events a killed segment logged after the checkpoint we resumed from.
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=self.state.global_step + 1)

    def log_scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def redraw_plot(self, wait: bool = False) -> None:
        """Redraw results.png in a background thread, at most once a minute (matplotlib takes ~0.3 s of
        CPU, a whole step on a small CPU run). `wait` draws the final, complete one."""
        if not wait and time.monotonic() - self._last_plot < PLOT_EVERY_S:
            return
        if self._plotter is not None and self._plotter.is_alive():
            if not wait:
                return
            self._plotter.join()
        self._last_plot = time.monotonic()
        self._plotter = threading.Thread(target=self._draw_plot, name="results.png", daemon=True)
        self._plotter.start()
        if wait:
            self._plotter.join()

    def _draw_plot(self) -> None:
        try:
            plot_results(self.run_dir / "results.csv")
        except Exception as exc:  # a plot must never stop training
            self.progress.notice(f"could not draw results.png: {type(exc).__name__}: {exc}")

    def validate(self) -> dict[str, float]:
        model = self.ema.ema if self.ema else self.model
        return evaluate(model, self.val_loader, self.val_ds, self.device, self.cfg.eval)

    # -- schedules ---------------------------------------------------------------------------
    def eval_due(self) -> bool:
        every, epoch = self.cfg.eval.every_epochs, self.state.epoch + 1
        return every > 0 and (epoch % every == 0 or epoch == self.cfg.train.epochs)

    def epoch_save_due(self) -> bool:
        every, epoch = self.cfg.ckpt.every_epochs, self.state.epoch
        return epoch == self.cfg.train.epochs or (every > 0 and epoch % every == 0)

    def step_save_due(self) -> bool:
        every_steps = self.cfg.ckpt.every_steps
        if every_steps and self.state.global_step % every_steps == 0:
            return True
        return self._time_save_due

    def _clock_due(self) -> bool:
        """ckpt.every_minutes elapsed on this rank's clock (the ranks then agree in the step message)."""
        every_min = self.cfg.ckpt.every_minutes
        return bool(every_min) and time.monotonic() - self._last_save_time >= every_min * 60

    # -- checkpoints -------------------------------------------------------------------------
    def save(self, reason: str) -> None:
        if self.state.global_step == self._last_saved_step:
            return  # this exact state is already committed (or being committed)
        rank_rng = self.dist.gather_state(rng_state())  # every rank's part, before rank 0 commits
        if self.dist.is_main:
            state = self.state_for_save()
            if self.dist.enabled:
                state["rank_rng"] = rank_rng
            self.ckpt.save(state, self.checkpoint_meta(reason))
        self._last_save_time = time.monotonic()
        self._last_saved_step = self.state.global_step
        self.check_saves()

    def check_saves(self, final: bool = False) -> None:
        """Report finished saves. A failed one is retried at the next interval; training stops after
        `ckpt.max_failures` consecutive failures, or when the last save of the run failed."""
        for result in self.ckpt.poll():
            if result.error is None:
                self._save_failures = 0
                self.progress.saved(result)
                continue
            self._save_failures += 1
            limit = self.cfg.ckpt.max_failures
            if final or self._save_failures >= limit:
                raise CheckpointSaveError(
                    f"{result.error} (failure {self._save_failures} of at most {limit}); training stopped, "
                    "resume with --resume once the disk has room"
                )
            self.progress.notice(
                f"{result.error}; training continues and retries at the next interval "
                f"(failure {self._save_failures} of at most {limit})"
            )

    def checkpoint_meta(self, reason: str) -> dict:
        state, last = self.state, (self.state.history[-1] if self.state.history else {})
        return {
            "kind": "full",  # the whole training state (a "light" one would hold EMA weights only)
            "reason": reason,
            "epoch": state.epoch,
            "step_in_epoch": state.step_in_epoch,
            "global_step": state.global_step,
            "epochs": self.cfg.train.epochs,
            "batches_per_epoch": self.sampler.batches_per_epoch(),
            "finished": state.epoch >= self.cfg.train.epochs and state.step_in_epoch == 0,
            "segment": state.segment,
            "lr": self.schedule.lr_at(max(state.global_step - 1, 0)),
            "metrics": {k: last[k] for k in ("map50", "map", "fitness") if k in last},
            "best_fitness": state.best_fitness,
            "names": list(self.train_ds.names),
            "config": self.cfg.to_dict(),
            "config_hash": self.cfg.hash(),
            "host": host(),
            "run_dir": str(self.run_dir.resolve()),
            "resumed_from": self.resumed_from,
            "lineage": self.lineage,
            "init_weights": self.initial_weights,
        } | self.environment()

    def environment(self) -> dict:
        """What, besides the config, decides the exact numbers (compared on resume)."""
        return {
            "dataset_fingerprint": self.dataset_fingerprint,
            "git": self.git,
            "versions": self.versions,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "world_size": self.dist.world_size,
        }


class _StopOnSignals:
    """SIGTERM / SIGUSR1 / first Ctrl-C: finish the current step, save, exit. Second Ctrl-C: abort."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.previous: dict = {}

    def __enter__(self):
        for name in STOP_SIGNALS:
            sig = getattr(signal, name)
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: abort at once
        self.trainer.stop_requested = name
        self.trainer.progress.notice(f"{name} received: finishing the current step, then saving a checkpoint")

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


def _inject_test_nan(loss: torch.Tensor, global_step: int) -> torch.Tensor:
    """Fault injection for tests: a NaN loss at one step, every time or once (while MARKER is absent)."""
    spec = os.environ.get(NAN_TEST_ENV)
    if not spec:
        return loss
    step, _, marker = spec.partition(":")
    if int(step) != global_step or (marker and os.path.exists(marker)):
        return loss
    if marker:
        Path(marker).touch()
    return loss * float("nan")


def _ignore_stop_signals(_worker_id: int) -> None:
    # Ctrl-C reaches the whole process group, and torchrun signals each rank's group: only the main
    # process decides how to stop. A worker whose parent is gone exits by itself (DataLoader watchdog).
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


# -- run-dir logs ------------------------------------------------------------------------------
STEP_FIELDS = ("global_step", "epoch", "step_in_epoch", "lr", *LOSS_NAMES)


def append_step_log(path: Path, state: TrainState, losses: list[float], lr: float) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.writer(f)
        if new:
            writer.writerow(STEP_FIELDS)
        writer.writerow([state.global_step, state.epoch, state.step_in_epoch, repr(lr), *map(repr, losses)])


def truncate_step_log(path: Path, global_step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (those steps are trained again), and any
    torn last line from a kill mid-write. Atomic, so a kill here cannot lose the log."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)

    def keep(line: str) -> bool:
        fields = line.rstrip("\n").split(",")
        complete = line.endswith("\n") and len(fields) == len(STEP_FIELDS) and fields[0].isdigit()
        return complete and int(fields[0]) <= global_step

    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text("".join([f"{','.join(STEP_FIELDS)}\n"] + [ln for ln in lines[1:] if keep(ln)]))
    tmp.replace(path)


def last_logged_step(path: Path) -> int | None:
    """The highest global step in the step log (what the interrupted segment had reached)."""
    if not path.exists():
        return None
    steps = [int(ln.split(",", 1)[0]) for ln in path.read_text().splitlines()[1:] if ln.split(",", 1)[0].isdigit()]
    return max(steps, default=None)


def write_results_csv(path: Path, history: list[dict]) -> None:
    """Rewritten from the checkpointed history each epoch, so a resumed run never duplicates rows."""
    columns: list[str] = []
    for row in history:
        columns += [k for k in row if k not in columns]
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow(
                {k: (f"{v:.6g}" if isinstance(v, float) and math.isfinite(v) else v) for k, v in row.items()}
            )
    tmp.replace(path)
