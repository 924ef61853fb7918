"""The up-front dataset check and the dataset index it leaves behind.

Before the first step every image is opened and verified and every label parsed, in a thread pool
(as ultralytics' `cache_labels` does): a bad image is skipped with a warning naming it, or refused
(`data.on_bad_image`), and a one-table summary says what was loaded. The result is the split's
index, cached in `<dataset root>/.yolo-resume/` (or the user cache folder where the dataset is
read-only), keyed per file by (size, mtime) of the image and its label: a second start, a resume or
a rank other than 0 re-reads nothing that did not change, and a fixed file is the only one re-read.
The cache holds what a split is made of (records, sizes, labels, content hashes), so that a full
cached index (issue 13) only has to add columns.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .records import ImageRecord, Split

CACHE_VERSION = 1  # bump when what an entry means changes: old caches are then ignored
CACHE_DIR_ENV = "YOLO_RESUME_CACHE_DIR"  # where indexes go when set (tests, read-only datasets)
ON_BAD_IMAGE = ("skip", "error")
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width and height


def check_threads() -> int:
    """Ultralytics' NUM_THREADS: one less than the cores, at most 8."""
    return min(8, max(1, (os.cpu_count() or 1) - 1))


# ----------------------------------------------------------------------------- one image


class BadImage(Exception):
    """An image that cannot be trained on; the message says why."""


@dataclass(frozen=True)
class ImageInfo:
    width: int  # as cv2 decodes it (EXIF orientation applied)
    height: int
    raw_width: int  # the stored pixels
    raw_height: int


def verify_image(path: Path) -> ImageInfo:
    """PIL's verify plus the size from the header (as ultralytics' `check_image`), and for a JPEG whose
    end marker is missing (a truncated file, which verify does not notice) a full decode."""
    try:
        with Image.open(path) as im:
            im.verify()
            raw_width, raw_height = im.size
            fmt = (im.format or "").upper()
        with Image.open(path) as im:  # verify() leaves the image unusable; EXIF is in the header (PNG: a chunk)
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if fmt != "PNG" or "exif" in im.info else 1
    # ImportError: ultralytics patches Image.open to look for a HEIF plugin on unknown files.
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError, ImportError) as exc:
        raise BadImage(f"not a readable image ({' '.join(str(exc).split())[:120]})") from None
    if fmt in ("JPEG", "MPO") and not _has_jpeg_end(path) and not _decodes(path):
        raise BadImage("truncated JPEG (cannot be decoded)")
    if orientation in _TRANSPOSED:
        return ImageInfo(raw_height, raw_width, raw_width, raw_height)
    return ImageInfo(raw_width, raw_height, raw_width, raw_height)


def _has_jpeg_end(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-2, os.SEEK_END)
        return f.read() == b"\xff\xd9"


