"""Checkpoints in object storage, against a real S3-protocol server (moto) on 127.0.0.1: the marker
commits, uncommitted and corrupt checkpoints are never used, a kill mid-upload loses nothing,
transient errors are retried, credentials are never stored; and a remote run resumes exactly."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import CREDENTIALS, TOTAL_STEPS, cli, final_ckpt, sets, step_rows

from yolo_resume.checkpoint import format as fmt
from yolo_resume.checkpoint.manager import CheckpointManager
from yolo_resume.checkpoint.object_store import ObjectStore, Retry
from yolo_resume.errors import CheckpointError

pytest.importorskip("s3fs")


def state(value: float) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "train_state": {"global_step": int(value)}}


def meta(step: int, fitness: float | None = None) -> dict:
    return {"global_step": step, "epoch": step, "step_in_epoch": 0, "metrics": {"fitness": fitness or 0.0}}


def manager(url, endpoint, tmp_path, retry=None, hooks=None, **kwargs) -> CheckpointManager:
    """A manager of the prefix `url`; with `hooks`, its store reaches S3 through a `Proxy` with them
    (fault injection through the store's own seam: the filesystem it is given)."""
    options, staging, retry = {"endpoint_url": endpoint}, tmp_path / ".staging", retry or Retry(delay_s=0.001)
    fs = None if hooks is None else Proxy(ObjectStore(url, options).fs, **hooks)
    return CheckpointManager(ObjectStore(url, options, staging, retry, fs=fs), **kwargs)


def save_all(mgr, steps):
    for step in steps:
        mgr.save(state(float(step)), meta(step, fitness=step / 100))
    mgr.wait()
    results = mgr.poll()
    assert [r.error for r in results] == [None] * len(results), results
    return results


def objects(s3, url):
    s3.invalidate_cache()
    root = url.removeprefix("s3://")
    return sorted(path[len(root) + 1 :] for path in s3.find(root))


def names(mgr):
    return [info.name for info in mgr.list()]


class Proxy:
    """Wraps an fsspec filesystem; `hooks[method](real, *args)` replaces a method; records threads."""

    def __init__(self, fs, **hooks):
        self.fs, self.hooks, self.calls = fs, hooks, []

    def __getattr__(self, attr):
        real = getattr(self.fs, attr)
        if not callable(real) or attr.startswith("_"):
            return real

        def call(*args, **kwargs):
            self.calls.append((attr, threading.current_thread().name))
            hook = self.hooks.get(attr)
            return hook(real, *args, **kwargs) if hook else real(*args, **kwargs)

        return call


def fail_first(n, exc_factory):
    count = [0]

    def hook(real, *args, **kwargs):
        count[0] += 1
        if count[0] <= n:
            raise exc_factory()
        return real(*args, **kwargs)

    return hook


# -- the manager against S3 -------------------------------------------------------------------
def test_save_list_pin_prune_load(url, endpoint, s3, tmp_path):
    mgr = manager(url, endpoint, tmp_path, hooks={}, keep_last=10, keep_best=0, async_save=True)
    proxy = mgr.store.fs
    save_all(mgr, [1, 2, 3, 4])
    # The upload ran in the background save thread, not in the caller's.
    uploads = {thread for method, thread in proxy.calls if method in ("put_file", "pipe_file")}
    assert uploads and all(thread.startswith("save-ckpt-") for thread in uploads)
    assert objects(s3, url) == sorted(
        [f"ckpt-00000000{i}/{f}" for i in range(1, 5) for f in fmt.DATA_FILES + (fmt.MANIFEST_FILE,)]
        + [f"ckpt-00000000{i}.committed" for i in range(1, 5)]
    )
    infos = mgr.list()
    assert [(i.name, i.valid, i.global_step, i.fitness) for i in infos] == [
        (f"ckpt-00000000{i}", True, i, i / 100) for i in range(1, 5)
    ]
    row = infos[-1].to_json()
    assert row["path"] == f"{url}/ckpt-000000004" and row["size_bytes"] == s3.du(f"{url}/ckpt-000000004")
    assert not (tmp_path / ".staging" / "ckpt-000000004").exists()  # the staged copy is gone

    mgr.pin("ckpt-000000002")
    assert [i.pinned for i in mgr.list()] == [False, True, False, False]
    assert [i.name for i in mgr.prune(keep_last=1, dry_run=True)] == ["ckpt-000000001", "ckpt-000000003"]
    assert names(mgr) == [f"ckpt-00000000{i}" for i in range(1, 5)]
    mgr.prune(keep_last=1)
    assert names(mgr) == ["ckpt-000000002", "ckpt-000000004"]
    assert not [o for o in objects(s3, url) if o.startswith(("ckpt-000000001", "ckpt-000000003"))]
    mgr.pin("ckpt-000000002", False)
    mgr.prune(keep_last=1)
    assert names(mgr) == ["ckpt-000000004"]
    with pytest.raises(CheckpointError, match="no committed checkpoint"):
        mgr.pin("ckpt-000000003")

    # A fresh manager (another process) finds, verifies and loads it; the downloaded copy is removed.
    other = manager(url, endpoint, tmp_path / "other", hooks={})
    info = other.latest_valid()
    assert info.name == "ckpt-000000004" and info.path == f"{url}/ckpt-000000004"
    proxy = other.store.fs
    proxy.calls.clear()
    loaded, loaded_meta = info.ref.load()  # loads the copy latest_valid verified: no new download
    assert torch.equal(loaded["model"]["w"], state(4.0)["model"]["w"])
    assert loaded_meta["digests"] == fmt.tensor_digests(state(4.0))
    assert [c for c in proxy.calls if c[0] == "get_file"] == []
    assert not any((tmp_path / "other" / ".staging").rglob("*.safetensors"))
    assert other.load(info.name)[1]["global_step"] == 4  # nothing cached now: downloaded and verified
    assert len([c for c in proxy.calls if c[0] == "get_file"]) == 4
    assert not any((tmp_path / "other" / ".staging").rglob("*.safetensors"))


def test_concurrent_loads_of_one_checkpoint_each_get_a_verified_copy(url, endpoint, s3, tmp_path):
    """Like the ranks of a DDP job resuming at once from the copy rank 0's latest_valid left behind."""
    save_all(manager(url, endpoint, tmp_path / "writer"), [5])
    ranks = [manager(url, endpoint, tmp_path) for _ in range(3)]  # one staging folder, as in one run
    info = ranks[0].latest_valid()
    results, errors = [], []

    def load(mgr):
        try:
            results.append(mgr.load(info.name)[0]["model"]["w"])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(mgr,)) for mgr in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(results) == 3
    assert all(torch.equal(w, state(5.0)["model"]["w"]) for w in results)
    assert not any((tmp_path / ".staging").rglob("*.safetensors"))


