"""RunLog: the run folder's logs (steps.csv, results.csv, results.png, TensorBoard, segments.jsonl)."""

import csv
import json

import pytest

from yolo_resume import run_log
from yolo_resume.lineage import last_segment_status
from yolo_resume.run_dir import RunDir
from yolo_resume.run_log import STEP_FIELDS, RunLog
from yolo_resume.trainer import TrainState


def log_steps(log: RunLog, steps) -> None:
    for step in steps:
        log.on_step(TrainState(global_step=step, step_in_epoch=step), [0.5, 0.25, 0.125], 0.01)


def logged_steps(run: RunDir) -> list[int]:
    with run.steps_file.open() as f:
        return [int(row["global_step"]) for row in csv.DictReader(f)]


def test_steps_are_appended_under_one_header_and_only_rank_0_writes(tmp_path):
    run = RunDir(tmp_path)
    log_steps(RunLog(run, is_main=True, notice=print), [1, 2, 3])
    log_steps(RunLog(run, is_main=False, notice=print), [4])
    lines = run.steps_file.read_text().splitlines()
    assert lines[0] == ",".join(STEP_FIELDS) and len(lines) == 4
    assert lines[1] == "1,0,1,0.01,0.5,0.25,0.125"


def test_a_resume_forgets_later_and_torn_rows_and_reports_how_far_the_log_got(tmp_path):
    run = RunDir(tmp_path)
    log = RunLog(run, is_main=True, notice=print)
    log_steps(log, range(1, 8))
    with run.steps_file.open("a") as f:
        f.write("8,0,8,0.01,0.5")  # torn by a kill mid-write
    assert log.on_resume(4) == 8  # the torn row's step was reached
    assert logged_steps(run) == [1, 2, 3, 4] and not run.steps_file.with_suffix(".csv.tmp").exists()
    log_steps(log, [5])
    assert logged_steps(run) == [1, 2, 3, 4, 5]
    other = RunDir(tmp_path / "other")
    assert RunLog(other, is_main=True, notice=print).on_resume(0) is None and not other.steps_file.exists()


def test_a_fresh_start_owns_the_step_log_and_the_segment_log_records_start_and_end(tmp_path):
    run = RunDir(tmp_path)
    log_steps(RunLog(run, is_main=True, notice=print), [1, 2])
    log = RunLog(run, is_main=True, notice=print)
    log.on_start(0, resumed_from=None)
    assert logged_steps(run) == []
    assert last_segment_status(run.path) and "killed" in last_segment_status(run.path)  # no end yet
    log.on_end("completed")
    assert last_segment_status(run.path) == "completed"
    resumed = RunLog(run, is_main=True, notice=print)
    log_steps(resumed, [1])
    resumed.on_start(1, resumed_from="ckpt-000000002")
    assert logged_steps(run) == [1]  # a resume truncates at its checkpoint (on_resume), not here
    records = [json.loads(line) for line in run.segments_file.read_text().splitlines()]
    assert [(r["event"], r["segment"]) for r in records] == [("start", 0), ("end", 0), ("start", 1)]
    assert records[-1]["resumed_from"] == "ckpt-000000002"


def test_other_ranks_write_no_segment_log(tmp_path):
    log = RunLog(RunDir(tmp_path), is_main=False, notice=print)
    log.on_start(0, resumed_from=None)
    log.on_end("completed")
    assert not RunDir(tmp_path).segments_file.exists()


def test_results_csv_is_rewritten_from_the_history(tmp_path, monkeypatch):
    monkeypatch.setattr(run_log, "plot_results", lambda *args: None)
    run = RunDir(tmp_path)
    log = RunLog(run, is_main=True, notice=print)
    history = [{"epoch": 1, "segment": 0, "box_loss": 1 / 3}]
    log.on_epoch(history, {}, 3)
    history.append({"epoch": 2, "segment": 1, "box_loss": 0.25, "map50": float("nan")})
    log.on_epoch(history, {"map50": float("nan")}, 6)
    with run.results_file.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["segment"], r["box_loss"]) for r in rows] == [("1", "0", "0.333333"), ("2", "1", "0.25")]
    assert rows[0]["map50"] == "" and rows[1]["map50"] == "nan"


def test_the_plot_is_redrawn_at_most_once_a_minute_and_a_failing_one_only_warns(tmp_path, monkeypatch):
    draws, notices = [], []

    def plot(results, out):
        draws.append(out)
        raise ValueError("no display")

    monkeypatch.setattr(run_log, "plot_results", plot)
    now = [1000.0]
    monkeypatch.setattr(run_log.time, "monotonic", lambda: now[0])
    log = RunLog(RunDir(tmp_path), is_main=True, notice=notices.append)
    history = [{"epoch": 1, "segment": 0}]
    log.on_epoch(history, {}, 1)
    assert draws == []  # the first picture comes after a minute of training
    now[0] += run_log.PLOT_EVERY_S
    log.on_epoch(history, {}, 2)
    log._plotter.join()
    log.on_epoch(history, {}, 3)
    assert len(draws) == 1 and draws[0] == RunDir(tmp_path).plot_file
    log.close(history)  # the final picture, whatever the clock says
    assert len(draws) == 2
    assert notices == ["could not draw results.png: ValueError: no display"] * 2
    RunLog(RunDir(tmp_path), is_main=True, notice=notices.append).close([])  # no epoch, no picture
    assert len(draws) == 2


class FakeWriter:
    def __init__(self, logdir, purge_step):
        self.logdir, self.purge_step, self.scalars, self.closed = logdir, purge_step, [], False

    def add_scalar(self, key, value, step):
        self.scalars.append((key, value, step))

    def close(self):
        self.closed = True


def test_tensorboard_purges_what_a_killed_segment_logged_after_the_checkpoint(tmp_path, monkeypatch):
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    monkeypatch.setattr(tensorboard, "SummaryWriter", FakeWriter)
    monkeypatch.setattr(run_log, "plot_results", lambda *args: None)
    run = RunDir(tmp_path)
    log = RunLog(run, is_main=True, notice=print)
    log.enable_tensorboard(6)
    assert log.tb.logdir == str(run.tensorboard_dir) and log.tb.purge_step == 7
    log_steps(log, [7])
    log.on_epoch([{"epoch": 1}], {"map50": 0.5}, 7)
    log.close([])
    assert log.tb.scalars == [
        ("train/box_loss", 0.5, 7),
        ("train/cls_loss", 0.25, 7),
        ("train/dfl_loss", 0.125, 7),
        ("lr", 0.01, 7),
        ("val/map50", 0.5, 7),
    ]
    assert log.tb.closed
    other = RunLog(run, is_main=False, notice=print)
    other.enable_tensorboard(6)
    assert other.tb is None