def _decodes(path: Path) -> bool:
    import cv2

    return cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR) is not None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def stat_key(path: Path) -> tuple[int, int]:
    """(size, mtime in ns); (-1, -1) for a missing file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


# ----------------------------------------------------------------------------- the report


@dataclass
class CheckReport:
    """What the check found in one split: the numbers of the summary table, and the files behind them."""

    split: str
    images: int = 0  # listed
    used: int = 0  # trained on / validated
    labels: int = 0  # label files found (yolo) or images with annotations (coco)
    backgrounds: int = 0  # images without a box
    boxes: Counter = field(default_factory=Counter)  # class name -> boxes
    duplicates: int = 0  # duplicate label rows removed
    duplicate_files: list[str] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (file, why): not used
    skipped: dict[str, list[str]] = field(default_factory=dict)  # why -> files never listed as images
    dropped_boxes: int = 0  # boxes with no area after clipping
    cached: int = 0  # images whose check came from the index cache
    seconds: float = 0.0
    cache_file: str = ""
    notes: list[str] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """One line per kind of problem, naming up to 3 files."""
        lines = []
        if self.bad:
            lines.append(
                f"{self.split}: skipped {len(self.bad)} image(s) that cannot be used: "
                + "; ".join(f"`{f}` ({why})" for f, why in self.bad[:3])
                + (" ..." if len(self.bad) > 3 else "")
            )
        for why, files in self.skipped.items():
            lines.append(f"{self.split}: ignored {len(files)} file(s) under the image folders, {why}: `{files[0]}`")
        if self.duplicates:
            lines.append(
                f"{self.split}: removed {self.duplicates} duplicate label row(s) in {len(self.duplicate_files)} "
                f"file(s), as ultralytics does: `{self.duplicate_files[0]}`"
            )
        if self.used and self.backgrounds > 0.5 * self.used:
            lines.append(
                f"{self.split}: {self.backgrounds} of {self.used} images have no box (backgrounds); "
                "check that every label file sits in `labels/` next to `images/` and ends in `.txt`"
            )
        return self.notes + lines

    def row(self) -> dict[str, object]:
        return {
            "split": self.split,
            "images": self.used,
            "labels": self.labels,
            "backgrounds": self.backgrounds,
            "boxes": sum(self.boxes.values()),
            "duplicates removed": self.duplicates,
            "bad images": len(self.bad),
            "files ignored": sum(len(v) for v in self.skipped.values()),
            "from cache": self.cached,
            "seconds": round(self.seconds, 2),
        }


def summary_table(reports: Sequence[CheckReport]):
    """One rich table for the splits: counts, then boxes per class."""
    from rich.table import Table

    table = Table(title="dataset check")
    rows = [r.row() for r in reports]
    table.add_column("")
    for r in rows:
        table.add_column(str(r["split"]), justify="right")
    for key in list(rows[0])[1:]:
        table.add_row(key, *(str(r[key]) for r in rows))
    names = list(dict.fromkeys(n for r in reports for n in r.boxes))
    for name in names:
        table.add_row(f"boxes: {name}", *(str(r.boxes.get(name, 0)) for r in reports))
    return table


# ----------------------------------------------------------------------------- the cache


class IndexCache:
    """Per-file check results of one split, as columns of a numpy archive (no pickle), valid for one set of
    reader settings. `entries` maps a file (relative to the root) to its result, a dict of the `_FIELDS`."""

    def __init__(self, path: Path, settings: dict):
        self.path = path
        self.settings = json.dumps({"version": CACHE_VERSION, **settings}, sort_keys=True)
        self.entries: dict[str, dict] = {}

    @classmethod
    def for_split(cls, root: Path, name: str, settings: dict) -> IndexCache:
        tag = hashlib.sha256(json.dumps([str(root), name], separators=(",", ":")).encode()).hexdigest()[:16]
        file = f"index-{name.split(':')[0]}-{tag}.npz"
        override = os.environ.get(CACHE_DIR_ENV)
        if override:
            return cls(Path(override) / file, settings)
        beside = root / ".yolo-resume"
        if _writable(beside):
            return cls(beside / file, settings)
        user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "yolo-resume" / "index"
        return cls(user / file, settings)

    def load(self) -> None:
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                if str(archive["settings"]) != self.settings:
                    return
                cols = {name: archive[name] for name in archive.files}
        except (OSError, KeyError, ValueError):
            return  # no cache, or one from another version: build afresh
        keys, rows, starts = cols["keys"].tolist(), cols["rows"], cols["row_start"]
        texts = {f: cols[f].tolist() for f in _TEXT_FIELDS}
        stat, size, raw = cols["stat"].tolist(), cols["size"].tolist(), cols["raw"].tolist()
        dups = cols["duplicates"].tolist()
        for i, key in enumerate(keys):
            entry = {"stat": stat[i], "size": size[i], "raw": raw[i], "duplicates": dups[i]}
            entry |= {f: texts[f][i] for f in _TEXT_FIELDS if texts[f][i]}
            entry["label_sha"] = texts["label_sha"][i] or None
            entry["rows"] = rows[starts[i] : starts[i + 1]]
            self.entries[key] = entry

    def save(self, entries: dict[str, dict]) -> str:
        """Write atomically; returns '' or why it could not be written (never fatal)."""
        values = list(entries.values())
        rows = [np.asarray(e.get("rows", _NO_ROWS), np.float64).reshape(-1, 5) for e in values]
        width = max((len(e["stat"]) for e in values), default=4)
        cols = {
            "settings": np.array(self.settings),
            "keys": np.array(list(entries), dtype=str),
            "stat": np.array([list(e["stat"]) + [-1] * (width - len(e["stat"])) for e in values], np.int64),
            "size": np.array([e.get("size", [0, 0]) for e in values], np.int64).reshape(-1, 2),
            "raw": np.array([e.get("raw", [0, 0]) for e in values], np.int64).reshape(-1, 2),
            "duplicates": np.array([e.get("duplicates", 0) for e in values], np.int64),
            "row_start": np.concatenate([[0], np.cumsum([len(r) for r in rows], dtype=np.int64)]),
            "rows": np.concatenate(rows) if rows else _NO_ROWS,
        }
        cols |= {f: np.array([e.get(f) or "" for e in values], dtype=str) for f in _TEXT_FIELDS}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=".npz")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **cols)
            os.replace(tmp, self.path)
        except OSError as exc:
            return f"index cache not saved ({exc})"
        return ""


_TEXT_FIELDS = ("label_sha", "bad", "content", "upper")
_NO_ROWS = np.zeros((0, 5))


def _writable(folder: Path) -> bool:
    probe = folder if folder.exists() else folder.parent
    return os.access(probe, os.W_OK)


def run_checks(jobs: list, work: Callable, threads: int | None = None) -> list:
    """`work(job)` for each job, in a thread pool (PIL and file reads release the GIL), in order."""
    if len(jobs) < 32:
        return [work(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=threads or check_threads()) as pool:
        return list(pool.map(work, jobs, chunksize=64))


# ----------------------------------------------------------------------------- YOLO splits


def index_yolo_split(
    root: Path,
    listing,
    split: str,
    names: list[str],
    kpt_shape: tuple[int, int] | None,
    on_bad_image: str,
    fingerprint: str,
) -> Split:
    """Check and index the images of a YOLO split (see the module docstring)."""
    from .yolo import label_path

    start = time.perf_counter()
    images = listing.images
    labels = [label_path(p) for p in images]
    rel = [_rel(p, root) for p in images]
    cache = IndexCache.for_split(root, f"{split}:yolo", {"nc": len(names), "kpt_shape": kpt_shape})
    cache.load()
    stats = [(*stat_key(p), *stat_key(lp)) for p, lp in zip(images, labels, strict=True)]
    entries, todo = _split_by_cache(cache, rel, stats, fingerprint)
    cached = len(images) - len(todo)

    def check(i: int) -> tuple[str, dict]:
        return rel[i], _check_yolo_item(images[i], labels[i], stats[i], len(names), kpt_shape, fingerprint)

    entries |= dict(run_checks(todo, check))
    report = CheckReport(split, images=len(images), cached=cached)
    report.skipped = {why: [_rel(p, root) for p in files] for why, files in listing.skipped.items()}
    records, digest, label_files, upper = [], hashlib.sha256(), {}, []
    usable = []
    for i, key in enumerate(rel):
        entry = entries[key]
        if entry.get("upper"):
            upper.append(entry["upper"])
        if entry.get("bad"):
            report.bad.append((key, entry["bad"]))
        else:
            usable.append(i)
    targets = all_label_boxes([entries[rel[i]]["rows"] for i in usable], [entries[rel[i]]["size"] for i in usable])
    for i, (boxes, cls, dropped) in zip(usable, targets, strict=True):
        key, entry = rel[i], entries[rel[i]]
        report.dropped_boxes += dropped
        if entry["label_sha"] is not None:
            report.labels += 1
            label_files[_rel(labels[i], root)] = entry["label_sha"]
        if entry["duplicates"]:
            report.duplicates += entry["duplicates"]
            report.duplicate_files.append(_rel(labels[i], root))
        digest.update(f"{key}\0{entry['label_sha'] or ''}\0".encode())
        (width, height), (size, mtime) = entry["size"], entry["stat"][:2]
        records.append(
            ImageRecord(images[i], width, height, boxes, cls, i + 1, size, mtime, entry.get("content") or "")
        )
    _refuse_unusable(report, records, on_bad_image, upper, images, labels)
    report.used = len(records)
    report.backgrounds = sum(not len(r.boxes) for r in records)
    report.boxes = Counter(
        {names[c]: n for c, n in sorted(Counter(c for r in records for c in r.cls.tolist()).items())}
    )
    _save_index(report, cache, entries, bool(todo), split, start)
    return Split(
        names=list(names),
        records=records,
        class_to_category=list(range(1, len(names) + 1)),
        base=root,
        label_digest=digest.hexdigest(),
        report=report,
        label_files=label_files,
    )


def all_label_boxes(rows: list[np.ndarray], sizes: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(xyxy pixel boxes, class ids, boxes dropped) per image, from normalized [cls, cx, cy, w, h] rows: the
    arithmetic of `yolo.label_boxes` (and so the same bits), in one pass over every image of the split."""
    counts = np.array([len(r) for r in rows], np.int64)
    if not len(rows):
        return []
    lab = np.concatenate([np.asarray(r, np.float64).reshape(-1, 5) for r in rows])
    wh = np.repeat(np.asarray(sizes, np.float64).reshape(-1, 2), counts, axis=0)
    scale = np.concatenate([wh, wh], 1)
    xyxy = np.concatenate([lab[:, 1:3] - lab[:, 3:5] / 2, lab[:, 1:3] + lab[:, 3:5] / 2], 1) * scale
    boxes = xyxy.astype(np.float32)  # records.clip_boxes, per row bounds
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, wh[:, :1].astype(np.float32))
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, wh[:, 1:].astype(np.float32))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    owner = np.repeat(np.arange(len(rows)), counts)
    kept = np.bincount(owner[keep], minlength=len(rows))
    cuts = np.cumsum(kept)[:-1]
    per_boxes = np.split(boxes[keep], cuts)
    per_cls = np.split(lab[keep, 0].astype(np.int64), cuts)
    return list(zip(per_boxes, per_cls, (counts - kept).tolist(), strict=True))