def test_uncommitted_prefix_is_invisible_and_replaced(url, endpoint, s3, tmp_path):
    mgr = manager(url, endpoint, tmp_path, keep_last=10)
    save_all(mgr, [1])
    root = url.removeprefix("s3://")
    # Files without a marker: a killed upload (5) and a half-written one of the next step (2).
    s3.copy(f"{root}/ckpt-000000001/", f"{root}/ckpt-000000005/", recursive=True)
    s3.pipe(f"{root}/ckpt-000000002/tensors.safetensors", b"half an upload")
    assert names(mgr) == ["ckpt-000000001"]
    assert mgr.latest_valid().name == "ckpt-000000001"
    assert mgr.prune(keep_last=0, dry_run=True) == []
    time.sleep(1.1)  # S3 timestamps have 1 s resolution: leftovers must be older than the next commit
    save_all(mgr, [2])
    assert names(mgr) == ["ckpt-000000001", "ckpt-000000002"]
    assert not [o for o in objects(s3, url) if o.startswith("ckpt-000000005")]  # garbage collected
    loaded, _ = mgr.load(mgr.latest_valid().name)
    assert torch.equal(loaded["model"]["w"], state(2.0)["model"]["w"])


def test_corrupt_remote_checkpoint_is_skipped_with_the_reason(url, endpoint, s3, tmp_path):
    mgr = manager(url, endpoint, tmp_path, keep_last=10)
    save_all(mgr, [1, 2, 3])
    root = url.removeprefix("s3://")
    tensors = f"{root}/ckpt-000000003/tensors.safetensors"
    data = bytearray(s3.cat(tensors))
    data[-100] ^= 0x10  # same size: only the hash can tell
    s3.pipe(tensors, bytes(data))
    s3.pipe(f"{root}/ckpt-000000002/meta.json", s3.cat(f"{root}/ckpt-000000002/meta.json").replace(b"1", b"7"))

    shallow = {i.name: i.error for i in mgr.list()}
    assert shallow["ckpt-000000003"] is None  # the tensors are only hashed by a deep check
    assert "meta.json" in shallow["ckpt-000000002"] and "XXH3-128 does not match" in shallow["ckpt-000000002"]
    skipped = []
    info = mgr.latest_valid(on_invalid=skipped.append)
    assert info.name == "ckpt-000000001"
    assert [s.name for s in skipped] == ["ckpt-000000003", "ckpt-000000002"]
    reason = skipped[0].error
    assert f"{url}/ckpt-000000003" in reason and "tensors.safetensors" in reason
    assert "XXH3-128 does not match" in reason and ".staging" not in reason and "\n" not in reason
    assert [i.valid for i in mgr.list(deep=True)] == [True, False, False]
    with pytest.raises(CheckpointError, match="tensors.safetensors"):
        mgr.load("ckpt-000000003")
    # A manifest changed after the commit no longer matches its marker.
    s3.pipe(f"{root}/ckpt-000000001/manifest.json", s3.cat(f"{root}/ckpt-000000001/manifest.json") + b" ")
    assert "commit marker" in mgr.list()[0].error


