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

from .provenance import utc_now
from .run_dir import RunDir

KILLED = "killed (no clean exit: SIGKILL, OOM killer, power loss or machine crash)"


def read_segments(run_dir: Path) -> list[dict]:
    path = RunDir(run_dir).segments_file
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a kill mid-write
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
    return ends[-1]["status"] if ends else KILLED


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
        with self.path.open("a") as f:
            f.write(json.dumps({**self.base, "time": utc_now(), **record}) + "\n")


def interruption_entry(
    run_dir: Path, segment: int, resumed_from: str, resumed_step: int, last_logged_step: int | None
) -> dict:
    """The lineage record of a resume: from where, and why the previous segment stopped."""
    return {
        "segment": segment,
        "resumed_from": resumed_from,
        "resumed_at_step": resumed_step,
        "when": utc_now(),
        "previous_segment_ended": last_segment_status(run_dir) or "unknown (no segment log in this run folder)",
        "steps_redone": max((last_logged_step or resumed_step) - resumed_step, 0),
    }