def _check_yolo_item(
    image: Path, label: Path, stat: tuple, nc: int, kpt_shape: tuple[int, int] | None, fingerprint: str
) -> dict:
    """One image and its label file, checked: the cache entry."""
    from .yolo import parse_label_file

    entry: dict = {"stat": list(stat), "label_sha": None, "duplicates": 0, "rows": np.zeros((0, 5))}
    if stat[0] < 0:
        raise DataError(f"image `{image}` not found; check the dataset folder")
    try:
        info = verify_image(image)
    except BadImage as exc:
        return entry | {"bad": str(exc)}
    entry["size"] = [info.width, info.height]
    if fingerprint == "content":
        entry["content"] = file_sha256(image)
    label = Path(label)
    if stat[2] < 0:
        upper = [p for p in (label.with_suffix(".TXT"), label.with_suffix(".Txt")) if p.is_file()]
        return entry | ({"upper": str(upper[0])} if upper else {})
    raw = label.read_bytes()
    labels = parse_label_file(raw, label, nc, kpt_shape)
    return entry | {"label_sha": hashlib.sha256(raw).hexdigest(), "duplicates": labels.duplicates, "rows": labels.rows}


def _refuse_unusable(report: CheckReport, records: list, on_bad_image: str, upper: list, images, labels) -> None:
    """The errors of a whole split: refused bad images, upper-case label suffixes, no usable image or label."""
    if upper:
        raise DataError(
            f"{report.split}: {len(upper)} label file(s) end in `.TXT` instead of `.txt` (e.g. `{upper[0]}`), and "
            "ultralytics reads only `.txt`: their images would train as backgrounds. Rename them to `.txt`"
        )
    if report.bad and (on_bad_image == "error" or not records):
        first = "; ".join(f"`{f}` ({why})" for f, why in report.bad[:3])
        fix = "replace or remove them" + (
            "" if not records else ", or set data.on_bad_image: skip to train without them"
        )
        raise DataError(f"{report.split}: {len(report.bad)} image(s) cannot be used: {first}; {fix}")
    if records and report.labels == 0 and labels:
        # A wrong layout, not a split of backgrounds: nobody trains a detector without boxes.
        raise DataError(
            f"none of the {len(images)} {report.split} images has a label file (e.g. `{labels[0]}`); "
            "labels must sit in a `labels` folder mirroring `images`"
        )


