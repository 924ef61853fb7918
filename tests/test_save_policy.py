"""SavePolicy: when to save and when failed saves stop training, without a disk or a model."""

from types import SimpleNamespace

import pytest

from yolo_resume.checkpoint.save_policy import SaveContext, SavePolicy
from yolo_resume.config import CkptConfig
from yolo_resume.errors import CheckpointError, CheckpointSaveError


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def policy(epochs: int = 10, clock=None, **ckpt) -> SavePolicy:
    return SavePolicy(CkptConfig(**ckpt), epochs, clock or Clock())


def after_batch(step: int, minutes_due: bool = False) -> SaveContext:
    return SaveContext(epoch=0, global_step=step, epoch_end=False, minutes_due=minutes_due)


def at_epoch_end(epoch: int, step: int = 1, minutes_due: bool = False) -> SaveContext:
    return SaveContext(epoch=epoch, global_step=step, epoch_end=True, minutes_due=minutes_due)


def test_every_epochs_and_the_last_epoch():
    p = policy(epochs=7, every_epochs=3)
    assert [e for e in range(1, 8) if p.should_save(at_epoch_end(e))] == [3, 6, 7]
    assert p.should_save(at_epoch_end(3)) == "epoch"
    never = policy(epochs=4, every_epochs=0)
    assert [e for e in range(1, 5) if never.should_save(at_epoch_end(e))] == [4]  # the last one always


def test_every_steps_counts_batches_inside_and_at_the_end_of_an_epoch():
    p = policy(every_epochs=0, every_steps=4)
    assert [s for s in range(1, 13) if p.should_save(after_batch(s))] == [4, 8, 12]
    assert p.should_save(after_batch(8)) == "interval"
    assert p.should_save(at_epoch_end(1, step=8)) == "epoch" and p.should_save(at_epoch_end(1, step=9)) is None
    assert policy(every_steps=0).should_save(after_batch(4)) is None


def test_minutes_count_from_the_last_save_and_the_ranks_agreement_decides():
    clock = Clock()
    p = policy(clock=clock, every_minutes=2.0)
    clock.now += 119
    assert not p.clock_due()
    clock.now += 1
    assert p.clock_due()
    assert p.should_save(after_batch(5)) is None  # what this rank's clock says only counts once agreed
    assert p.should_save(after_batch(5, minutes_due=True)) == "interval"
    assert p.should_save(at_epoch_end(1, minutes_due=True)) == "epoch"
    p.saved(5)
    assert not p.clock_due()
    assert not policy(clock=clock, every_minutes=0).clock_due()


def test_a_saved_or_resumed_step_is_not_saved_again_and_a_resume_keeps_the_clock():
    clock = Clock()
    p = policy(clock=clock, every_minutes=1.0)
    assert not p.is_saved(0)
    clock.now += 60
    p.resumed(6)
    assert p.is_saved(6) and not p.is_saved(7) and p.clock_due()
    p.saved(7)
    assert p.is_saved(7) and not p.clock_due()


def failed(name: str = "ckpt-000000001"):
    """A CheckpointManager.poll result (SaveResult) of a save that failed."""
    return SimpleNamespace(name=name, error=CheckpointError(f"could not save {name}: disk full"))


SUCCEEDED = SimpleNamespace(name="ckpt-000000002", error=None)


def test_consecutive_failures_stop_training_a_success_resets_the_count():
    p = policy(max_failures=3)
    assert "failure 1 of at most 3" in p.record(failed())
    assert "failure 2 of at most 3" in p.record(failed())
    assert p.record(SUCCEEDED) is None
    assert "training continues" in p.record(failed())
    p.record(failed())
    with pytest.raises(CheckpointSaveError, match="failure 3 of at most 3"):
        p.record(failed())


def test_a_failed_final_save_stops_at_once():
    p = policy(max_failures=3)
    assert p.record(SUCCEEDED, final=True) is None
    with pytest.raises(CheckpointSaveError, match="failure 1 of at most 3.*resume with --resume"):
        p.record(failed(), final=True)
