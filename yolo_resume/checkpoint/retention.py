"""Retention policies: pure functions over a list of checkpoints, shared by the trainer and `ckpt prune`.

Each policy returns the names it wants to keep; a checkpoint is deleted only when no policy keeps
it. Invalid checkpoints are never chosen by a policy, but the newest valid one always survives.

"Newest" is newest on the current timeline: checkpoints are ordered by when the segment that wrote
them started (`timeline`), then by step. A branch (a resume from an older checkpoint) is a newer
timeline than the steps it abandoned, even where those have higher step numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """What retention needs to know about one checkpoint."""

    name: str
    global_step: int
    epoch: int
    valid: bool
    fitness: float | None = None
    pinned: bool = False
    epoch_end: bool = False
    timeline: str = ""  # when the segment that wrote it started (UTC ISO 8601; "" for the first segment)


def newest_first(ckpts: Sequence[Candidate]) -> list[Candidate]:
    """Newest on the current timeline first: by segment start, then by step."""
    return sorted(ckpts, key=lambda c: (c.timeline, c.global_step), reverse=True)


def keep_last(ckpts: Sequence[Candidate], n: int) -> set[str]:
    valid = newest_first([c for c in ckpts if c.valid])
    return {c.name for c in valid[:n]} if n > 0 else set()


def keep_best(ckpts: Sequence[Candidate], k: int) -> set[str]:
    scored = [c for c in ckpts if c.valid and c.fitness is not None]
    scored.sort(key=lambda c: (c.fitness, c.global_step), reverse=True)
    return {c.name for c in scored[:k]} if k > 0 else set()


def keep_every(ckpts: Sequence[Candidate], every_epochs: int) -> set[str]:
    """Epoch-end checkpoints whose epoch is a multiple of `every_epochs` (long-term milestones)."""
    if every_epochs <= 0:
        return set()
    return {c.name for c in ckpts if c.valid and c.epoch_end and c.epoch % every_epochs == 0}


def keep_pinned(ckpts: Sequence[Candidate]) -> set[str]:
    return {c.name for c in ckpts if c.pinned}


def keep_newest_valid(ckpts: Sequence[Candidate]) -> set[str]:
    return keep_last(ckpts, 1)


def plan_prune(
    ckpts: Sequence[Candidate], keep_last_n: int, keep_best_k: int = 1, keep_every_e: int = 0
) -> list[Candidate]:
    """Checkpoints to delete, oldest first. Newest valid and pinned ones always stay."""
    keep = (
        keep_last(ckpts, keep_last_n)
        | keep_best(ckpts, keep_best_k)
        | keep_every(ckpts, keep_every_e)
        | keep_pinned(ckpts)
        | keep_newest_valid(ckpts)
    )
    # An invalid checkpoint newer than every valid one is evidence of a crash: keep it for inspection.
    newest_valid = max((c.global_step for c in ckpts if c.valid), default=-1)
    doomed = [c for c in ckpts if c.name not in keep and (c.valid or c.global_step < newest_valid)]
    return sorted(doomed, key=lambda c: c.global_step)
