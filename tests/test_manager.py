"""CheckpointManager: background saves copy the state before it may change, report failures, and
never run two at once."""

import errno
import threading

import torch

from yolo_resume.checkpoint import format as fmt
from yolo_resume.checkpoint.manager import CheckpointManager
from yolo_resume.checkpoint.ref import resolve
from yolo_resume.checkpoint.store import LocalStore


def state(value: float) -> dict:
    return {"model": {"w": torch.full((256, 256), value)}, "train_state": {"global_step": 1}}


def test_async_save_captures_the_state_at_save_time(tmp_path):
    manager = CheckpointManager(tmp_path, async_save=True)
    live = state(1.0)
    manager.save(live, {"global_step": 1})
    manager.wait_snapshot()
    live["model"]["w"].add_(41.0)  # training goes on and mutates the weights in place
    manager.wait()
    [result] = manager.poll()
    assert result.error is None and result.name == "ckpt-000000001"
    saved, meta = fmt.load_checkpoint(tmp_path / "ckpt-000000001")
    assert torch.equal(saved["model"]["w"], torch.full((256, 256), 1.0))
    assert meta["digests"] == fmt.tensor_digests(state(1.0))


def test_at_most_one_save_in_flight(tmp_path):
    active, peak, lock = [0], [0], threading.Lock()

    class SlowStore(LocalStore):  # a store whose commits take a while, counting those in progress
        def commit(self, *args, **kwargs):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                threading.Event().wait(0.05)
                return super().commit(*args, **kwargs)
            finally:
                with lock:
                    active[0] -= 1

    manager = CheckpointManager(SlowStore(tmp_path), keep_last=10, async_save=True)
    for step in range(1, 5):
        manager.save(state(step), {"global_step": step})
    manager.wait()
    assert peak[0] == 1
    assert [r.name for r in manager.poll()] == [f"ckpt-00000000{i}" for i in range(1, 5)]


def test_failed_background_save_is_reported_not_raised(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, async_save=True)
    manager.save(state(1.0), {"global_step": 1})
    manager.wait()

    def full_disk(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fmt.os, "write", full_disk)
    manager.save(state(2.0), {"global_step": 2})  # does not raise in the training thread
    manager.wait()
    results = manager.poll()
    assert [r.error is None for r in results] == [True, False]
    assert "No space left on device" in str(results[1].error) and results[1].error.errno == errno.ENOSPC
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000001"]  # no temp folder left behind
    fmt.verify_checkpoint(tmp_path / "ckpt-000000001")


def test_existing_folder_for_the_same_step_is_kept_aside(tmp_path):
    manager = CheckpointManager(tmp_path)
    (tmp_path / "ckpt-000000003").mkdir()
    (tmp_path / "ckpt-000000003" / "junk").write_text("half a checkpoint")
    manager.save(state(3.0), {"global_step": 3})
    assert [r.error for r in manager.poll()] == [None]
    assert (tmp_path / "ckpt-000000003" / "manifest.json").exists()
    assert [p.name for p in tmp_path.glob("ckpt-000000003.superseded-*")]


def test_a_run_with_a_file_url_keeps_its_checkpoints_local(tmp_path):
    from yolo_resume.config import Config
    from yolo_resume.run_dir import RunDir

    cfg = Config()
    cfg.ckpt.dir = f"file://{tmp_path / 'elsewhere'}"  # a file:// URL is a local folder
    manager = RunDir(tmp_path / "run").checkpoints(cfg.ckpt)
    assert isinstance(manager.store, LocalStore) and manager.directory == tmp_path / "elsewhere"
    manager.save(state(2.0), {"global_step": 2})
    manager.wait()
    assert [r.error for r in manager.poll()] == [None]
    info = manager.get("ckpt-000000002", deep=True)
    assert info.valid and info.path == tmp_path / "elsewhere" / "ckpt-000000002"
    assert info.modified() == info.path.stat().st_mtime and info.size_bytes() > 256 * 256 * 4
    assert resolve(str(info.path)).one().info().meta["global_step"] == 2
    assert not (tmp_path / "run" / ".staging").exists()  # staging is only for remote checkpoints
