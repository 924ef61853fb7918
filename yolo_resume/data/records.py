"""What a loaded split is: per-image records plus what evaluation and fingerprinting need.

Both loaders (COCO and YOLO) produce a `Split`; everything downstream (augmentation, the
dataset, evaluation) only sees this format, so the two layouts behave identically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np

from ..errors import DataError


@dataclass
class ImageRecord:
    """One image: where it is, its size, and its training targets in original pixels."""

    path: Path
    width: int
    height: int
    boxes: np.ndarray  # (n, 4) float32 xyxy, clipped to the image, positive size
    cls: np.ndarray  # (n,) int64 contiguous class ids
    image_id: int
    file_size: int = 0  # bytes on disk: part of the fingerprint, read once at load time
    mtime_ns: int = 0  # modification time: part of the `stat` fingerprint
    content: str = ""  # sha256 of the file, with `data.fingerprint: content` (cached in the dataset index)


class FlatRecords(Sequence):
    """The records of a split as a few flat numpy arrays (paths as one UTF-8 blob with offsets, boxes of every
    image concatenated with offsets): the list API (`len`, `[i]`, iteration) over `ImageRecord`s made on
    demand. Why: 120k `ImageRecord`s are 120k objects (a `Path` and two arrays each) whose reference counts a
    forked data-loader worker writes, copying their pages one by one; a dozen arrays are never written, so
    workers share them (detectron2's `DatasetFromList(serialize=True)`). `records[i]` is a fresh object with
    read-only views: edit a column with `set_content`, not an item."""

    COLUMNS = ("path_blob", "path_offsets", "width", "height", "image_id", "file_size", "mtime_ns")
    COLUMNS += ("boxes", "box_offsets", "cls", "content")

    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        self.path_blob = np.ascontiguousarray(columns["path_blob"], np.uint8)
        self.path_offsets = np.asarray(columns["path_offsets"], np.int64)
        n = len(self.path_offsets) - 1
        self.width = np.asarray(columns["width"], np.int64).reshape(n)
        self.height = np.asarray(columns["height"], np.int64).reshape(n)
        self.image_id = np.asarray(columns["image_id"], np.int64).reshape(n)
        self.file_size = np.asarray(columns["file_size"], np.int64).reshape(n)
        self.mtime_ns = np.asarray(columns["mtime_ns"], np.int64).reshape(n)
        self.boxes = np.asarray(columns["boxes"], np.float32).reshape(-1, 4)
        self.box_offsets = np.asarray(columns["box_offsets"], np.int64).reshape(n + 1)
        self.cls = np.asarray(columns["cls"], np.int64).reshape(-1)
        content = np.asarray(columns["content"] if columns.get("content") is not None else np.zeros(n, "S1"))
        if content.dtype.kind != "S" or content.itemsize > 64:
            raise ValueError("content hashes must be bytes of at most 64 characters")
        # Without hashes (`fingerprint: stat`, the default) one byte per image, not 64.
        self.content = content.reshape(n) if (content != b"").any() else np.zeros(n, "S1")
        if self.box_offsets[-1] != len(self.boxes) or len(self.cls) != len(self.boxes):
            raise ValueError("box offsets do not match the boxes")
        if n and (self.path_offsets[-1] != len(self.path_blob) or (np.diff(self.path_offsets) < 0).any()):
            raise ValueError("path offsets do not match the path blob")
        if n and (np.diff(self.box_offsets) < 0).any():
            raise ValueError("box offsets are not increasing")
        for array in (self.boxes, self.cls):
            array.flags.writeable = False  # items hand out views of them

    @classmethod
    def from_records(cls, records: Iterable[ImageRecord]) -> FlatRecords:
        records = list(records)
        paths = [str(r.path).encode() for r in records]
        boxes = [np.asarray(r.boxes, np.float32).reshape(-1, 4) for r in records]
        classes = [np.asarray(r.cls, np.int64).reshape(-1) for r in records]
        return cls.from_columns(
            paths,
            [(r.width, r.height, r.image_id, r.file_size, r.mtime_ns) for r in records],
            boxes,
            classes,
            [r.content.encode() for r in records],
        )

    @classmethod
    def from_columns(
        cls,
        paths: list[bytes],
        numbers: Sequence[tuple[int, int, int, int, int]] | np.ndarray,
        boxes: list[np.ndarray],
        classes: list[np.ndarray],
        content: list[bytes] | np.ndarray | None = None,
    ) -> FlatRecords:
        """From per-image encoded paths, (width, height, image_id, file_size, mtime_ns) rows, boxes and classes."""
        n = len(paths)
        table = np.asarray(numbers, np.int64).reshape(n, 5)
        counts = np.fromiter((len(b) for b in boxes), np.int64, n)
        return cls(
            {
                "path_blob": np.frombuffer(b"".join(paths), np.uint8),
                "path_offsets": _offsets(np.fromiter((len(p) for p in paths), np.int64, n)),
                "width": table[:, 0],
                "height": table[:, 1],
                "image_id": table[:, 2],
                "file_size": table[:, 3],
                "mtime_ns": table[:, 4],
                "boxes": np.concatenate(boxes) if n else np.zeros((0, 4), np.float32),
                "box_offsets": _offsets(counts),
                "cls": np.concatenate(classes) if n else np.zeros((0,), np.int64),
                "content": np.asarray(content, "S64") if content is not None and len(content) else None,
            }
        )

    @classmethod
    def from_flat(
        cls,
        paths: list[str],
        numbers: Sequence[tuple[int, int, int, int, int]],
        boxes: np.ndarray,
        counts: np.ndarray,
        classes: np.ndarray,
        content: list[bytes] | None = None,
    ) -> FlatRecords:
        """From path strings, (width, height, image_id, file_size, mtime_ns) rows and the boxes and classes of
        every image concatenated, `counts[i]` of them image i's."""
        blob, offsets = cls.join_blob(paths)
        table = np.asarray(numbers, np.int64).reshape(len(paths), 5)
        return cls(
            {
                "path_blob": blob,
                "path_offsets": offsets,
                "width": table[:, 0],
                "height": table[:, 1],
                "image_id": table[:, 2],
                "file_size": table[:, 3],
                "mtime_ns": table[:, 4],
                "boxes": boxes,
                "box_offsets": _offsets(np.asarray(counts, np.int64)),
                "cls": classes,
                "content": np.asarray(content, "S64") if content is not None and len(content) else None,
            }
        )

    def columns(self) -> dict[str, np.ndarray]:
        """The arrays (what the dataset index stores)."""
        return {name: getattr(self, name) for name in self.COLUMNS}

    def __len__(self) -> int:
        return len(self.path_offsets) - 1

    @overload
    def __getitem__(self, index: int) -> ImageRecord: ...
    @overload
    def __getitem__(self, index: slice) -> list[ImageRecord]: ...
    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        i = int(index)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"record {index} out of range for {n} records")
        lo, hi = self.box_offsets[i], self.box_offsets[i + 1]
        return ImageRecord(
            Path(self.path_str(i)),
            int(self.width[i]),
            int(self.height[i]),
            self.boxes[lo:hi],
            self.cls[lo:hi],
            int(self.image_id[i]),
            int(self.file_size[i]),
            int(self.mtime_ns[i]),
            self.content[i].decode(),
        )

    def __iter__(self) -> Iterator[ImageRecord]:
        return (self[i] for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (FlatRecords, list)):
            return len(self) == len(other) and all(map(_same_record, self, other))
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def path_str(self, i: int) -> str:
        return self.path_blob[self.path_offsets[i] : self.path_offsets[i + 1]].tobytes().decode()

    def path_strs(self) -> list[str]:
        """Every path as a string, in one decode (no Path objects)."""
        return self.split_blob(self.path_blob, self.path_offsets)

    @staticmethod
    def join_blob(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Strings as one UTF-8 blob and n + 1 byte offsets."""
        encoded = [t.encode() for t in texts]
        counts = np.fromiter((len(e) for e in encoded), np.int64, len(encoded))
        return np.frombuffer(b"".join(encoded), np.uint8), _offsets(counts)

    @staticmethod
    def split_blob(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
        """The strings of `join_blob` (ValueError for offsets that do not fit the blob)."""
        blob, cuts = np.asarray(blob, np.uint8), np.asarray(offsets, np.int64)
        if cuts.ndim != 1 or not len(cuts) or cuts[0] != 0 or cuts[-1] != len(blob) or (np.diff(cuts) < 0).any():
            raise ValueError("offsets do not fit the blob")
        raw = blob.tobytes()
        text = raw.decode()
        bounds = cuts.tolist()
        if len(text) == len(raw):  # ASCII: byte offsets are character offsets
            return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        return [raw[a:b].decode() for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def contents(self) -> list[str]:
        return [c.decode() for c in self.content.tolist()]

    def set_content(self, index: int, digest: str) -> None:
        if self.content.itemsize < 64:
            self.content = self.content.astype("S64")
        self.content[index] = digest.encode()

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.columns().values())


class LabelFiles(Mapping):
    """A YOLO split's label files (relative path -> sha256) as a path blob and a digest column: 120k of them
    as a dict are ~40 MB of small objects kept for the whole run, read only when a manifest is written."""

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, digests: np.ndarray) -> None:
        self.blob, self.offsets = np.asarray(blob, np.uint8), np.asarray(offsets, np.int64)
        self.digests = np.asarray(digests, "S64").reshape(-1)
        if len(self.offsets) != len(self.digests) + 1:
            raise ValueError("label offsets do not match the digests")
        cuts = self.offsets
        if not len(cuts) or cuts[0] != 0 or cuts[-1] != len(self.blob) or (np.diff(cuts) < 0).any():
            raise ValueError("label offsets do not fit the path blob")
        self._index: dict[str, int] | None = None

    @classmethod
    def from_dict(cls, files: Mapping[str, str]) -> LabelFiles:
        blob, offsets = FlatRecords.join_blob(list(files))
        return cls(blob, offsets, np.array([v.encode() for v in files.values()], "S64").reshape(-1))

    def columns(self) -> dict[str, np.ndarray]:
        return {"label_blob": self.blob, "label_offsets": self.offsets, "label_sha": self.digests}

    def __len__(self) -> int:
        return len(self.digests)

    def __iter__(self) -> Iterator[str]:
        return iter(FlatRecords.split_blob(self.blob, self.offsets))

    def __getitem__(self, key: str) -> str:
        if self._index is None:
            self._index = {k: i for i, k in enumerate(self)}
        return self.digests[self._index[key]].decode()

    def items(self):  # type: ignore[override]  # in one pass, without the index
        return list(zip(self, (d.decode() for d in self.digests.tolist()), strict=True))


def _offsets(counts: np.ndarray) -> np.ndarray:
    out = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=out[1:])
    return out


def _same_record(a: ImageRecord, b: ImageRecord) -> bool:
    return (
        Path(a.path) == Path(b.path)
        and (a.width, a.height, a.image_id, a.file_size, a.mtime_ns, a.content)
        == (b.width, b.height, b.image_id, b.file_size, b.mtime_ns, b.content)
        and np.array_equal(np.asarray(a.boxes).reshape(-1, 4), np.asarray(b.boxes).reshape(-1, 4))
        and np.array_equal(np.asarray(a.cls).reshape(-1), np.asarray(b.cls).reshape(-1))
    )


@dataclass
class Split:
    """A loaded train or val split. `records` is a `FlatRecords` (the loaders make one; a list still works)."""

    names: list[str]
    records: FlatRecords | list[ImageRecord]
    class_to_category: list[int]  # contiguous class id -> COCO category id of `coco_gt`
    base: Path  # image paths are fingerprinted relative to this folder
    label_digest: str  # sha256 of the annotation / label contents the records came from
    coco_json: Path | None = None  # coco: the ground truth file; None: built from the records
    report: Any = None  # the up-front check's findings (check.CheckReport)
    label_files: Mapping[str, str] = field(default_factory=dict)  # yolo: label path (relative) -> sha256


def empty_targets() -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)


def clip_boxes(boxes: np.ndarray, cls: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Clip xyxy boxes to the image and drop those left with no area."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    cls = np.asarray(cls, np.int64).reshape(-1)
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], cls[keep]


def file_size(path: Path, what: str) -> int:
    """Size of an image file, or a DataError naming it (a missing image fails at load, not mid-epoch)."""
    try:
        return path.stat().st_size
    except OSError:
        raise DataError(f"{what} `{path}` not found; check the dataset folder and the file name") from None


FINGERPRINT_SCHEMES = ("stat", "content")
FINGERPRINT_VERSION = "v2"  # before: sha256 over (path, size) only, without a scheme prefix


def fingerprint(split: Split, scheme: str = "stat") -> str:
    """sha256 over sorted (relative image path, size, and the mtime (`stat`) or the sha256 of the bytes
    (`content`)), the label contents and the class names."""
    if scheme not in FINGERPRINT_SCHEMES:
        raise ValueError(f"unknown fingerprint scheme {scheme!r}")
    rels, sizes, mtimes, contents = record_columns(split)
    third = mtimes if scheme == "stat" else contents
    files = sorted(zip(rels, sizes, third, strict=True))
    return _digest({"files": files, "labels": split.label_digest, "names": split.names})


def record_columns(split: Split) -> tuple[list[str], list[int], list[int], list[str]]:
    """(relative paths, sizes, mtimes, content hashes) of the split's images, from the flat columns when
    the records are flat (no per-image object)."""
    records = split.records
    if isinstance(records, FlatRecords):
        rels = rel_paths(records.path_strs(), split.base)
        return rels, records.file_size.tolist(), records.mtime_ns.tolist(), records.contents()
    rels = [_rel(r.path, split.base) for r in records]
    return rels, [r.file_size for r in records], [r.mtime_ns for r in records], [r.content for r in records]


def rel_paths(paths: list[str], base: Path) -> list[str]:
    """Paths relative to `base`, POSIX style: a prefix cut where it can be (100k relpath calls cost a second)."""
    prefix = str(base).rstrip(os.sep) + os.sep
    cut = len(prefix)
    if os.sep != "/":
        return [_rel(Path(p), base) for p in paths]
    return [p[cut:] if p.startswith(prefix) else _rel(Path(p), base) for p in paths]


def legacy_fingerprint(split: Split, label_digest: str | None = None) -> str:
    """The fingerprint yolo-resume 0.2 stored (paths and sizes only), to compare a checkpoint it wrote."""
    rels, sizes, _, _ = record_columns(split)
    files = sorted(zip(rels, sizes, strict=True))
    return _digest({"files": files, "labels": label_digest or split.label_digest, "names": split.names})


def dataset_fingerprint(train: Split, val: Split, scheme: str) -> str:
    """What a checkpoint stores: `v2-<scheme>:<train>:<val>`."""
    return f"{FINGERPRINT_VERSION}-{scheme}:{fingerprint(train, scheme)}:{fingerprint(val, scheme)}"


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, separators=(",", ":")).encode()).hexdigest()
