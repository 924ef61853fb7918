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
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError
from .records import FlatRecords, ImageRecord, LabelFiles, Split

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
            fmt = (im.format or "").upper()
            # A JPEG's EXIF is read with its header: take it before verify(), which leaves the image unusable.
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1) if fmt in ("JPEG", "MPO") else None
            im.verify()
            raw_width, raw_height = im.size
        if orientation is None:  # other formats (PNG: a chunk, maybe after the pixels): open again
            with Image.open(path) as im:
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

    def columns(self) -> dict[str, np.ndarray] | None:
        """The stored columns (read once), or None: no cache, one from another version or other settings."""
        if not hasattr(self, "_columns"):
            self._columns = None
            try:
                with np.load(self.path, allow_pickle=False) as archive:
                    if str(archive["settings"]) == self.settings:
                        self._columns = {name: archive[name] for name in archive.files}
            except _UNREADABLE:
                pass
        return self._columns

    def load(self) -> None:
        cols = self.columns()
        if cols is None:
            return  # no cache, or one from another version: build afresh
        try:
            self.entries.update(self._entries(cols))
        except _UNREADABLE:
            self.entries.clear()

    @staticmethod
    def _entries(cols: dict[str, np.ndarray]) -> dict[str, dict]:
        keys, rows, starts = cols["keys"].tolist(), cols["rows"], cols["row_start"]
        texts = {f: cols[f].tolist() for f in _TEXT_FIELDS}
        stat, size, raw = cols["stat"].tolist(), cols["size"].tolist(), cols["raw"].tolist()
        dups = cols["duplicates"].tolist()
        entries = {}
        for i, key in enumerate(keys):
            entry = {"stat": stat[i], "size": size[i], "raw": raw[i], "duplicates": dups[i]}
            entry |= {f: texts[f][i] for f in _TEXT_FIELDS if texts[f][i]}
            entry["label_sha"] = texts["label_sha"][i] or None
            entry["rows"] = rows[starts[i] : starts[i + 1]]
            entries[key] = entry
        return entries

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
        return _save_npz(self.path, cols, "index cache")


def _save_npz(path: Path, cols: dict[str, np.ndarray], what: str) -> str:
    """Write `cols` to `path` through a temporary sibling and a rename (a kill leaves the old file or the
    new one); returns '' or why it could not be written (an index is a cache: never fatal)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **cols)
        os.replace(tmp, path)
    except OSError as exc:
        return f"{what} not saved ({exc})"
    return ""


_TEXT_FIELDS = ("label_sha", "bad", "content", "upper")
_NO_ROWS = np.zeros((0, 5))


def _writable(folder: Path) -> bool:
    probe = folder if folder.exists() else folder.parent
    return os.access(probe, os.W_OK)


SPLIT_INDEX_VERSION = 1  # bump when the split index's layout or meaning changes: old ones are then ignored
_UNREADABLE = (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile)


@dataclass
class SplitSnapshot:
    """A split as a start left it: its flat records, the files it was made of (with the (size, mtime) of each
    image and label, in listing order) and the JSON part (settings, report numbers, label digest...)."""

    records: FlatRecords
    listed: list[str]
    stats: np.ndarray  # (n, k) int64
    meta: dict
    label_files: LabelFiles | None = None


class SplitIndex:
    """The whole checked split in one uncompressed `.npz` of flat arrays (read with `allow_pickle=False`) plus
    one JSON text: a start whose file list and stats equal the stored ones reads this instead of the per-file
    entries (no per-image Python). A file that does not parse, or is from another version or other settings,
    is ignored and rebuilt, never trusted."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def beside(cls, cache: IndexCache) -> SplitIndex:
        return cls(cache.path.with_name("split-" + cache.path.name.removeprefix("index-")))

    def load(self, settings: dict) -> SplitSnapshot | None:
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                meta = json.loads(archive["meta"].tobytes().decode())
                if not isinstance(meta, dict) or meta.get("version") != SPLIT_INDEX_VERSION:
                    return None
                if meta.get("settings") != json.loads(json.dumps(settings)):
                    return None
                records = FlatRecords({name: archive[f"r_{name}"] for name in FlatRecords.COLUMNS})
                listed = FlatRecords.split_blob(archive["listed_blob"], archive["listed_offsets"])
                stats = np.asarray(archive["listed_stats"], np.int64)
                labels = None
                if "label_blob" in archive.files:
                    labels = LabelFiles(archive["label_blob"], archive["label_offsets"], archive["label_sha"])
        except _UNREADABLE:
            return None
        if stats.ndim != 2 or len(stats) != len(listed):
            return None
        return SplitSnapshot(records, listed, stats, meta, labels)

    def save(
        self,
        settings: dict,
        records: FlatRecords,
        listed: list[str],
        stats: np.ndarray,
        meta: dict,
        label_files: LabelFiles | None = None,
    ) -> str:
        """Write atomically; returns '' or why it could not be written (never fatal)."""
        body = dict(meta, version=SPLIT_INDEX_VERSION, settings=settings)
        blob, offsets = FlatRecords.join_blob(listed)
        cols = {f"r_{name}": array for name, array in records.columns().items()}
        cols |= label_files.columns() if label_files is not None else {}
        cols |= {"listed_blob": blob, "listed_offsets": offsets, "listed_stats": np.asarray(stats, np.int64)}
        cols["meta"] = np.frombuffer(json.dumps(body, separators=(",", ":")).encode(), np.uint8)
        return _save_npz(self.path, cols, "split index")


