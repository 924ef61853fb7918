"""Non-finite loss: roll back to the newest valid checkpoint, or stop with a clear error.

Fault injection: YOLO_RESUME_TEST_NAN_AT=STEP makes the loss of that global step NaN every time it is
trained (a deterministic divergence); STEP:MARKER only once (a transient fault, e.g. a flipped bit)."""

from conftest import assert_same_as_straight, cli, final_ckpt, sets

from yolo_resume.checkpoint.format import read_meta


def test_transient_nan_rolls_back_and_the_run_ends_as_if_nothing_happened(straight, tmp_path):
    marker = tmp_path / "nan-fired"
    result = cli(
        "train",
        "--run-dir",
        "run",
        *sets(tmp_path / "data"),
        cwd=tmp_path,
        env={"YOLO_RESUME_TEST_NAN_AT": f"7:{marker}"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert marker.exists()  # the fault did fire
    assert "non-finite loss at global step 7" in result.stdout
    assert "rolling back to ckpt-000000006 (rollback 1 of at most 3)" in result.stdout
    assert_same_as_straight(straight, tmp_path / "run")
    lineage = read_meta(final_ckpt(tmp_path / "run"))["lineage"]
    assert lineage[-1]["resumed_from"] == "ckpt-000000006"
    assert lineage[-1]["previous_segment_ended"] == "rolled back: non-finite loss at global step 7"


def test_deterministic_nan_stops_after_nan_retries_with_one_clear_line(tmp_path):
    result = cli(
        "train",
        "--run-dir",
        "run",
        *sets(tmp_path / "data", **{"train.nan_retries": 2}),
        cwd=tmp_path,
        env={"YOLO_RESUME_TEST_NAN_AT": "7"},
    )
    assert result.returncode == 65, result.stdout + result.stderr
    assert result.stdout.count("rolling back to ckpt-000000006") == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert "training diverged: the loss is non-finite at global step 7" in errors[0]
    assert "after 2 rollback(s)" in errors[0] and "newest valid checkpoint is ckpt-000000006" in errors[0]
    assert "lower train.lr0" in errors[0].lower()
    # Nothing past the last good step was saved, and what was saved still verifies.
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*"))
    assert checkpoints[-1].name == "ckpt-000000006"
    assert read_meta(checkpoints[-1])["global_step"] == 6


def test_nan_before_any_checkpoint_stops_cleanly(tmp_path):
    result = cli(
        "train",
        "--run-dir",
        "run",
        *sets(tmp_path / "data", **{"ckpt.every_steps": 0}),
        cwd=tmp_path,
        env={"YOLO_RESUME_TEST_NAN_AT": "2"},
    )
    assert result.returncode == 65, result.stdout + result.stderr
    assert "no checkpoint was saved yet" in result.stderr
