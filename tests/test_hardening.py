"""Issue 12: nothing trusted from a checkpoint, run-folder files crash-safe. Crafted files, in process
where the claim is about a library function; the plan of a `train` command is built without training."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import final_ckpt

from yolo_resume.checkpoint.format import load_checkpoint, read_meta, write_checkpoint
from yolo_resume.distributed import Distributed
from yolo_resume.errors import UserError
from yolo_resume.session import Session, TrainRequest


def plan_of(**request):
    """What `train` would do (run folder, config, checkpoint), decided as rank 0 does, lease released."""
    session = Session(TrainRequest(**request), Distributed(), lambda *a, **k: None, lambda *a: None)
    try:
        return session.plan()
    finally:
        session.release()


def craft(straight: Path, dest: Path, step: int = 4, **meta_changes) -> Path:
    """A copy of a reference checkpoint at `dest/ckpt-N` whose meta.json says what `meta_changes` say."""
    source = final_ckpt(straight / "run", step)
    state, _ = load_checkpoint(source)
    meta = json.loads(json.dumps(read_meta(source)))
    for key, value in meta_changes.items():
        target, *path = key.split("__")
        node = meta
        for part in [target, *path][:-1]:
            node = node[part]
        node[[target, *path][-1]] = value
    write_checkpoint(dest, source.name, state, meta)
    return dest / source.name


# -- item 2: where a resumed run writes -------------------------------------------------------------
@pytest.fixture
def victim(straight, tmp_path):
    """Another run on this machine, which a crafted checkpoint names as its run folder and ckpt.dir."""
    run = tmp_path / "victim"
    shutil.copytree(final_ckpt(straight / "run", 8), final_ckpt(run, 8))
    return run


def test_a_checkpoint_copied_elsewhere_never_names_where_the_run_writes(straight, tmp_path, victim):
    hostile = {"run_dir": str(victim), "config__ckpt__dir": str(victim / "checkpoints"), "config__ckpt__keep_last": 1}
    loose = craft(straight, tmp_path / "downloads", **hostile)
    with pytest.raises(UserError, match="pass --run-dir: .* is not inside a run folder"):
        plan_of(resume=True, resume_from=str(loose))
    into = plan_of(resume=True, resume_from=str(loose), run_dir=tmp_path / "b")
    assert into.run_dir == tmp_path / "b" and into.config["ckpt"]["dir"] == ""  # b's own checkpoints folder
    in_place = craft(straight, tmp_path / "c" / "checkpoints", **hostile)
    plan = plan_of(resume=True, resume_from=str(in_place))
    assert plan.run_dir == tmp_path / "c" and plan.config["ckpt"]["dir"] == ""
    assert sorted(p.name for p in (victim / "checkpoints").iterdir()) == ["ckpt-000000008"]


# -- item 3: a crafted checkpoint costs its own use, never the run ----------------------------------
def remanifest(ckpt: Path, digests: dict | None = None) -> None:
    """Rewrite a checkpoint's manifest over its current files, as a forger would."""
    import hashlib

    files = {}
    for name in ("tensors.safetensors", "state.json", "meta.json"):
        path = ckpt / name
        digest = (digests or {}).get(name) or hashlib.sha256(path.read_bytes()).hexdigest()
        files[name] = {"size": path.stat().st_size, "sha256": digest}
    doc = {"format": "yolo-resume-checkpoint", "format_version": 1, "files": files}
    (ckpt / "manifest.json").write_text(json.dumps(doc))


def test_deeply_nested_meta_is_skipped_with_its_reason(straight, tmp_path):
    from yolo_resume.checkpoint.manager import CheckpointManager
    from yolo_resume.checkpoint.ref import resolve

    run = tmp_path / "run"
    shutil.copytree(final_ckpt(straight / "run", 4), final_ckpt(run, 4))
    bad = final_ckpt(run, 5)
    shutil.copytree(final_ckpt(straight / "run", 5), bad)
    (bad / "meta.json").write_text('{"global_step": 5, "x": ' + "[" * 900 + "]" * 900 + "}")
    remanifest(bad)
    infos = resolve(str(run)).infos(deep=True)  # ckpt list / ckpt verify
    assert [i.valid for i in infos] == [True, False] and "nested deeper than 64 levels" in infos[1].error
    skipped = []
    newest = CheckpointManager(run / "checkpoints").latest_valid(on_invalid=skipped.append)  # --resume
    assert newest.name == "ckpt-000000004" and [s.name for s in skipped] == ["ckpt-000000005"]


