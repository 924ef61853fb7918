"""The training loop: short and linear. Everything stateful has state_dict()/load_state_dict(), and a
checkpoint is the dict of them, so resuming is `load_state_dict` and nothing else. The run folder's
logs are the RunLog's, when to save is the SavePolicy's."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from ultralytics.utils.torch_utils import ModelEMA

from .checkpoint.ref import CheckpointInfo
from .checkpoint.save_policy import SaveContext, SavePolicy
from .config import Config, resolve_paths
from .data import EpochBatchSampler, build_datasets, collate_fn
from .data.check import fill_content_hashes, legacy_label_digest
from .data.manifest import write_manifest
from .data.records import dataset_fingerprint, legacy_fingerprint
from .distributed import Distributed
from .drift import Environment
from .errors import CheckpointError, DivergedError, ExitCode
from .evaluate import evaluate
from .hardware import check_world_size, resolve_workers, select_device
from .interop import load_init_weights
from .light import LightWeights
from .lineage import interruption_entry
from .model import LOSS_NAMES, build_model, compute_loss
from .optim import LRSchedule, accumulate_at, accumulate_steps, build_optimizer, resolve_optimizer
from .pictures import RunPictures, ValPictures
from .progress import TrainProgress, print_dataset_check
from .provenance import code_version, experiment_git, git_info, host, versions
from .run_dir import RunDir
from .run_log import RunLog
from .seeding import configure_determinism, rng_state, seed_everything, set_rng_state
from .stopping import StopOnSignals, ignore_stop_signals

NAN_TEST_ENV = "YOLO_RESUME_TEST_NAN_AT"  # tests: "STEP" or "STEP:MARKER" (once, while MARKER is absent)


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
    # The last finished epoch's validation failed (its checkpoint was saved without metrics): a resume
    # validates it first, so history and best are those of an uninterrupted run.
    pending_eval: bool = False
    segment: int = 0  # number of times this run was resumed

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


class NonFiniteLoss(Exception):
    """The loss of the step about to be trained is NaN or infinite (raised before backward)."""

    def __init__(self, global_step: int):
        super().__init__(f"non-finite loss at global step {global_step}")
        self.global_step = global_step


class Trainer:
    def __init__(
        self,
        cfg: Config,
        run_dir: Path,
        quiet: bool = False,
        dist: Distributed | None = None,
        config_file: Path | None = None,
    ):
        self.cfg, self.run_dir = resolve_paths(cfg), Path(run_dir)  # in place: config.yaml is written from cfg
        self.dist = dist or Distributed()
        self.device = select_device(cfg.train.device, self.dist.local_rank if self.dist.enabled else None)
        self.dist.configure(cfg.dist.backend, self.device, cfg.dist.timeout_s)
        check_world_size(cfg, self.dist.world_size)
        configure_determinism(cfg.train.deterministic)
        seed_everything(cfg.train.seed)
        self.progress = TrainProgress(quiet=quiet or not self.dist.is_main)
        # Rank 0 generates, checks and indexes the dataset first (the index is cached), then the others read it.
        self.train_ds, self.val_ds = self.dist.main_first(
            lambda: build_datasets(cfg.data, cfg.augment, cfg.model.imgsz, cfg.train.seed, cfg.train.epochs)
        )
        if self.dist.is_main:
            print_dataset_check(self.progress, [self.train_ds.split.report, self.val_ds.split.report])
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
        self.ckpt = RunDir(self.run_dir).checkpoints(cfg.ckpt)
        self.resumed_from: str | None = None
        self.lineage: list[dict] = []  # one entry per resume (see lineage.py)
        self.stop_after_steps: int | None = None  # `doctor` replays a few steps, then stops
        self._segment_steps = 0
        self.initial_weights: str | None = None  # --init-weights
        self.train_loader = self._loader(self.train_ds, batch_sampler=self.sampler)
        self.val_loader = self._loader(self.val_ds, batch_size=cfg.train.batch * 2, shuffle=False)
        self.log = RunLog(self.run_dir, self.dist.is_main, notice=self.progress.notice)
        self.light = LightWeights(
            self.run_dir, cfg.model.cfg, list(self.train_ds.names), cfg.model.imgsz, self.progress.notice
        )
        # labels.png, train_batch*.jpg and the validation pictures, drawn in the background (pictures.py)
        self.pictures = (
            RunPictures(self.run_dir, self.train_ds.names, self.progress.notice) if self.dist.is_main else None
        )
        self._val_pictures: ValPictures | None = None  # the last validation's, until its epoch is finished
        self.stops = StopOnSignals(notice=self.progress.notice)  # what this rank received
        self.stop_signal: str | None = None  # the stop every rank agreed on (acted upon after the step)
        self.saves = SavePolicy(cfg.ckpt, cfg.train.epochs)
        self._minutes_due = False  # ckpt.every_minutes, agreed by every rank at the last step
        self._rollbacks = 0
        self.dataset_fingerprint = dataset_fingerprint(self.train_ds.split, self.val_ds.split, cfg.data.fingerprint)
        self.dataset_manifest = self._write_dataset_manifest()
        # Read once: the code that runs is the code loaded at start (and git costs a subprocess).
        self.git, self.code, self.versions = experiment_git(config_file), code_version(), versions()
        self.config_file = config_file

    def _write_dataset_manifest(self) -> str | None:
        """The file list of this fingerprint, in the run (rank 0), so a refused resume can name changed files."""
        if not self.dist.is_main:
            return None
        try:
            return str(write_manifest(self.run_dir, self.dataset_fingerprint, self.train_ds.split, self.val_ds.split))
        except OSError as exc:  # a diagnostic aid: never a reason not to train
            self.progress.notice(f"dataset file list not recorded in the run ({exc})")
            return None

    def _loader(self, dataset, **kwargs) -> DataLoader:
        workers = resolve_workers(self.cfg.train.workers, self.device, self.dist.world_size)
        return DataLoader(
            dataset,
            num_workers=workers,
            collate_fn=collate_fn,
            pin_memory=self.device.type == "cuda",
            persistent_workers=workers > 0,
            worker_init_fn=ignore_stop_signals if workers > 0 else None,
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
        stored_repo = (info.get("git") or {}).get("repo")
        if self.config_file is None and stored_repo:  # the run's own config: its experiment is the stored repo
            self.git = git_info(stored_repo)
        self.saves.resumed(self.state.global_step)
        reached = self.log.on_resume(self.state.global_step)
        entry = interruption_entry(self.run_dir, self.state.segment, info.name, self.state.global_step, reached)
        if ended is not None:
            entry["previous_segment_ended"] = ended
        self.lineage = list(info.get("lineage") or []) + [entry]

    # -- the loop ----------------------------------------------------------------------------
    def fit(self) -> int:
        """Train to `train.epochs`; returns the process exit code (OK, or INTERRUPTED after a stop signal)."""
        self.net = self.dist.wrap(self.model, self.device)
        with self.progress, self.stops:
            if self.pictures is not None:
                self.pictures.labels(self.train_ds.records)
            try:
                if self.state.pending_eval:  # resumed after a failed validation: validate that epoch first
                    self.progress.notice(f"validating epoch {self.state.epoch}, whose validation failed before")
                    self.finish_epoch(self.state.history[-1], self.validate_all_ranks())
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
                self.log.close(self.state.history)
                self.ckpt.wait()  # never exit with a save in flight
                self.light.wait()
                if self.pictures is not None:
                    self.pictures.close()
            self.check_saves(final=True)
            self.dist.barrier()  # every rank leaves together, after rank 0's last commit
        if self.stop_signal:
            return ExitCode.INTERRUPTED
        self.progress.summary(self.state.history)
        return ExitCode.OK

    def train_epoch(self) -> None:
        state, nb = self.state, self.sampler.batches_per_epoch()
        self.sampler.set_epoch(state.epoch, start_batch=state.step_in_epoch)
        self.model.train()
        self.progress.start_epoch(state.epoch, self.cfg.train.epochs, nb, state.step_in_epoch)
        for batch in self.train_loader:
            if self.pictures is not None:
                self.pictures.train_batch(state.epoch, state.step_in_epoch, batch)
            losses, lr = self.train_step(batch)
            state.step_in_epoch += 1
            state.global_step += 1
            state.epoch_loss_sum = [a + b for a, b in zip(state.epoch_loss_sum, losses, strict=True)]
            self.log.on_step(state, losses, lr)
            self.progress.step(state, batch["img"].shape[0])
            self.check_saves()
            self._segment_steps += 1
            if self.stop_after_steps is not None and self._segment_steps >= self.stop_after_steps:
                self.stop_signal = "STEP_LIMIT"
            if self.stop_signal:
                return
            if state.step_in_epoch < nb:  # after the last batch, the epoch end decides
                self.save_if_due(epoch_end=False)

    def train_step(self, batch: dict) -> tuple[list[float], float]:
        i, nb = self.state.step_in_epoch, self.sampler.batches_per_epoch()
        lr = self.schedule.apply(self.optimizer, self.state.global_step)
        batch = self.to_device(batch)
        with torch.autocast(self.device.type, enabled=self.amp):
            loss, items = compute_loss(self.model, batch, self.net)
        loss = _inject_test_nan(loss, self.state.global_step + 1) * self.dist.world_size
        # One message per step agrees, before backward, on what every rank must do the same way:
        # skip a non-finite step, stop after this step, save by the clock; and averages the losses.
        flags = [not math.isfinite(loss.item()), self.stops.requested is not None, self.saves.clock_due()]
        bad, stop, minutes_due, *loss_sums = self.dist.sum_([float(flag) for flag in flags] + items.tolist())
        if bad:
            raise NonFiniteLoss(self.state.global_step + 1)
        if stop and not self.stop_signal:
            self.stop_signal = self.stops.requested or "a stop signal on another rank"
        self._minutes_due = bool(minutes_due)
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
        """Close the epoch: validate it (when due) and save. A validation that fails still saves the epoch,
        without metrics (a resume validates it first), then fails."""
        state = self.state
        row = {"epoch": state.epoch + 1, "segment": state.segment}
        row |= {
            name: value / max(state.step_in_epoch, 1)
            for name, value in zip(LOSS_NAMES, state.epoch_loss_sum, strict=True)
        }
        row |= {"lr": self.schedule.lr_at(state.global_step - 1)}
        state.history.append(row)
        state.epoch += 1
        state.step_in_epoch = 0
        state.epoch_loss_sum = [0.0] * len(LOSS_NAMES)
        if not self.eval_due(state.epoch):
            self.finish_epoch(row, {})
            return
        try:
            metrics = self.validate_all_ranks()
        except Exception:
            if not self.dist.enabled:  # under torchrun the other ranks wait in the broadcast: no collective save
                state.pending_eval = True
                self.save_if_due(epoch_end=True)
                self.ckpt.wait()
                self.check_saves()
            raise
        self.finish_epoch(row, metrics)

    def validate_all_ranks(self) -> dict[str, float]:
        """Rank 0 validates; the others wait for its metrics, so every rank keeps the same history."""
        return self.dist.broadcast_json(self.validate() if self.dist.is_main else {})

    def finish_epoch(self, row: dict, metrics: dict[str, float]) -> None:
        state = self.state
        row |= metrics
        state.pending_eval = False
        improved = "fitness" in metrics and (state.best_fitness is None or metrics["fitness"] > state.best_fitness)
        if improved:
            state.best_fitness = metrics["fitness"]
        if self.dist.is_main:  # the weights a user ships, beside the run's files (see light.py)
            used = "ema" if self.ema else "model"
            weights = (self.ema.ema if self.ema else self.model).state_dict()
            milestone = self.cfg.ckpt.light_every_epochs
            self.light.update(
                weights, used, state.epoch, best=improved, milestone=milestone > 0 and state.epoch % milestone == 0
            )
        if self.pictures is not None:
            self.pictures.validation(self._val_pictures if metrics else None, best=improved)
        self._val_pictures = None
        self.log.on_epoch(state.history, metrics, state.global_step)
        self.progress.end_epoch(row, self.sampler.batches_per_epoch())
        self.save_if_due(epoch_end=True)

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

    def validate(self) -> dict[str, float]:
        model = self.ema.ema if self.ema else self.model
        pictures = ValPictures(self.val_ds.names, epoch=self.state.epoch) if self.pictures is not None else None
        metrics = evaluate(model, self.val_loader, self.val_ds, self.device, self.cfg.eval, pictures)
        self._val_pictures = pictures
        return metrics

    # -- schedules ---------------------------------------------------------------------------
    def eval_due(self, epoch: int) -> bool:
        """Validate after `epoch` (1-based) epochs?"""
        every = self.cfg.eval.every_epochs
        return every > 0 and (epoch % every == 0 or epoch == self.cfg.train.epochs)

    # -- checkpoints -------------------------------------------------------------------------
    def save_if_due(self, epoch_end: bool) -> None:
        state = self.state
        context = SaveContext(state.epoch, state.global_step, epoch_end=epoch_end, minutes_due=self._minutes_due)
        reason = self.saves.should_save(context)
        if reason is not None:
            self.save(reason)

    def save(self, reason: str) -> None:
        if self.saves.is_saved(self.state.global_step):
            return  # this exact state is already committed (or being committed)
        rank_rng = self.dist.gather_state(rng_state())  # every rank's part, before rank 0 commits
        if self.dist.is_main:
            state = self.state_for_save()
            if self.dist.enabled:
                state["rank_rng"] = rank_rng
            self.ckpt.save(state, self.checkpoint_meta(reason))
        self.saves.saved(self.state.global_step)
        self.check_saves()

    def check_saves(self, final: bool = False) -> None:
        """Report finished saves; the policy stops training when they keep failing (see SavePolicy.record)."""
        for result in self.ckpt.poll():
            notice = self.saves.record(result, final)
            if notice is None:
                self.progress.saved(result)
            else:
                self.progress.notice(notice)
            if result.cleanup_error is not None:  # committed; retention retries at the next save
                self.progress.notice(f"{result.name} is committed; cleaning up after it failed: {result.cleanup_error}")

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
        } | self._environment()

    def environment(self) -> Environment:
        """What, besides the config, decides the exact numbers (compared on resume); with the means to compute
        the dataset fingerprint as an older checkpoint stored it."""
        train, val = self.train_ds.split, self.val_ds.split

        def legacy() -> str:
            return ":".join(legacy_fingerprint(split, legacy_label_digest(split)) for split in (train, val))

        def in_scheme(scheme: str) -> str:
            if scheme == "content":
                fill_content_hashes(train)
                fill_content_hashes(val)
            return dataset_fingerprint(train, val, scheme)

        return Environment(self._environment(), fingerprint_in=in_scheme, legacy_fingerprint=legacy)

    def _environment(self) -> dict:
        return {
            "dataset_fingerprint": self.dataset_fingerprint,
            "dataset_manifest": self.dataset_manifest,
            "git": self.git,
            "code": self.code,
            "versions": self.versions,
            "device": str(self.device),
            "threads": torch.get_num_threads(),
            "world_size": self.dist.world_size,
        }


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