def report_meta(report: CheckReport, names: list[str]) -> dict:
    """What of a report a cached start shows again (the skipped files are listed afresh on every start)."""
    by_class = [report.boxes.get(n, 0) for n in names]
    return {
        "images": report.images,
        "used": report.used,
        "labels": report.labels,
        "backgrounds": report.backgrounds,
        "boxes": by_class,
        "duplicates": report.duplicates,
        "duplicate_files": report.duplicate_files,
        "bad": [list(b) for b in report.bad],
        "dropped_boxes": report.dropped_boxes,
        "notes": report.notes,
    }


def report_from_meta(split: str, meta: dict, names: list[str]) -> CheckReport:
    report = CheckReport(split, images=int(meta["images"]), used=int(meta["used"]), labels=int(meta["labels"]))
    report.backgrounds = int(meta["backgrounds"])
    report.boxes = Counter({n: int(c) for n, c in zip(names, meta["boxes"], strict=True) if c})
    report.duplicates, report.duplicate_files = int(meta["duplicates"]), list(meta["duplicate_files"])
    report.bad = [(str(f), str(why)) for f, why in meta["bad"]]
    report.dropped_boxes, report.notes = int(meta["dropped_boxes"]), list(meta["notes"])
    report.cached = report.images
    return report


def run_checks(jobs: list, work: Callable, threads: int | None = None) -> list:
    """`work(job)` for each job, in a thread pool (PIL and file reads release the GIL), in order. Jobs go to the
    pool in chunks: one future per image costs ~70 us of locks and bookkeeping, a tenth of a check."""
    if len(jobs) < 32:
        return [work(job) for job in jobs]
    size = max(1, min(256, len(jobs) // (4 * (threads or check_threads()))))
    chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
    with ThreadPoolExecutor(max_workers=threads or check_threads()) as pool:
        done = pool.map(lambda chunk: [work(job) for job in chunk], chunks)
        return [result for chunk in done for result in chunk]


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
    """Check and index the images of a YOLO split (see the module docstring): the split index when every
    image and label has the (size, mtime) it stored, else the per-file entries, checking only what changed."""
    from .yolo import label_stats

    start = time.perf_counter()
    files = listing.files
    labels, label_stat = label_stats(files)
    stats = np.concatenate([_int_table(listing.stats), _int_table(label_stat)], 1)
    cache = IndexCache.for_split(root, f"{split}:yolo", {"nc": len(names), "kpt_shape": kpt_shape})
    index = SplitIndex.beside(cache)
    settings = {"kind": "yolo", "nc": len(names), "kpt_shape": kpt_shape, "fingerprint": fingerprint}
    snapshot = index.load(settings)
    if _covers(snapshot, files, stats):
        report = report_from_meta(split, snapshot.meta["report"], names)
        report.skipped = {why: [_rel(p, root) for p in found] for why, found in listing.skipped.items()}
        _refuse_unusable(report, snapshot.records, on_bad_image, [], files, labels)
        report.cache_file, report.seconds = str(cache.path), time.perf_counter() - start
        return _yolo_split(names, snapshot.records, root, snapshot.meta, report, snapshot.label_files)
    records, meta, report, entries, changed = _build_yolo_split(
        root, listing, labels, stats, split, names, kpt_shape, on_bad_image, fingerprint, cache
    )
    _save_index(report, cache, entries, changed, split, start)
    label_files = meta.pop("label_files")
    note = index.save(settings, records, files, stats, meta | {"report": report_meta(report, names)}, label_files)
    if note:
        report.notes.append(f"{split}: {note}")
    report.seconds = time.perf_counter() - start
    return _yolo_split(names, records, root, meta, report, label_files)


def _covers(snapshot: SplitSnapshot | None, files: list[str], stats: np.ndarray) -> bool:
    """The stored YOLO split is this one: the same files, each image and label with the same size and mtime."""
    return (
        snapshot is not None
        and snapshot.label_files is not None
        and snapshot.listed == files
        and np.array_equal(snapshot.stats, stats)
    )


def _int_table(pairs: list[tuple[int, int]]) -> np.ndarray:
    """(n, 2) int64 from a list of pairs (np.array of a list of tuples is 40x slower than of a flat list)."""
    from itertools import chain

    return np.fromiter(chain.from_iterable(pairs), np.int64, 2 * len(pairs)).reshape(-1, 2)


def _yolo_split(
    names: list[str], records: FlatRecords, root: Path, meta: dict, report: CheckReport, label_files: LabelFiles
) -> Split:
    return Split(
        names=list(names),
        records=records,
        class_to_category=list(range(1, len(names) + 1)),
        base=root,
        label_digest=meta["label_digest"],
        report=report,
        label_files=label_files,
    )


def _build_yolo_split(root, listing, labels, stats, split, names, kpt_shape, on_bad_image, fingerprint, cache):
    """The split from the per-file entries, (re)checking the files whose entry is missing or stale."""
    files = listing.files
    rel = [_rel(p, root) for p in files]
    cache.load()
    stat_rows = [tuple(row) for row in stats.tolist()]
    entries, todo = _split_by_cache(cache, rel, stat_rows, fingerprint)

    def check(i: int) -> tuple[str, dict]:
        return rel[i], _check_yolo_item(Path(files[i]), labels[i], stat_rows[i], len(names), kpt_shape, fingerprint)

    entries |= dict(run_checks(todo, check))
    report = CheckReport(split, images=len(files), cached=len(files) - len(todo))
    report.skipped = {why: [_rel(p, root) for p in found] for why, found in listing.skipped.items()}
    upper, usable = [], []
    for i, key in enumerate(rel):
        entry = entries[key]
        if entry.get("upper"):
            upper.append(entry["upper"])
        if entry.get("bad"):
            report.bad.append((key, entry["bad"]))
        else:
            usable.append(i)
    used = [entries[rel[i]] for i in usable]
    boxes, cls, kept, dropped = label_boxes_flat([e["rows"] for e in used], [e["size"] for e in used])
    digest, label_files = hashlib.sha256(), {}
    for i, entry in zip(usable, used, strict=True):
        if entry["label_sha"] is not None:
            report.labels += 1
            label_files[_rel(labels[i], root)] = entry["label_sha"]
        if entry["duplicates"]:
            report.duplicates += entry["duplicates"]
            report.duplicate_files.append(_rel(labels[i], root))
        digest.update(f"{rel[i]}\0{entry['label_sha'] or ''}\0".encode())
    report.dropped_boxes = int(dropped.sum())
    numbers = [(*e["size"], i + 1, *e["stat"][:2]) for i, e in zip(usable, used, strict=True)]
    content = [(e.get("content") or "").encode() for e in used]
    records = FlatRecords.from_flat([files[i] for i in usable], numbers, boxes, kept, cls, content)
    _refuse_unusable(report, records, on_bad_image, upper, files, labels)
    report.used = len(records)
    report.backgrounds = int((kept == 0).sum())
    counts = np.bincount(cls, minlength=len(names)) if len(cls) else np.zeros(len(names), np.int64)
    report.boxes = Counter({names[c]: int(n) for c, n in enumerate(counts.tolist()) if n})
    meta = {"label_digest": digest.hexdigest(), "label_files": LabelFiles.from_dict(label_files)}
    return records, meta, report, entries, bool(todo)


def label_boxes_flat(
    rows: list[np.ndarray], sizes: list[list[int]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(xyxy pixel boxes, class ids) of every image concatenated, with the boxes kept and dropped per image,
    from normalized [cls, cx, cy, w, h] rows: the arithmetic of `yolo.label_boxes` (and so the same bits)."""
    counts = np.array([len(r) for r in rows], np.int64)
    if not len(rows):
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64), counts, counts
    lab = np.concatenate([np.asarray(r, np.float64).reshape(-1, 5) for r in rows])
    wh = np.repeat(np.asarray(sizes, np.float64).reshape(-1, 2), counts, axis=0)
    scale = np.concatenate([wh, wh], 1)
    xyxy = np.concatenate([lab[:, 1:3] - lab[:, 3:5] / 2, lab[:, 1:3] + lab[:, 3:5] / 2], 1) * scale
    boxes = xyxy.astype(np.float32)  # records.clip_boxes, per row bounds
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, wh[:, :1].astype(np.float32))
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, wh[:, 1:].astype(np.float32))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    owner = np.repeat(np.arange(len(rows)), counts)
    kept = np.bincount(owner[keep], minlength=len(rows)).astype(np.int64)
    return boxes[keep], lab[keep, 0].astype(np.int64), kept, counts - kept


def all_label_boxes(rows: list[np.ndarray], sizes: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(xyxy pixel boxes, class ids, boxes dropped) per image (`label_boxes_flat`, split per image)."""
    if not len(rows):
        return []
    boxes, cls, kept, dropped = label_boxes_flat(rows, sizes)
    cuts = np.cumsum(kept)[:-1]
    return list(zip(np.split(boxes, cuts), np.split(cls, cuts), dropped.tolist(), strict=True))


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
    paths = [str(r.path) for r in records]
    stats = _stat_table(paths)
    sizes = np.array([(r.width, r.height) for r in records], np.int64).reshape(-1, 2)
    kept, contents, report = _check_coco_files(cache, root, ann_path, paths, sizes, stats, split, fingerprint)
    out = []
    for i in kept:
        rec = records[i]
        rec.file_size, rec.mtime_ns, rec.content = int(stats[i, 0]), int(stats[i, 1]), contents[i]
        out.append(rec)
    _refuse_unusable(report, out, on_bad_image, [], [], [])
    report.seconds = time.perf_counter() - start
    return out, report


def _stat_table(paths: list[str]) -> np.ndarray:
    """(size, mtime_ns) per path, (-1, -1) for a missing one, as an (n, 2) int64 table."""
    from .yolo import stat_paths

    return _int_table(stat_paths([str(p) for p in paths]))


def _check_coco_files(cache, root, ann_path, paths, sizes, stats, split, fingerprint):
    """(indices of the usable images, content hash per image, report): every image verified (or its
    per-file entry reused), its size compared with the JSON's."""
    missing = np.flatnonzero(stats[:, 0] < 0)
    if len(missing):
        raise DataError(
            f"image of `{ann_path}` `{paths[missing[0]]}` not found; check the dataset folder and the file name"
        )
    rel = [_rel(p, root) for p in paths]
    cached = _all_cached_coco(cache, rel, paths, sizes, stats, split, ann_path, fingerprint)
    if cached is not None:
        return cached
    cache.load()
    stat_rows = [tuple(row) for row in stats.tolist()]
    entries, todo = _split_by_cache(cache, rel, stat_rows, fingerprint)

    def check(i: int) -> tuple[str, dict]:
        entry: dict = {"stat": list(stat_rows[i])}
        try:
            info = verify_image(Path(paths[i]))
        except BadImage as exc:
            return rel[i], entry | {"bad": str(exc)}
        if fingerprint == "content":
            entry["content"] = file_sha256(Path(paths[i]))
        return rel[i], entry | {"size": [info.width, info.height], "raw": [info.raw_width, info.raw_height]}

    entries |= dict(run_checks(todo, check))
    report = CheckReport(split, images=len(paths), cached=len(paths) - len(todo))
    kept, contents = [], []
    for i, (key, size) in enumerate(zip(rel, sizes.tolist(), strict=True)):
        entry = entries[key]
        contents.append(entry.get("content") or "")
        if entry.get("bad"):
            report.bad.append((key, entry["bad"]))
            continue
        if size not in (entry["size"], entry["raw"]):
            w, h = entry["size"]
            raise DataError(
                f"image `{paths[i]}` is {w}x{h} but `{ann_path}` says {size[0]}x{size[1]}; fix the annotation"
            )
        kept.append(i)
    report.cache_file = str(cache.path)
    if todo:
        note = cache.save(entries)
        if note:
            report.notes.append(f"{split}: {note}")
    return kept, contents, report


def _all_cached_coco(cache, rel, paths, sizes, stats, split, ann_path, fingerprint):
    """`_check_coco_files` in array operations, where every image has a valid per-file entry (the JSON
    changed, its images did not: 120k entry dicts would cost more than the JSON's parse); else None."""
    cols = cache.columns()
    if cols is None or not len(rel):
        return None
    row_of = dict(zip(cols["keys"].tolist(), range(len(cols["keys"])), strict=True))
    rows = np.fromiter((row_of.get(k, -1) for k in rel), np.int64, len(rel))
    if (rows < 0).any() or not np.array_equal(cols["stat"][rows, :2], stats):
        return None
    content = cols["content"][rows]
    if fingerprint == "content" and (content == "").any():
        return None
    bad = cols["bad"][rows]
    usable = bad == ""
    size_ok = (cols["size"][rows] == sizes).all(1) | (cols["raw"][rows] == sizes).all(1)
    wrong = np.flatnonzero(usable & ~size_ok)
    if len(wrong):
        i = int(wrong[0])
        (w, h), (jw, jh) = cols["size"][rows[i]].tolist(), sizes[i].tolist()
        raise DataError(f"image `{paths[i]}` is {w}x{h} but `{ann_path}` says {jw}x{jh}; fix the annotation")
    report = CheckReport(split, images=len(rel), cached=len(rel), cache_file=str(cache.path))
    report.bad = [(rel[i], str(bad[i])) for i in np.flatnonzero(~usable).tolist()]
    return np.flatnonzero(usable).tolist(), content.tolist(), report


class CocoIndex:
    """The split index of one COCO JSON: valid while the JSON and every image it names keep their (size,
    mtime); then a start reads neither the JSON nor the per-file entries."""

    def __init__(self, root: Path, ann_path: Path, split: str, options: dict) -> None:
        self.root, self.ann_path, self.split = root, ann_path, split
        self.cache = IndexCache.for_split(root, f"{split}:coco:{ann_path}", {})
        self.index = SplitIndex.beside(self.cache)
        self.settings = {"kind": "coco", "json": str(ann_path), "json_stat": list(stat_key(ann_path))} | options

    def load(self, on_bad_image: str, start: float) -> Split | None:
        snapshot = self.index.load(self.settings)
        if snapshot is None or not np.array_equal(_stat_table(snapshot.listed), snapshot.stats):
            return None
        meta = snapshot.meta
        report = report_from_meta(self.split, meta["report"], meta["names"])
        _refuse_unusable(report, snapshot.records, on_bad_image, [], [], [])
        report.cache_file, report.seconds = str(self.cache.path), time.perf_counter() - start
        return self._split(snapshot.records, meta, report)

    def build(self, table, meta: dict, note: str, on_bad_image: str, start: float) -> Split:
        """Check the images of `table` (a coco.CocoTable), make the split and save its index."""
        stats = _stat_table(table.paths)
        kept, contents, report = _check_coco_files(
            self.cache,
            self.root,
            self.ann_path,
            table.paths,
            table.numbers[:, :2],
            stats,
            self.split,
            self.settings["fingerprint"],
        )
        usable = np.zeros(len(table.paths), bool)
        usable[kept] = True
        rows = np.flatnonzero(np.repeat(usable, table.counts))  # the boxes of the usable images
        numbers = np.concatenate([table.numbers[kept], stats[kept]], 1)
        content = [contents[i].encode() for i in kept]
        records = FlatRecords.from_flat(
            [table.paths[i] for i in kept], numbers, table.boxes[rows], table.counts[kept], table.cls[rows], content
        )
        _refuse_unusable(report, records, on_bad_image, [], [], [])
        names = meta["names"]
        report.used = len(records)
        report.labels = int((table.raw_counts[kept] > 0).sum())
        report.backgrounds = int((table.counts[kept] == 0).sum())
        report.dropped_boxes = int((table.raw_counts[kept] - table.counts[kept]).sum())
        counts = np.bincount(records.cls, minlength=len(names))
        report.boxes = Counter({names[c]: int(k) for c, k in enumerate(counts.tolist()) if k})
        if note:
            report.notes.append(note)
        saved = self.index.save(
            self.settings, records, table.paths, stats, meta | {"report": report_meta(report, names)}
        )
        if saved:
            report.notes.append(f"{self.split}: {saved}")
        report.seconds = time.perf_counter() - start
        return self._split(records, meta, report)

    def _split(self, records: FlatRecords, meta: dict, report: CheckReport) -> Split:
        return Split(
            names=list(meta["names"]),
            records=records,
            class_to_category=list(meta["class_to_category"]),
            base=self.root,
            label_digest=meta["label_digest"],
            coco_json=self.ann_path,
            report=report,
        )


def fill_content_hashes(split: Split) -> None:
    """sha256 of every image that has none yet (to compare with a checkpoint fingerprinted by content)."""
    records = split.records
    missing = [i for i, rec in enumerate(records) if not rec.content]
    digests = run_checks(missing, lambda i: file_sha256(records[i].path))
    for i, digest in zip(missing, digests, strict=True):
        if isinstance(records, FlatRecords):
            records.set_content(i, digest)
        else:
            records[i].content = digest


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