def test_sparse_tensor_file_is_refused_before_it_is_hashed(straight, tmp_path):
    import struct
    import time

    from yolo_resume.checkpoint.format import verify_checkpoint
    from yolo_resume.errors import CheckpointError

    ckpt = tmp_path / "checkpoints" / "ckpt-000000004"
    shutil.copytree(final_ckpt(straight / "run", 4), ckpt)
    size = 1 << 40  # 1 TiB of holes, described by a header that covers it exactly
    header = json.dumps({"t": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    with open(ckpt / "tensors.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)
    (ckpt / "state.json").write_text('{"t": {"__tensor__": "t"}}')
    remanifest(ckpt, {"tensors.safetensors": "0" * 64})
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="is a sparse file"):
        verify_checkpoint(ckpt)
    assert time.monotonic() - started < 5


# -- item 6: run files that resume depends on survive a kill mid-write -------------------------------
def test_a_kill_inside_the_config_write_leaves_the_old_file(tmp_path, monkeypatch):
    import os

    from yolo_resume.config import load_config
    from yolo_resume.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    cfg = load_config(None)
    run.write_config(cfg)
    before = run.config_file.read_bytes()
    cfg.train.epochs += 1

    def killed(*args):
        raise SystemExit("SIGKILL here")

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(SystemExit):
        run.write_config(cfg)
    assert run.config_file.read_bytes() == before


def test_auto_resume_finds_a_custom_ckpt_dir_when_config_yaml_is_torn(straight, tmp_path):
    from yolo_resume.config import from_dict
    from yolo_resume.run_dir import RunDir

    elsewhere = tmp_path / "volume" / "ckpts"
    shutil.copytree(final_ckpt(straight / "run", 4), elsewhere / "ckpt-000000004")
    cfg = from_dict(read_meta(final_ckpt(straight / "run", 4))["config"])
    cfg.ckpt.dir = str(elsewhere)
    run = RunDir(tmp_path / "run")
    run.write_config(cfg)
    run.config_file.write_text("")  # what a SIGKILL inside an in-place rewrite left
    assert Path(run.store().location) == elsewhere
    plan = plan_of(auto_resume=True, run_dir=run.path)
    assert plan.checkpoint is not None and plan.checkpoint["name"] == "ckpt-000000004"
    assert plan.config["ckpt"]["dir"] == str(elsewhere)


# -- item 7: steps.csv repaired against the checkpoint -----------------------------------------------
def test_step_log_is_repaired_against_the_checkpoint_and_the_gap_recorded(tmp_path):
    from yolo_resume.lineage import interruption_entry
    from yolo_resume.run_log import STEP_FIELDS, RunLog

    row = "{},0,{},0.01,1.0,2.0,3.0\n"
    steps = tmp_path / "steps.csv"
    with open(steps, "wb") as f:
        f.write((",".join(STEP_FIELDS) + "\n").encode())
        f.write("".join(row.format(s, s) for s in (1, 2, 3, 3)).encode())
        f.write(b"\x00\xff\xfe garbage, 1,2\n")
        f.write(row.format(7, 7).encode() + row.format(8, 8)[:9].encode())  # the last row torn
    notices = []
    RunLog(tmp_path, True, notices.append).on_resume(8)
    assert [line.split(",")[0] for line in steps.read_text().splitlines()[1:]] == ["1", "2", "3", "7"]
    (message,) = notices
    assert "dropped 2 torn or unreadable row(s)" in message and "removed 1 duplicate" in message
    assert "no rows for global step(s) 4-6, 8" in message
    entry = interruption_entry(tmp_path, 1, "ckpt-000000008", 8, 7)
    assert entry["steps_log_repaired"]["missing_steps"] == [(4, 6), (8, 8)]


# -- item 8: garbage and FIFOs in the run folder ------------------------------------------------------
def _returns_within(seconds, fn):
    import threading

    outcome = {}

    def call():
        try:
            outcome["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn} hung"
    return outcome


def test_fifo_run_files_give_one_line_never_a_hang(straight, tmp_path):
    import os

    from yolo_resume.files import RunFileError
    from yolo_resume.run_log import RunLog

    run = tmp_path / "run"
    shutil.copytree(final_ckpt(straight / "run", 4), final_ckpt(run, 4))
    os.mkfifo(run / "segments.jsonl")
    got = _returns_within(20, lambda: plan_of(resume=True, run_dir=run))
    assert isinstance(got.get("error"), RunFileError) and "is a FIFO (named pipe)" in str(got["error"])
    os.mkfifo(run / "steps.csv")
    got = _returns_within(5, lambda: RunLog(run, True, print).on_resume(4))
    assert isinstance(got.get("error"), RunFileError) and "steps.csv` is a FIFO" in str(got["error"])


def test_binary_garbage_in_run_files_is_repaired_or_ignored(tmp_path):
    from yolo_resume.lineage import KILLED, last_segment_status
    from yolo_resume.run_dir import RunDir

    run = RunDir(tmp_path)
    garbage = bytes(range(256)) * 4
    run.segments_file.write_bytes(b'{"event": "start", "segment": 1, "pid": 7}\n[1, 2]\n' + garbage)
    assert last_segment_status(tmp_path) == KILLED
    run.config_file.write_bytes(garbage)
    assert Path(run.store().location) == run.default_checkpoints


# -- item 9: newest means newest on the current timeline ---------------------------------------------
def test_a_killed_branch_wins_over_the_newer_steps_it_abandoned(straight, tmp_path):
    from yolo_resume.checkpoint import retention
    from yolo_resume.checkpoint.manager import CheckpointManager

    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (4, 7, 8):  # the first timeline (never resumed)
        shutil.copytree(final_ckpt(straight / "run", step), checkpoints / f"ckpt-{step:09d}")
    branch = [{"segment": 1, "resumed_from": "ckpt-000000004", "when": "2026-01-01T00:00:00+00:00"}]
    for step in (5, 6):  # --resume-from ckpt-4 --epochs 5, killed before reaching step 7
        craft(straight, checkpoints, step=step, lineage=branch, segment=1)
    manager = CheckpointManager(checkpoints, keep_last=1, keep_best=0)
    assert manager.latest_valid().name == "ckpt-000000006"
    doomed = {c.name for c in retention.plan_prune([i.candidate() for i in manager.list()], 1, 0)}
    assert doomed == {"ckpt-000000004", "ckpt-000000005", "ckpt-000000007", "ckpt-000000008"}


# -- item 10: leftovers of kills are cleaned up ------------------------------------------------------
def test_trash_and_superseded_leftovers_are_swept_at_the_next_start(straight, tmp_path):
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    shutil.copytree(final_ckpt(straight / "run", 4), checkpoints / "ckpt-000000004")
    shutil.copytree(final_ckpt(straight / "run", 4), checkpoints / ".trash-ckpt-000000003-999")  # killed delete
    shutil.copytree(final_ckpt(straight / "run", 4), checkpoints / "ckpt-000000002.superseded-1700000000")
    shutil.copytree(final_ckpt(straight / "run", 4), checkpoints / "ckpt-000000004.superseded-1700000000")
    plan_of(resume=True, run_dir=run)
    # The copy moved aside by ckpt-4 lives as long as ckpt-4; the others' checkpoints are gone.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["ckpt-000000004", "ckpt-000000004.superseded-1700000000"]


# -- issue 11: `ckpt prune` without flags applies the run's own retention ----------------------------
def test_prune_without_flags_uses_the_runs_own_retention_and_says_so(straight, tmp_path):
    from typer.testing import CliRunner

    from yolo_resume.cli import app
    from yolo_resume.config import from_dict
    from yolo_resume.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    for step in (4, 8, 12):
        shutil.copytree(final_ckpt(straight / "run", step), final_ckpt(run.path, step))
    cfg = from_dict(read_meta(final_ckpt(straight / "run", 4))["config"])
    cfg.ckpt.keep_last, cfg.ckpt.keep_best = 2, 0
    run.write_config(cfg)
    result = CliRunner().invoke(app, ["ckpt", "prune", str(run.path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "retention: keep_last=2, keep_best=0, keep_every=0 (the run's own settings, from" in result.stdout
    assert (
        "would delete" in result.stdout and "ckpt-000000004" in result.stdout and "ckpt-000000008 " not in result.stdout
    )


def test_prune_never_deletes_while_a_training_writes_the_run(straight, tmp_path):
    import os

    from typer.testing import CliRunner

    from yolo_resume.cli import app
    from yolo_resume.lease import Holder
    from yolo_resume.run_dir import RunDir

    run = RunDir(tmp_path / "run")
    for step in (4, 8):
        shutil.copytree(final_ckpt(straight / "run", step), final_ckpt(run.path, step))
    with run.lease(Holder.me()) as training:  # flock is per open file: this process's own lease conflicts too
        training.acquire()
        result = CliRunner().invoke(app, ["ckpt", "prune", str(run.path), "--keep-last", "1", "--keep-best", "0"])
    assert result.exit_code == 2 and f"being written by pid {os.getpid()}" in result.output
    assert final_ckpt(run.path, 4).is_dir()
