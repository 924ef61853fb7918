"""The `Store` contract: every behaviour the manager, the resolver and the CLI rely on, run against
both stores — a local folder and a prefix on a real S3-protocol server (moto). Backend-only
matters (retries, markers, kills mid-upload) stay in test_remote_store.py and test_checkpoint_format.py."""

import os
import shutil
import time

import pytest
import torch

from yolo_resume.checkpoint import format as fmt
from yolo_resume.checkpoint.manager import CheckpointManager
from yolo_resume.checkpoint.ref import CheckpointRef
from yolo_resume.checkpoint.store import LocalStore, Store, checkpoint_name, open_store
from yolo_resume.errors import CheckpointError

pytest.importorskip("s3fs")


class LocalBackend:
    """A LocalStore, and what a test needs to reach behind it (to corrupt, or to leave debris)."""

    def __init__(self, tmp_path):
        self.root = tmp_path / "checkpoints"
        self.store = LocalStore(self.root)

    def rewrite(self, name, file, change):
        path = self.root / name / file
        path.write_bytes(change(path.read_bytes()))

    def leave_unfinished(self, name):
        """What a save killed before its commit leaves: a temporary folder."""
        (self.root / f"{fmt.TMP_PREFIX}{name}-999999-abcd").mkdir(parents=True)

    def leave_half_deleted(self, name):
        """What a delete killed midway leaves: a renamed, half-removed folder."""
        shutil.copytree(self.root / name, self.root / f".trash-{name}-999999")

    def raw_names(self):
        return sorted(os.listdir(self.root))


class ObjectBackend:
    def __init__(self, url, endpoint, s3, tmp_path):
        self.s3, self.root = s3, url.removeprefix("s3://")
        self.store = open_store(url, {"endpoint_url": endpoint}, tmp_path / ".staging")

    def rewrite(self, name, file, change):
        path = f"{self.root}/{name}/{file}"
        self.s3.pipe(path, change(self.s3.cat(path)))

    def leave_unfinished(self, name):
        """What an upload killed before its marker leaves: objects without a commit marker."""
        self.s3.pipe(f"{self.root}/{name}/tensors.safetensors", b"half an upload")

    def leave_half_deleted(self, name):
        """What a delete killed midway leaves: the files, their marker already gone."""
        self.s3.copy(f"{self.root}/{name}/", f"{self.root}/{checkpoint_name(999)}/", recursive=True)

    def raw_names(self):
        self.s3.invalidate_cache()
        return sorted({p[len(self.root) + 1 :].split("/")[0] for p in self.s3.find(self.root)})


@pytest.fixture(params=["local", "object"])
def backend(request, tmp_path):
    if request.param == "local":
        return LocalBackend(tmp_path)
    return ObjectBackend(
        request.getfixturevalue("url"), request.getfixturevalue("endpoint"), request.getfixturevalue("s3"), tmp_path
    )


def state(value: float) -> dict:
    return {"model": {"w": torch.full((32, 32), value)}, "train_state": {"global_step": int(value)}}


def commit(store: Store, step: int, fitness: float = 0.0) -> str:
    name = checkpoint_name(step)
    meta = {"global_step": step, "epoch": step, "step_in_epoch": 0, "metrics": {"fitness": fitness}}
    store.commit(name, state(float(step)), meta)
    return name


def test_a_commit_is_listed_read_verified_and_opened(backend):
    store = backend.store
    assert isinstance(store, Store) and store.entries() == {}
    name = commit(store, 3)
    [entry] = store.entries().values()
    assert entry.name == name and entry.size > 32 * 32 * 4 and entry.mtime > time.time() - 600 and not entry.pinned
    assert store.entry(name) == entry
    assert store.read_meta(name)["global_step"] == 3
    store.verify(name)
    with store.open(name) as local:
        loaded, meta = fmt.load_checkpoint(local)
    assert torch.equal(loaded["model"]["w"], state(3.0)["model"]["w"]) and meta["epoch"] == 3
    assert str(store.where(name)).endswith(f"/{name}")


