"""Retention policies are pure functions: tested on lists, never on a disk."""

from hypothesis import given
from hypothesis import strategies as st

from yolo_resume.checkpoint.retention import Candidate, keep_best, keep_every, keep_last, plan_prune


def cand(step, valid=True, fitness=None, pinned=False, epoch_end=False, epoch=0):
    return Candidate(f"ckpt-{step:09d}", step, epoch, valid, fitness, pinned, epoch_end)


candidates = st.lists(
    st.builds(
        cand,
        step=st.integers(0, 10_000),
        valid=st.booleans(),
        fitness=st.none() | st.floats(0, 1),
        pinned=st.booleans(),
        epoch_end=st.booleans(),
        epoch=st.integers(0, 50),
    ),
    max_size=25,
    unique_by=lambda c: c.global_step,
)


@given(candidates, st.integers(0, 5), st.integers(0, 3), st.integers(0, 5))
def test_prune_never_deletes_newest_valid_best_or_pinned(ckpts, n, k, e):
    doomed = {c.name for c in plan_prune(ckpts, n, k, e)}
    valid = [c for c in ckpts if c.valid]
    if valid:
        assert max(valid, key=lambda c: c.global_step).name not in doomed
    assert not doomed & {c.name for c in ckpts if c.pinned}
    assert not doomed & keep_best(ckpts, k)
    assert not doomed & keep_last(ckpts, n)
    assert not doomed & keep_every(ckpts, e)


@given(candidates, st.integers(1, 5))
def test_prune_keeps_at_most_needed_valid_ones(ckpts, n):
    doomed = {c.name for c in plan_prune(ckpts, n, keep_best_k=0)}
    kept_valid_unpinned = [c for c in ckpts if c.valid and not c.pinned and c.name not in doomed]
    assert len(kept_valid_unpinned) <= n


def test_examples():
    ckpts = [cand(1, fitness=0.9), cand(2, fitness=0.1), cand(3, fitness=0.2), cand(4, valid=False)]
    assert [c.name for c in plan_prune(ckpts, keep_last_n=1, keep_best_k=1)] == ["ckpt-000000002"]
    # A corrupt checkpoint newer than every valid one is kept for inspection...
    assert "ckpt-000000004" not in {c.name for c in plan_prune(ckpts, 1, 0)}
    # ...an old corrupt one is cleaned up.
    old_bad = [cand(1, valid=False), cand(2), cand(3)]
    assert [c.name for c in plan_prune(old_bad, 1, 0)] == ["ckpt-000000001", "ckpt-000000002"]
    milestones = [cand(s, epoch=s, epoch_end=True) for s in range(1, 7)]
    assert {c.name for c in plan_prune(milestones, 1, 0, 2)} == {
        "ckpt-000000001",
        "ckpt-000000003",
        "ckpt-000000005",
    }