def legacy_label_digest(split: Split) -> str:
    """The label digest yolo-resume 0.2 fingerprinted (raw label bytes in image order), re-read on demand."""
    from .yolo import label_path

    if split.coco_json is not None:
        return split.label_digest
    digest = hashlib.sha256()
    for rec in split.records:
        try:
            raw = Path(label_path(rec.path)).read_bytes()
        except FileNotFoundError:
            raw = b""
        digest.update(f"{_rel(rec.path, split.base)}\0{len(raw)}\0".encode() + raw)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- COCO splits


def check_coco_images(
    root: Path, ann_path: Path, records: list[ImageRecord], split: str, on_bad_image: str, fingerprint: str
) -> tuple[list[ImageRecord], CheckReport]:
    """Verify the images a COCO JSON names (their sizes against the JSON's); bad ones skipped or refused."""
    start = time.perf_counter()
    cache = IndexCache.for_split(root, f"{split}:coco:{ann_path}", {})
    cache.load()
    rel = [_rel(r.path, root) for r in records]
    stats = [stat_key(r.path) for r in records]
    for rec, stat in zip(records, stats, strict=True):
        if stat[0] < 0:
            raise DataError(f"image of `{ann_path}` `{rec.path}` not found; check the dataset folder and the file name")
    entries, todo = _split_by_cache(cache, rel, stats, fingerprint)

    def check(i: int) -> tuple[str, dict]:
        entry: dict = {"stat": list(stats[i])}
        try:
            info = verify_image(records[i].path)
        except BadImage as exc:
            return rel[i], entry | {"bad": str(exc)}
        if fingerprint == "content":
            entry["content"] = file_sha256(records[i].path)
        return rel[i], entry | {"size": [info.width, info.height], "raw": [info.raw_width, info.raw_height]}

    entries |= dict(run_checks(todo, check))
    report = CheckReport(split, images=len(records), cached=len(records) - len(todo))
    kept = []
    for rec, key in zip(records, rel, strict=True):
        entry = entries[key]
        if entry.get("bad"):
            report.bad.append((key, entry["bad"]))
            continue
        if [rec.width, rec.height] not in (entry["size"], entry["raw"]):
            w, h = entry["size"]
            raise DataError(
                f"image `{rec.path}` is {w}x{h} but `{ann_path}` says {rec.width}x{rec.height}; fix the annotation"
            )
        rec.mtime_ns, rec.content = int(entry["stat"][1]), entry.get("content") or ""
        kept.append(rec)
    _refuse_unusable(report, kept, on_bad_image, [], [], [])
    _save_index(report, cache, entries, bool(todo), split, start)
    return kept, report