KILL_SCRIPT = """
import torch
from yolo_resume.checkpoint.manager import CheckpointManager
from yolo_resume.checkpoint.object_store import ObjectStore
mgr = CheckpointManager(ObjectStore({url!r}, {{"endpoint_url": {endpoint!r}}}, {staging!r}))
for step in (1, 2):
    state = {{"model": {{"w": torch.full((64, 64), float(step))}}}}
    mgr.save(state, {{"global_step": step}})
    assert [r.error for r in mgr.poll()] == [None]
"""


@pytest.mark.parametrize("stage, newest", [("upload_started", 1), ("before_marker", 1), ("after_marker", 2)])
def test_sigkill_during_upload_commits_nothing_half_done(url, endpoint, s3, tmp_path, stage, newest):
    script = KILL_SCRIPT.format(url=url, endpoint=endpoint, staging=str(tmp_path / "st"))
    killed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env={**os.environ, fmt.KILL_ENV: f"{stage}:2"},  # during the second save
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [o for o in objects(s3, url) if o.startswith("ckpt-000000002/")]  # the upload had started
    mgr = manager(url, endpoint, tmp_path, keep_last=10)
    assert names(mgr) == [f"ckpt-00000000{i}" for i in range(1, newest + 1)]
    assert mgr.latest_valid().name == f"ckpt-00000000{newest}"
    # The same step saves again: over the leftover files, or beside the committed one it moves aside.
    mgr.save({"model": {"w": torch.full((64, 64), 22.0)}}, {"global_step": 2})
    assert [r.error for r in mgr.poll()] == [None]
    assert [i.valid for i in mgr.list(deep=True)] == [True, True]
    assert torch.equal(mgr.load("ckpt-000000002")[0]["model"]["w"], torch.full((64, 64), 22.0))
    aside = {o.split("/")[0] for o in objects(s3, url) if ".superseded-" in o}
    assert len(aside) == (1 if newest == 2 else 0)


