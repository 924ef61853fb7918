"""When the Trainer saves a checkpoint, and when failed saves stop training (after orbax's `should_save`).

The policy only decides; the Trainer saves (CheckpointManager) and reports. Nothing here touches a
disk or another rank, so every rule is a function of the numbers it is given.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import CheckpointSaveError

if TYPE_CHECKING:
    from ..config import CkptConfig
    from .manager import SaveResult

EPOCH, INTERVAL = "epoch", "interval"  # the `reason` a checkpoint's metadata records


@dataclass(frozen=True)
class SaveContext:
    """Where training stands when the Trainer asks whether to save."""

    epoch: int  # epochs completed
    global_step: int  # batches trained on since the start of the run
    epoch_end: bool  # asked after an epoch's validation (else after a batch inside the epoch)
    # ckpt.every_minutes elapsed: on any rank's clock, as the ranks agreed in the last step's message.
    minutes_due: bool = False


class SavePolicy:
    """`ckpt.every_epochs / every_steps / every_minutes` and `ckpt.max_failures` of one training process."""

    def __init__(self, ckpt: CkptConfig, epochs: int, clock: Callable[[], float] = time.monotonic):
        self.ckpt, self.epochs, self.clock = ckpt, epochs, clock
        self.failures = 0  # consecutive failed saves
        self._last_save_time = clock()  # a resumed process counts its minutes from its own start
        self._last_saved_step = -1

    def should_save(self, context: SaveContext) -> str | None:
        """The reason to save now ("epoch" at an epoch end, "interval" inside an epoch), or None.

        `every_steps` counts batches (global steps), not optimizer steps: with gradient accumulation
        a save every N steps comes every N batches, as it always has."""
        ckpt, epoch = self.ckpt, context.epoch
        every_steps = bool(ckpt.every_steps) and context.global_step % ckpt.every_steps == 0
        if context.epoch_end:
            every_epochs = epoch == self.epochs or (ckpt.every_epochs > 0 and epoch % ckpt.every_epochs == 0)
            return EPOCH if every_epochs or every_steps or context.minutes_due else None
        return INTERVAL if every_steps or context.minutes_due else None

    def clock_due(self) -> bool:
        """ckpt.every_minutes elapsed on this rank's clock (the ranks then agree in the step message)."""
        every_min = self.ckpt.every_minutes
        return bool(every_min) and self.clock() - self._last_save_time >= every_min * 60

    def is_saved(self, global_step: int) -> bool:
        """This exact state is already committed (or being committed)."""
        return global_step == self._last_saved_step

    def saved(self, global_step: int) -> None:
        self._last_save_time = self.clock()
        self._last_saved_step = global_step

    def resumed(self, global_step: int) -> None:
        """The checkpoint just loaded holds this step; the minutes still count from this process's start."""
        self._last_saved_step = global_step

    def record(self, result: SaveResult, final: bool = False) -> str | None:
        """Count a finished save: None when it succeeded, else the notice to print. A failed save is
        retried at the next interval; raises CheckpointSaveError after `ckpt.max_failures` consecutive
        failures, or when it was the run's last save (`final`)."""
        if result.error is None:
            self.failures = 0
            return None
        self.failures += 1
        limit = self.ckpt.max_failures
        if final or self.failures >= limit:
            raise CheckpointSaveError(
                f"{result.error} (failure {self.failures} of at most {limit}); training stopped, "
                "resume with --resume once the disk has room"
            )
        return (
            f"{result.error}; training continues and retries at the next interval "
            f"(failure {self.failures} of at most {limit})"
        )