def fill_content_hashes(split: Split) -> None:
    """sha256 of every image that has none yet (to compare with a checkpoint fingerprinted by content)."""
    missing = [r for r in split.records if not r.content]
    for rec, digest in zip(missing, run_checks(missing, lambda r: file_sha256(r.path)), strict=True):
        rec.content = digest


def _rel(path: Path, root: Path) -> str:
    """`path` relative to `root`, POSIX style (a prefix cut where it can be: 100k relpath calls cost a second)."""
    text, prefix = str(path), str(root).rstrip(os.sep) + os.sep
    if text.startswith(prefix) and os.sep == "/":
        return text[len(prefix) :]
    return Path(os.path.relpath(path, root)).as_posix()


def _split_by_cache(cache, rel: list[str], stats: list[tuple], fingerprint: str) -> tuple[dict, list[int]]:
    """The cache entries still valid (same stat; a content hash when `fingerprint: content` needs one),
    and the indices of the files to check again."""
    entries, todo = {}, []
    for i, (key, stat) in enumerate(zip(rel, stats, strict=True)):
        old = cache.entries.get(key)
        if old is not None and tuple(old["stat"]) == stat and (old.get("content") or fingerprint != "content"):
            entries[key] = old
        else:
            todo.append(i)
    return entries, todo


def _save_index(report, cache, entries: dict, changed: bool, split: str, start: float) -> None:
    """Write the split's index when a file was (re)checked, and finish the report with where and how long."""
    report.cache_file = str(cache.path)
    if changed:
        note = cache.save(entries)
        if note:
            report.notes.append(f"{split}: {note}")
    report.seconds = time.perf_counter() - start
