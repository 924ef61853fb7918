"""The checkpoint store under fault injection, end to end through the CLI: corrupt and hostile
checkpoints are refused and resume falls back; a full disk and kills mid-commit lose nothing."""

import hashlib
import json
import os
import pickle
import resource
import signal
import subprocess
import sys

import pytest
from conftest import assert_same_as_straight, cli, copy_checkpoints, final_ckpt

from yolo_resume.checkpoint.format import KILL_ENV, KILL_STAGES, verify_checkpoint


def flip_bit(path, offset_from_end=1000):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10
    path.write_bytes(bytes(data))


def file_hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


class Evil:
    def __init__(self, sentinel):
        self.cmd = f"touch {sentinel}"

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_resume_falls_back_past_a_corrupt_newest_checkpoint(straight, tmp_path):
    run = copy_checkpoints(straight, tmp_path / "b", [10, 11])
    flip_bit(final_ckpt(run, 11) / "tensors.safetensors")
    result = cli("train", "--resume", "--run-dir", str(run), "-q", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipping checkpoint" in result.stderr and "ckpt-000000011" in result.stderr
    assert "tensors.safetensors" in result.stderr and "xxh3-128 does not match" in result.stderr.lower()
    assert "from ckpt-000000010" in result.stdout
    # The corrupt folder is kept aside for inspection, not overwritten or deleted.
    assert [p.name for p in (run / "checkpoints").glob("ckpt-000000011.superseded-*")]
    assert_same_as_straight(straight, run, resumed_at=10)


def test_hostile_pickle_is_never_unpickled(straight, tmp_path):
    sentinel = tmp_path / "SENTINEL"
    payload = pickle.dumps(Evil(sentinel))
    run = copy_checkpoints(straight, tmp_path / "b", [11])
    (run / "checkpoints" / "last.pt").write_bytes(payload)  # where ultralytics users expect one
    evil_dir = run / "checkpoints" / "ckpt-000000999"
    evil_dir.mkdir()
    (evil_dir / "model.pt").write_bytes(payload)
    as_path = cli("train", "--resume-from", str(run / "checkpoints" / "last.pt"), cwd=tmp_path)
    assert as_path.returncode == 2 and "pickle" in as_path.stderr and "Traceback" not in as_path.stderr
    verify = cli("ckpt", "verify", str(run), cwd=tmp_path)
    assert verify.returncode == 1 and "ckpt-000000999" in verify.stdout
    resumed = cli("train", "--resume", "--run-dir", str(run), "-q", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping checkpoint" in resumed.stderr and "ckpt-000000999" in resumed.stderr
    assert not sentinel.exists()
    assert_same_as_straight(straight, run, resumed_at=11)


def run_with_file_size_limit(args, cwd, limit_bytes):
    """A child whose writes beyond `limit_bytes` fail with EFBIG, like a quota or a full disk."""

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-m", "yolo_resume", *args],
        cwd=cwd,
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_disk_full_keeps_committed_checkpoints_and_stops_after_max_failures(straight, tmp_path):
    run = copy_checkpoints(straight, tmp_path / "b", [4])
    before = file_hashes(final_ckpt(run, 4))
    result = run_with_file_size_limit(["train", "--resume", "--run-dir", str(run)], tmp_path, 4 << 20)
    assert result.returncode == 74, result.stdout + result.stderr
    assert "File too large" in result.stderr and "failure 3 of at most 3" in result.stderr
    assert "Traceback" not in result.stderr
    assert "training continues and retries at the next interval (failure 1 of at most 3)" in result.stdout
    assert "(failure 2 of at most 3)" in result.stdout
    assert file_hashes(final_ckpt(run, 4)) == before
    verify_checkpoint(final_ckpt(run, 4))
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["ckpt-000000004"]
    # Once the disk has room again, the run resumes from the last committed checkpoint, exactly.
    resumed = cli("train", "--resume", "--run-dir", str(run), "-q", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as_straight(straight, run, resumed_at=4)


def kill_mid_commit_then_resume(straight, tmp_path, stage):
    run = copy_checkpoints(straight, tmp_path / "b", [10])
    killed = cli("train", "--resume", "--run-dir", str(run), "-q", cwd=tmp_path, env={KILL_ENV: stage})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    newest = sorted(p for p in (run / "checkpoints").iterdir() if p.name.startswith("ckpt-"))[-1]
    verify_checkpoint(newest)  # a valid checkpoint always exists
    assert newest.name == ("ckpt-000000011" if stage == "after_rename" else "ckpt-000000010")
    resumed = cli("train", "--resume", "--run-dir", str(run), "-q", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]
    assert_same_as_straight(straight, run, resumed_at=10)


FAST_STAGES = ("tensors_written", "before_rename", "after_rename")


@pytest.mark.parametrize("stage", FAST_STAGES)
def test_sigkill_during_commit_leaves_a_valid_checkpoint(straight, tmp_path, stage):
    kill_mid_commit_then_resume(straight, tmp_path, stage)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [s for s in KILL_STAGES if s not in FAST_STAGES])
def test_sigkill_at_every_other_commit_stage(straight, tmp_path, stage):
    kill_mid_commit_then_resume(straight, tmp_path, stage)


def test_verify_names_each_invalid_checkpoint(straight, tmp_path):
    run = copy_checkpoints(straight, tmp_path / "b", [9, 10, 11])
    ok = cli("ckpt", "verify", str(run), cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.count("ok") == 3
    flip_bit(final_ckpt(run, 9) / "meta.json", 5)
    (final_ckpt(run, 10) / "state.json").unlink()
    bad = cli("ckpt", "verify", str(run), cwd=tmp_path)
    assert bad.returncode == 1
    lines = bad.stdout.splitlines()
    assert any("invalid" in ln and "ckpt-000000009" in ln and "meta.json" in ln for ln in lines)
    assert any("invalid" in ln and "ckpt-000000010" in ln and "state.json" in ln for ln in lines)
    assert any(ln.startswith("ok") and "ckpt-000000011" in ln for ln in lines)
    listed = json.loads(cli("ckpt", "list", str(run), "--json", cwd=tmp_path).stdout)
    assert [(r["name"], r["valid"]) for r in listed] == [
        ("ckpt-000000009", False),
        ("ckpt-000000010", False),
        ("ckpt-000000011", True),
    ]
    for key in ("kind", "valid", "best", "pinned", "size_bytes", "metrics", "git_commit", "created"):
        assert all(key in r for r in listed)


def test_prune_dry_run_pin_and_prune(straight, tmp_path):
    run = copy_checkpoints(straight, tmp_path / "b", [4, 8, 9, 10, 11, 12])
    assert cli("ckpt", "pin", str(final_ckpt(run, 9)), cwd=tmp_path).returncode == 0
    dry = cli("ckpt", "prune", str(run), "--keep-last", "2", "--keep-best", "0", "--dry-run", cwd=tmp_path)
    assert dry.returncode == 0
    assert "3 checkpoint(s)" in dry.stdout
    doomed = {ln.split()[2].rsplit("/", 1)[-1] for ln in dry.stdout.splitlines() if ln.startswith("would delete")}
    assert doomed == {"ckpt-000000004", "ckpt-000000008", "ckpt-000000010"}
    assert "MB would be freed" in dry.stdout
    assert len(list((run / "checkpoints").glob("ckpt-*[0-9]"))) == 6  # dry run deleted nothing
    real = cli("ckpt", "prune", str(run), "--keep-last", "2", "--keep-best", "0", cwd=tmp_path)
    assert real.returncode == 0
    left = sorted(p.name for p in (run / "checkpoints").glob("ckpt-*[0-9]"))
    assert left == ["ckpt-000000009", "ckpt-000000011", "ckpt-000000012"]
    rows = json.loads(cli("ckpt", "list", str(run), "--json", cwd=tmp_path).stdout)
    assert [r["pinned"] for r in rows] == [True, False, False]
    assert cli("ckpt", "unpin", str(final_ckpt(run, 9)), cwd=tmp_path).returncode == 0
    cli("ckpt", "prune", str(run), "--keep-last", "1", "--keep-best", "0", cwd=tmp_path)
    assert sorted(p.name for p in (run / "checkpoints").glob("ckpt-*[0-9]")) == ["ckpt-000000012"]


def test_diff_reports_config_metadata_and_tensors(straight, tmp_path):
    # the optimizer steps after the 11th batch (ultralytics' accumulation windows), so 10 and 12 differ in weights
    a, b = final_ckpt(straight / "run", 10), final_ckpt(straight / "run", 12)
    result = cli("ckpt", "diff", str(a), str(b), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "global_step" in result.stdout and "differ" in result.stdout
    assert "model.model.0.conv.weight" in cli("ckpt", "diff", str(a), str(b), "--top", "2000", cwd=tmp_path).stdout
    same = cli("ckpt", "diff", str(b), str(b), cwd=tmp_path)
    assert "metadata and config: identical" in same.stdout and " 0 differ" in same.stdout