def test_entries_are_oldest_first_and_only_committed(backend):
    store = backend.store
    for step in (12, 3, 100):
        commit(store, step)
    backend.leave_unfinished(checkpoint_name(200))
    assert list(store.entries()) == [checkpoint_name(s) for s in (3, 12, 100)]
    with pytest.raises(CheckpointError, match=checkpoint_name(200)):
        store.entry(checkpoint_name(200))


def test_a_recommit_of_the_same_step_keeps_the_old_one_aside(backend):
    store = backend.store
    name = commit(store, 5)
    store.commit(name, state(55.0), {"global_step": 5})
    assert list(store.entries()) == [name]
    with store.open(name) as local:
        assert torch.equal(fmt.load_checkpoint(local)[0]["model"]["w"], state(55.0)["model"]["w"])
    assert [n for n in backend.raw_names() if n.startswith(f"{name}.superseded-")]


def test_pin_unpin_and_pinning_a_missing_checkpoint(backend):
    store = backend.store
    name = commit(store, 1)
    store.pin(name, True)
    assert store.entry(name).pinned
    store.pin(name, False)
    assert not store.entry(name).pinned
    with pytest.raises(CheckpointError):
        store.pin(checkpoint_name(2), True)


def test_delete_removes_one_and_leaves_the_others(backend):
    store = backend.store
    first, second = commit(store, 1), commit(store, 2)
    store.delete(first)
    assert list(store.entries()) == [second]
    store.verify(second)


def test_a_corrupt_checkpoint_is_refused_naming_the_file(backend):
    store = backend.store
    tensors, meta = commit(store, 1), commit(store, 2)
    backend.rewrite(tensors, fmt.TENSORS_FILE, lambda b: b[:-40] + bytes(x ^ 1 for x in b[-40:]))  # same size
    backend.rewrite(meta, fmt.META_FILE, lambda b: b.replace(b"2", b"7"))
    store.read_meta(tensors)  # only a deep check hashes the tensors
    with pytest.raises(CheckpointError, match="tensors.safetensors.*XXH3-128 does not match") as err:
        store.verify(tensors)
    assert str(store.where(tensors)) in str(err.value) and ".staging" not in str(err.value)
    with pytest.raises(CheckpointError, match="meta.json.*XXH3-128 does not match"):
        store.read_meta(meta)


def test_sweep_removes_what_killed_saves_and_deletions_left(backend):
    store = backend.store
    kept = commit(store, 1)
    backend.leave_half_deleted(kept)
    time.sleep(1.1)  # S3 timestamps have 1 s resolution: leftovers must be older than the commit
    newest = commit(store, 2)

    def debris():
        return [n for n in backend.raw_names() if not n.startswith((kept, newest))]

    assert debris()
    store.sweep(newest)
    assert list(store.entries()) == [kept, newest] and debris() == []


def test_the_address_reopens_the_same_store(backend):
    store = backend.store
    name = commit(store, 4)
    again = open_store(**store.address())
    assert list(again.entries()) == [name] and again.where(name) == store.where(name)
    ref = CheckpointRef.from_json(CheckpointRef(store, name).to_json())
    assert ref.load()[1]["global_step"] == 4


def test_the_manager_saves_prunes_and_finds_the_latest_valid_the_same_on_both(backend):
    manager = CheckpointManager(backend.store, keep_last=2, keep_best=1, async_save=True)
    for step, fitness in ((1, 0.9), (2, 0.1), (3, 0.2), (4, 0.3)):
        manager.save(
            state(float(step)),
            {"global_step": step, "epoch": step, "step_in_epoch": 0, "metrics": {"fitness": fitness}},
        )
    manager.wait()
    assert [(r.error, r.cleanup_error) for r in manager.poll()] == [(None, None)] * 4
    assert [i.name for i in manager.list()] == [checkpoint_name(s) for s in (1, 3, 4)]  # best + last 2
    backend.rewrite(checkpoint_name(4), fmt.TENSORS_FILE, lambda b: b[:-1] + bytes([b[-1] ^ 1]))
    skipped = []
    latest = manager.latest_valid(on_invalid=skipped.append)
    assert latest.name == checkpoint_name(3) and [s.name for s in skipped] == [checkpoint_name(4)]
    assert torch.equal(latest.ref.load()[0]["model"]["w"], state(3.0)["model"]["w"])