def test_transient_errors_are_retried_and_lasting_ones_reported(url, endpoint, s3, tmp_path):
    sleeps = []
    flaky = fail_first(2, lambda: ConnectionResetError(104, "Connection reset by peer"))
    retry = Retry(tries=4, delay_s=0.2, sleep=sleeps.append)
    mgr = manager(url, endpoint, tmp_path, retry=retry, hooks={"put_file": flaky}, keep_last=10)
    save_all(mgr, [1])
    assert sleeps == [0.2, 0.4]  # two retries with doubling backoff, then success
    assert [i.valid for i in mgr.list(deep=True)] == [True]

    sleeps.clear()
    mgr.store.fs.hooks["put_file"] = fail_first(99, lambda: TimeoutError("read timed out"))
    mgr.save(state(2.0), meta(2))
    [result] = mgr.poll()
    assert sleeps == [0.2, 0.4, 0.8]  # 4 tries in all
    message = str(result.error)
    assert "ckpt-000000002" in message and "gave up after 4 tries" in message and "untouched" in message
    assert "\n" not in message
    assert names(mgr) == ["ckpt-000000001"]  # nothing committed, the earlier one intact
    assert [i.valid for i in mgr.list(deep=True)] == [True]


def test_a_lasting_network_error_never_makes_a_checkpoint_look_corrupt(url, endpoint, s3, tmp_path):
    mgr = manager(url, endpoint, tmp_path, keep_last=10)
    save_all(mgr, [1, 2])
    refused = fail_first(99, lambda: ConnectionRefusedError(111, "refused"))
    other = manager(url, endpoint, tmp_path / "other", hooks={"cat_file": refused})  # must read meta.json
    for action in (other.list, other.latest_valid, lambda: other.prune(keep_last=0)):
        with pytest.raises(CheckpointError, match="gave up after 4 tries"):
            action()  # an error, not an invalid checkpoint to skip or delete
    assert [i.valid for i in mgr.list(deep=True)] == [True, True]


def test_missing_bucket_is_one_clear_error_without_retries(endpoint, tmp_path):
    sleeps = []
    mgr = CheckpointManager(
        ObjectStore("s3://no-such-bucket-yolo/x", {"endpoint_url": endpoint}, retry=Retry(sleep=sleeps.append))
    )
    with pytest.raises(CheckpointError) as err:
        mgr.list()
    message = str(err.value)
    assert "s3://no-such-bucket-yolo/x" in message and "create it" in message and "endpoint_url" in message
    assert sleeps == [] and "\n" not in message


def test_an_upload_that_does_not_match_is_never_committed(url, endpoint, s3, tmp_path):
    def truncate(real, local, remote, **kwargs):  # a broken transfer the server accepted
        if remote.endswith("tensors.safetensors"):
            return s3.pipe_file(remote, Path(local).read_bytes()[:-10])
        return real(local, remote, **kwargs)

    mgr = manager(url, endpoint, tmp_path, hooks={"put_file": truncate})
    mgr.save(state(1.0), meta(1))
    [result] = mgr.poll()
    assert "tensors.safetensors" in str(result.error) and "after the upload" in str(result.error)
    assert names(mgr) == [] and "ckpt-000000001.committed" not in objects(s3, url)


