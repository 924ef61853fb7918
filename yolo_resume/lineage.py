"""Lineage: which checkpoint each segment of a run resumed from, and why the previous segment ended.

Each `train` process is a segment. It appends a `start` line to `<run>/segments.jsonl` and, when it
exits by itself, an `end` line with its status. A segment with no `end` line died without a chance
to say so: SIGKILL, the OOM killer, a power loss or a machine crash. The interruption log built
from this goes into every later checkpoint's metadata (`lineage`), so it survives with the weights.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .files import check_regular, read_text
from .provenance import utc_now
from .run_dir import RunDir

KILLED = "killed (no clean exit: SIGKILL, OOM killer, power loss or machine crash)"


SEGMENTS_FIX = "move it away (a new segment log is started) and resume again"
_log_repairs: dict[str, dict] = {}  # run folder -> what RunLog.on_resume repaired in steps.csv, for the lineage


def record_log_repair(run_dir: Path, repair: dict) -> None:
    _log_repairs[str(Path(run_dir))] = repair


def read_segments(run_dir: Path) -> list[dict]:
    text = read_text(RunDir(run_dir).segments_file, SEGMENTS_FIX)
    records = []
    for line in (text or "").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line torn by a kill mid-write, or garbage
        if isinstance(record, dict):
            records.append(record)
    return records


def last_segment_status(run_dir: Path) -> str | None:
    """How the most recent segment ended, or None if the run folder has no segment yet."""
    records = read_segments(run_dir)
    starts = [r for r in records if r.get("event") == "start"]
    if not starts:
        return None
    last = starts[-1]
    ends = [
        r
        for r in records
        if r.get("event") == "end" and r.get("pid") == last.get("pid") and r.get("segment") == last.get("segment")
    ]
    return str(ends[-1].get("status") or KILLED) if ends else KILLED


class SegmentLog:
    def __init__(self, run_dir: Path, segment: int, resumed_from: str | None):
        self.path = RunDir(run_dir).segments_file
        self.segment = segment
        self.base = {"segment": segment, "pid": os.getpid()}
        self._append({"event": "start", "resumed_from": resumed_from})

    def end(self, status: str) -> None:
        self._append({"event": "end", "status": status})

    def _append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        check_regular(self.path, SEGMENTS_FIX)  # never open a FIFO: the append would block forever
        with self.path.open("a") as f:
            f.write(json.dumps({**self.base, "time": utc_now(), **record}) + "\n")


def interruption_entry(
    run_dir: Path, segment: int, resumed_from: str, resumed_step: int, last_logged_step: int | None
) -> dict:
    """The lineage record of a resume: from where, and why the previous segment stopped."""
    entry = {
        "segment": segment,
        "resumed_from": resumed_from,
        "resumed_at_step": resumed_step,
        "when": utc_now(),
        "previous_segment_ended": last_segment_status(run_dir) or "unknown (no segment log in this run folder)",
        "steps_redone": max((last_logged_step or resumed_step) - resumed_step, 0),
    }
    repair = _log_repairs.pop(str(Path(run_dir)), None)
    if repair:
        entry["steps_log_repaired"] = repair
    return entry