def test_a_remote_run_is_found_from_its_saved_config(url, endpoint, s3, tmp_path):
    from yolo_resume.checkpoint.ref import CheckpointRef, resolve
    from yolo_resume.checkpoint.store import open_store
    from yolo_resume.config import Config
    from yolo_resume.run_dir import RunDir, most_recent_run

    cfg = Config()
    cfg.ckpt.dir, cfg.ckpt.storage_options, cfg.ckpt.keep_last = url, {"endpoint_url": endpoint}, 10
    run = tmp_path / "runs" / "remote"
    run.mkdir(parents=True)
    RunDir(run).config_file.write_text(cfg.to_yaml())
    trainer_side = RunDir(run).checkpoints(cfg.ckpt)
    assert isinstance(trainer_side.store, ObjectStore) and trainer_side.store.staging_dir() == run / ".staging"
    save_all(trainer_side, [3, 4])

    assert RunDir(run).store().location == url  # from config.yaml; a str: never collapsed into a Path
    assert RunDir(run).has_checkpoints() and most_recent_run(tmp_path / "runs") == run
    assert [i.name for i in resolve(run).infos(deep=True)] == ["ckpt-000000003", "ckpt-000000004"]
    [one] = resolve(run / "ckpt-000000003").infos()  # RUN/ckpt-N of a remote run
    assert one.valid and one.path == f"{url}/ckpt-000000003"
    ref = CheckpointRef(open_store(url, {"endpoint_url": endpoint}), "ckpt-000000004")
    again = CheckpointRef.from_json(json.loads(json.dumps(ref.to_json())))  # as another DDP rank gets it
    assert ref.info().valid and again.info().get("global_step") == 4 and again.where == ref.where
    with resolve(run / "ckpt-000000004").one().local() as local:
        assert fmt.read_meta(local)["global_step"] == 4 and local.is_relative_to(run / ".staging")
    assert not local.exists()
    from yolo_resume.session import Session, TrainRequest

    _, resumed = Session(TrainRequest(resume=True), None, print, print)._resume_point(run)
    assert resumed.name == "ckpt-000000004" and resumed.ref.load()[1]["global_step"] == 4

    # The ckpt commands in-process: RUN/ckpt-N of a remote run, and a bare URL (endpoint from the env).
    from typer.testing import CliRunner

    from yolo_resume.cli import app

    runner = CliRunner()
    pinned = runner.invoke(app, ["ckpt", "pin", str(run / "ckpt-000000003")])
    assert pinned.exit_code == 0 and f"pinned {url}/ckpt-000000003" in pinned.output
    shown = runner.invoke(app, ["ckpt", "show", str(run / "ckpt-000000004"), "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["global_step"] == 4
    listed = runner.invoke(app, ["ckpt", "list", url, "--json"], env={"AWS_ENDPOINT_URL": endpoint})
    assert listed.exit_code == 0, listed.output
    assert [(r["name"], r["pinned"], r["valid"]) for r in json.loads(listed.output)] == [
        ("ckpt-000000003", True, True),
        ("ckpt-000000004", False, True),
    ]

    cfg.ckpt.dir = "s3://no-such-bucket-yolo/x"
    with pytest.raises(CheckpointError, match="no-such-bucket-yolo"):
        RunDir(tmp_path / "other").checkpoints(cfg.ckpt)  # before any training starts


# -- end to end through the CLI ----------------------------------------------------------------
def test_cli_remote_run_stops_resumes_exactly_and_ckpt_commands_manage_it(straight, url, endpoint, s3, tmp_path):
    options = f"{{endpoint_url: {endpoint}}}"
    # Saves at epoch ends and at the stop only (4 uploads of ~40 MB instead of 12): when a run saves
    # does not change what it computes, so it still matches the reference run that saved every step.
    remote = {"ckpt.dir": url, "ckpt.storage_options": options, "ckpt.every_steps": 0, "ckpt.keep_last": 2}
    args = ["train", "--run-dir", "run", "-q", *sets(straight / "data", **remote)]
    stopped = cli(*args, "--stop-after-steps", "5", cwd=tmp_path)
    assert stopped.returncode == 75, stopped.stdout + stopped.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing local but the staging scratch
    assert "ckpt-000000005.committed" in objects(s3, url)

    resumed = cli("train", "--resume", "--run-dir", "run", "-q", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "from ckpt-000000005" in resumed.stdout

    mgr = manager(url, endpoint, tmp_path / "check")
    final = mgr.get(f"ckpt-{TOTAL_STEPS:09d}")
    assert final.valid and final.meta["digests"] == fmt.read_meta(final_ckpt(straight / "run"))["digests"]
    assert step_rows(tmp_path / "run") == step_rows(straight / "run")
    # Retention ran remotely during training: keep_last 2, plus the best one by fitness.
    assert names(mgr)[-2:] == ["ckpt-000000008", "ckpt-000000012"] and len(names(mgr)) <= 3
    assert "ckpt-000000005" not in names(mgr)

    listed = cli("ckpt", "list", "run", "--json", "--fast", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["name"] for r in rows] == names(mgr) and all(r["valid"] for r in rows)
    assert all(r["path"].startswith(f"{url}/ckpt-") for r in rows)
    verified = cli("ckpt", "verify", "run", cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.count("ok") == len(rows) and f"{url}/ckpt-{TOTAL_STEPS:09d}" in verified.stdout
    pruned = cli("ckpt", "prune", "run", "--keep-last", "1", "--keep-best", "0", cwd=tmp_path)
    assert pruned.returncode == 0, pruned.stderr
    assert names(mgr) == [f"ckpt-{TOTAL_STEPS:09d}"]
    assert f"deleting {rows[0]['path']}" in pruned.stdout

    # No credential anywhere: not in an uploaded object, the run folder, or the output.
    secrets = [CREDENTIALS["AWS_ACCESS_KEY_ID"].encode(), CREDENTIALS["AWS_SECRET_ACCESS_KEY"].encode()]
    root = url.removeprefix("s3://").split("/")[0]
    s3.invalidate_cache()
    blobs = [s3.cat_file(path) for path in s3.find(root)]
    blobs += [p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()]
    blobs += [(r.stdout + r.stderr).encode() for r in (stopped, resumed, listed, verified, pruned)]
    assert blobs and not [b for b in blobs for secret in secrets if secret in b]
    assert final.meta["config"]["ckpt"]["storage_options"] == {"endpoint_url": endpoint}


def test_cli_train_into_a_missing_bucket_stops_before_training(endpoint, tmp_path):
    options = f"{{endpoint_url: {endpoint}}}"
    remote = {"ckpt.dir": "s3://no-such-bucket-yolo/x", "ckpt.storage_options": options}
    result = cli("train", "--run-dir", "run", "-q", *sets(tmp_path / "data", **remote), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.strip().splitlines()
    assert "s3://no-such-bucket-yolo/x" in line and "create it" in line and "Traceback" not in line
    assert not (tmp_path / "run" / "steps.csv").exists()  # not a single step trained


def test_digest_of_remote_checkpoint_matches_local_format(url, endpoint, s3, tmp_path):
    """The remote copy is byte-for-byte the local format: its manifest hashes the uploaded files."""
    mgr = manager(url, endpoint, tmp_path)
    save_all(mgr, [7])
    root = url.removeprefix("s3://")
    manifest = json.loads(s3.cat(f"{root}/ckpt-000000007/manifest.json"))
    assert manifest["algorithm"] == fmt.CHECKSUM.name
    for name, entry in manifest["files"].items():
        assert fmt.CHECKSUM.hexdigest(s3.cat(f"{root}/ckpt-000000007/{name}")) == entry["digest"]
    marker = json.loads(s3.cat(f"{root}/ckpt-000000007.committed"))
    expected = hashlib.sha256(s3.cat(f"{root}/ckpt-000000007/manifest.json")).hexdigest()
    assert marker["manifest_sha256"] == expected
    assert Path(tmp_path / ".staging").is_dir() and not (tmp_path / ".staging" / "ckpt-000000007").exists()
