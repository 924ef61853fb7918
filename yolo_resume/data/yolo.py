"""YOLO-format loading (`data.format: yolo`): the ultralytics images/ + labels/ layout and dataset YAML.

Read the way ultralytics reads it (`ultralytics.data.utils.check_det_dataset`, `img2label_paths`,
`verify_image_label` and `BaseDataset.get_img_files`), so a dataset that trains with `yolo train`
trains here the same. `images/<split>/x.jpg` pairs with `labels/<split>/x.txt` (one
`class cx cy w h` line per object, normalized 0-1; polygon lines are reduced to their box, pose lines
to their box when the YAML has `kpt_shape`). A missing label file is a background image. Where we
deliberately differ, the comment says so (and README's Datasets section lists it).
"""

from __future__ import annotations

import functools
import glob
import itertools
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import DataError
from .records import Split

# The suffixes we decode (OpenCV). Ultralytics also lists heic/heif/avif/dng/mpo/jp2, which need
# plugins cv2 does not have: such files are reported as skipped, never silently dropped.
IMAGE_SUFFIXES = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
UNSUPPORTED_IMAGE_SUFFIXES = frozenset({".avif", ".dng", ".heic", ".heif", ".jp2", ".mpo"})
_COORD_SLACK = 0.01  # ultralytics' 1% tolerance: exporters round; beyond it a coordinate is not normalized


@dataclass
class DatasetYaml:
    """What an ultralytics dataset YAML says, with its paths resolved as ultralytics resolves them."""

    file: Path
    root: Path
    splits: dict[str, list[Path]]  # train / val / test -> folders or list files (absolute)
    names: list[str]
    kpt_shape: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)  # what we renamed or fell back to, to show the user


def load_yolo_split(
    root_opt: str, spec: str, split: str, names: list[str] | None, on_bad_image: str = "skip", fingerprint: str = "stat"
) -> Split:
    """Load and check one split; `root_opt` is the data root folder or a dataset YAML."""
    from .check import index_yolo_split

    root = Path(root_opt)
    kpt_shape, notes = None, []
    if root.suffix.lower() in (".yaml", ".yml"):
        meta = read_dataset_yaml(root, needed=() if spec else (split,))
        sources = [meta.root / spec] if spec else meta.splits[split]
        root, kpt_shape, notes = meta.root, meta.kpt_shape, meta.notes
        names = names if names is not None else meta.names
    else:
        if not root.is_dir():
            raise DataError(f"dataset root `{root}` not found; check data.root")
        sources = [root / (spec or f"images/{split}")]
    if not names:
        raise DataError(f"yolo dataset `{root_opt}` needs class names: set data.names or `names` in the dataset YAML")
    listing = list_images(sources, split)
    if not listing.files:
        where = ", ".join(f"`{s}`" for s in sources)
        raise DataError(f"no images found for the {split} split in {where}; check data.root and data.{split}")
    loaded = index_yolo_split(root, listing, split, list(names), kpt_shape, on_bad_image, fingerprint)
    loaded.report.notes[:0] = notes
    return loaded


# ----------------------------------------------------------------------------- the dataset YAML

_KEY_TYPES = {  # ultralytics.data.utils.DATASET_KEY_TYPES
    "path": (str,),
    "train": (str, list),
    "val": (str, list),
    "test": (str, list),
    "names": (list, dict),
    "kpt_shape": (list,),
}


def read_dataset_yaml(path: Path, needed: tuple[str, ...] = ("train", "val")) -> DatasetYaml:
    """An ultralytics dataset YAML, checked and resolved by `check_det_dataset`'s rules (no downloads)."""
    if not path.is_file():
        raise DataError(f"dataset YAML `{path}` not found; check data.root")
    try:  # utf-8-sig: a BOM written by Windows editors is not part of the first key
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"dataset YAML `{path}` is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise DataError(f"dataset YAML `{path}` must be a mapping with path, train, val and names")
    where = f"dataset YAML `{path}`"
    for key, types in _KEY_TYPES.items():
        if data.get(key) is not None and not isinstance(data[key], types):
            expected = " or ".join("a mapping" if t is dict else f"a {t.__name__}" for t in types)
            raise DataError(f"{where}: `{key}` must be {expected}, got {data[key]!r}")
    notes = []
    if "val" not in data and "validation" in data:  # ultralytics renames it, with a warning
        data["val"] = data.pop("validation")
        notes.append(f"{where}: reading its `validation:` key as `val:`, as ultralytics does")
    for key in needed:
        if not data.get(key):
            raise DataError(
                f"{where} has no `{key}:` key; ultralytics requires `train:` and `val:` in every dataset YAML "
                f"(e.g. `{key}: images/{key}`), or set data.{key}"
            )
    names = _names(data, where)
    root = _dataset_root(data.get("path"), path, notes)
    splits = {key: _split_paths(root, data[key]) for key in ("train", "val", "test") if data.get(key)}
    return DatasetYaml(path, root, splits, names, _kpt_shape(data.get("kpt_shape"), where), notes)


def _names(data: dict, where: str) -> list[str]:
    """`names` (list, or mapping of class id to name) and `nc` by ultralytics' rules: they must agree."""
    names, nc = data.get("names"), data.get("nc")
    if names is None and "nc" not in data:
        raise DataError(f"{where} has neither `names` nor `nc`; add `names: [...]`")
    if "nc" in data:
        try:
            if isinstance(nc, bool) or float(nc) != int(float(nc)):
                raise ValueError
            nc = int(float(nc))
        except (TypeError, ValueError):
            raise DataError(f"{where}: `nc: {nc}` must be an integer") from None
    if names is None:
        return [f"class_{i}" for i in range(nc)]  # ultralytics' placeholder names
    if nc is not None and len(names) != nc:
        raise DataError(f"{where}: `names` has {len(names)} entries but `nc: {nc}`; they must match (fix or drop `nc`)")
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except (TypeError, ValueError):
            raise DataError(f"{where}: `names` keys must be integer class ids 0..{len(names) - 1}") from None
        if ids != list(range(len(names))):
            raise DataError(f"{where}: `names` keys must be the class ids 0..{len(names) - 1}, got {ids}")
        return [str(names.get(i, names.get(str(i)))) for i in range(len(names))]
    return [str(n) for n in names]


def _dataset_root(path_opt: Any, yaml_file: Path, notes: list[str]) -> Path:
    """Ultralytics: `path`, else the YAML's folder; a relative `path` that does not exist from the working
    directory is taken under its datasets_dir setting. We try one more place, the YAML's folder (where
    the YAML sits inside the dataset, as yolo-resume 0.2 read it), and say so."""
    if not path_opt:
        return yaml_file.parent.resolve()
    path = Path(path_opt).expanduser()
    if path.is_absolute() or path.exists():
        return path.resolve()
    tried = [Path.cwd() / path]
    datasets_dir = _ultralytics_datasets_dir()
    if datasets_dir is not None:
        if (datasets_dir / path).exists():
            return (datasets_dir / path).resolve()
        tried.append(datasets_dir / path)
    beside = yaml_file.parent / path
    if beside.exists():
        notes.append(f"dataset YAML `{yaml_file}`: `path: {path_opt}` read relative to the YAML's folder")
        return beside.resolve()
    tried.append(beside)
    raise DataError(
        f"dataset YAML `{yaml_file}`: `path: {path_opt}` not found (tried {', '.join(f'`{t}`' for t in tried)}); "
        "make it absolute or relative to the working directory"
    )


def _ultralytics_datasets_dir() -> Path | None:
    try:
        from ultralytics.utils import DATASETS_DIR
    except Exception:  # a broken settings file must not break reading a YAML
        return None
    return Path(DATASETS_DIR)


def _split_paths(root: Path, value: str | list) -> list[Path]:
    """`train:` / `val:` / `test:` entries under the root; a missing `../x` (Roboflow's exports write
    `train: ../train/images` next to a data.yaml inside the dataset) falls back to `x`, as ultralytics does."""
    if isinstance(value, list):
        return [(root / str(v)).resolve() for v in value]
    where = (root / value).resolve()
    if not where.exists() and value.startswith("../"):
        where = (root / value[3:]).resolve()
    return [where]


def _kpt_shape(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        or value[1] not in (2, 3)
    ):
        raise DataError(f"{where}: `kpt_shape` must be [keypoints, 2 or 3], got {value!r}")
    return int(value[0]), int(value[1])


# ----------------------------------------------------------------------------- listing images


@dataclass
class Listing:
    """The image files of a split (path strings, with their (size, mtime_ns) from the directory scan), and the
    files under its folders that are not used, with why."""

    files: list[str] = field(default_factory=list)
    stats: list[tuple[int, int]] = field(default_factory=list)  # per file: (size, mtime_ns)
    skipped: dict[str, list[Path]] = field(default_factory=dict)  # reason -> files

    @property
    def images(self) -> list[Path]:
        return [Path(f) for f in self.files]

    def skip(self, reason: str, path: Path) -> None:
        self.skipped.setdefault(reason, []).append(path)


HIDDEN = "hidden file or folder (.ipynb_checkpoints, macOS ._ files, ...)"
UNSUPPORTED = "image format cv2 cannot decode"


def list_images(sources: list[Path], split: str) -> Listing:
    """Images of folders (recursive, sorted) and `.txt` list files (in their order), as ultralytics lists
    them: hidden files and folders are not images (its glob skips them), the suffix decides what is an image."""
    listing = Listing()
    for where in sources:
        if where.is_dir():
            _walk_folder(where, listing)
        elif where.is_file():
            images = [str(image) for image in _read_list_file(where)]
            listing.files += images
            listing.stats += stat_paths(images)
        else:
            raise DataError(f"image folder or list file `{where}` not found; check data.root and data.{split}")
    return listing


def _walk_folder(folder: Path, listing: Listing) -> None:
    """The images under `folder` in Path order (each folder's entries sorted by name, a subfolder's images at
    its place among them: the order of sorting by path parts, the record ids of 0.2), with the size and mtime
    of each, and no Path object per file (100k of them cost a second)."""
    _walk_sorted(str(folder), listing, listing.files, listing.stats)


def _walk_sorted(dirpath: str, listing: Listing, files: list[str], stats: list[tuple[int, int]]) -> None:
    try:
        with os.scandir(dirpath) as scan:
            entries = list(scan)
    except OSError:  # an unreadable subfolder is passed over, as os.walk does
        return
    prefix = dirpath + os.sep
    if not any(map(_IS_DIR, entries)):  # a flat folder, the common case: one comprehension, not a branchy loop
        names = sorted(map(_NAME, entries))
        images = [n for n in names if n[0] != "." and n[n.rfind(".") :].lower() in IMAGE_SUFFIXES]
        if len(images) < len(names):
            _skip_other_files(prefix, names, set(images), listing)
        files += [prefix + n for n in images]
        stats += stat_names(dirpath, images)
        return
    names, at = [], []  # this folder's images, stat'ed together once its entries are listed
    for entry in sorted(entries, key=_NAME):
        name = entry.name
        if entry.is_dir():
            if entry.is_symlink():  # os.walk does not follow links to folders: neither do we
                continue
            if name.startswith("."):  # counted, not read: a checkpoint copy of every image is common
                _skip_hidden_folder(entry.path, listing)
            else:
                _walk_sorted(entry.path, listing, files, stats)
        elif _skip_or_image(prefix, name, listing):
            at.append(len(files))
            names.append(name)
            files.append(prefix + name)
            stats.append(_MISSING)
    for i, stat in zip(at, stat_names(dirpath, names), strict=True):
        stats[i] = stat


def _skip_or_image(prefix: str, name: str, listing: Listing) -> bool:
    """Whether the file `name` is an image to use; the ones that are not but look like images are recorded."""
    suffix = _suffix(name)
    if suffix not in IMAGE_SUFFIXES:
        if suffix in UNSUPPORTED_IMAGE_SUFFIXES:
            listing.skip(UNSUPPORTED, Path(prefix + name))
        return False
    if name[0] == ".":
        listing.skip(HIDDEN, Path(prefix + name))
        return False
    return True


def _skip_other_files(prefix: str, names: list[str], images: set[str], listing: Listing) -> None:
    for name in names:
        if name not in images:
            _skip_or_image(prefix, name, listing)


_IS_DIR = operator.methodcaller("is_dir")
_NAME = operator.attrgetter("name")
_SIZE_MTIME = operator.attrgetter("st_size", "st_mtime_ns")
_MISSING = (-1, -1)
_STAT_CHUNK = 4096  # files per bulk stat: a missing one sends only its chunk to the one-by-one path


def stat_names(folder: str, names: list[str]) -> list[tuple[int, int]]:
    """(size, mtime_ns) of the files `names` of `folder` (links followed), (-1, -1) where there is none.
    Why not `DirEntry.stat()` in a loop: a resume of a 50k-image split stats 100k files (images and labels),
    and a Python loop body per file cost about what the syscall does. Here `os.stat` relative to the
    folder's descriptor is mapped in C, in chunks: a chunk that meets a missing file is redone one file at a
    time. (A thread pool measured slower on 2 cores: the syscall, not Python, is what is left.)"""
    if not names:
        return []
    try:
        fd = os.open(folder or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except FileNotFoundError:  # what os.stat of each would say; other errors are raised as it raises them
        return [_MISSING] * len(names)
    try:
        stat = functools.partial(os.stat, dir_fd=fd) if os.stat in os.supports_dir_fd else None
        if stat is None:  # no *at() calls (Windows): full paths
            names = [folder + os.sep + n for n in names]
            stat = os.stat
        out: list[tuple[int, int]] = []
        for i in range(0, len(names), _STAT_CHUNK):
            chunk = names[i : i + _STAT_CHUNK]
            try:  # whole, before it is added: a chunk that fails half way must not leave its first half
                done = list(map(_SIZE_MTIME, map(stat, chunk)))
            except OSError:
                done = [_stat_one(stat, n) for n in chunk]
            out += done
        return out
    finally:
        os.close(fd)


def stat_paths(paths: list[str]) -> list[tuple[int, int]]:
    """`stat_names` over each run of `paths` in one folder: (size, mtime_ns) per path, (-1, -1) if missing."""
    out: list[tuple[int, int]] = []
    parts = [path.rpartition(os.sep) for path in paths]
    for (folder, sep), run in itertools.groupby(parts, key=_FOLDER_SEP):
        where = folder or (sep or ".")  # "/x.jpg": the root folder; "x.jpg": the working directory
        out += stat_names(where, [name for _, _, name in run])
    return out


_FOLDER_SEP = operator.itemgetter(0, 1)


def _stat_one(stat, name: str) -> tuple[int, int]:
    try:
        return _SIZE_MTIME(stat(name))
    except FileNotFoundError:  # removed during the scan, or a dangling link: the check names it
        return _MISSING


def _suffix(name: str) -> str:
    """os.path.splitext(name)[1].lower(), without its cost where the name has no leading dot."""
    if name[:1] == ".":
        return os.path.splitext(name)[1].lower()
    dot = name.rfind(".")
    return name[dot:].lower() if dot > 0 else ""


def _skip_hidden_folder(path: str, listing: Listing) -> None:
    for file in glob.glob(glob.escape(path) + "/**/*.*", recursive=True):
        if os.path.splitext(file)[1].lower() in IMAGE_SUFFIXES:
            listing.skip(HIDDEN, Path(file))


def label_stats(images: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
    """The label path of each image (`label_path`) and its (size, mtime_ns), (-1, -1) where there is none:
    one label folder scan per image folder instead of one Path and one stat call per image, and per run of
    images in one folder comprehensions, not a Python loop body per image."""
    scanned: dict[str, tuple[str, dict[str, tuple[int, int]]]] = {}
    paths: list[str] = []
    stats: list[tuple[int, int]] = []
    split = [image.rpartition(os.sep) for image in images]
    for folder, run in itertools.groupby(split, key=_FOLDER):
        known = scanned.get(folder)
        if known is None:
            label_folder = os.path.dirname(label_path(folder + os.sep + "x.jpg"))
            known = scanned[folder] = (label_folder, _scan_files(label_folder))
        label_folder, found = known
        labels = [name[: name.rfind(".")] + ".txt" for _, _, name in run]  # an image name has a suffix
        paths += [label_folder + os.sep + label for label in labels]
        stats += map(found.get, labels, itertools.repeat(_MISSING))
    return paths, stats


_FOLDER = operator.itemgetter(0)


def _scan_files(folder: str) -> dict[str, tuple[int, int]]:
    """The `.txt` files of `folder` with their (size, mtime_ns): names from one scan, stats in bulk."""
    try:
        with os.scandir(folder or ".") as entries:
            names = [e.name for e in entries if e.name.endswith(".txt") and e.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return dict(zip(names, stat_names(folder or ".", names), strict=True))


def _read_list_file(path: Path) -> list[Path]:
    """Image paths, one per line (UTF-8, with or without a BOM). `./x` is relative to the list file's folder
    (ultralytics' rule); another relative path too where that file exists, else to the working directory
    (ultralytics reads it from there)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"list file `{path}` is not UTF-8 text; write one image path per line") from None
    images = []
    for lineno, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if not entry:
            continue
        image = path.parent / entry
        if not image.is_file() and not entry.startswith("./") and Path(entry).is_file():
            image = Path(entry).resolve()
        if not image.is_file():
            raise DataError(f"list file `{path}` line {lineno}: image `{image}` not found")
        if image.suffix.lower() in IMAGE_SUFFIXES:
            images.append(image)
    return images


def label_path(image: Path | str) -> str:
    """The ultralytics convention (img2label_paths): the last `images` folder of the path becomes `labels`,
    the suffix `.txt`. A string: 100k Path objects cost a second."""
    text = os.sep + str(image)
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if images in text:
        text = labels.join(text.rsplit(images, 1))
    return os.path.splitext(text[1:])[0] + ".txt"


# ----------------------------------------------------------------------------- label files


@dataclass
class Labels:
    """One label file, parsed: normalized [cls, cx, cy, w, h] rows, duplicates removed."""

    rows: np.ndarray  # (n, 5) float64
    duplicates: int = 0


def parse_label_file(raw: bytes, path: Path, nc: int, kpt_shape: tuple[int, int] | None) -> Labels:
    """Ultralytics' label rules (verify_image_label): UTF-8 with or without a BOM, any line ending, box /
    polygon / pose rows, exact duplicate rows removed. We differ in two ways, on purpose: a bad row is an
    error naming the line (ultralytics drops the image with a warning), and a file mixing box and polygon
    rows is read row by row (ultralytics drops it)."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError(f"label file `{path}` is not UTF-8 text; labels are `class cx cy w h` lines") from None
    pose_len = 5 + kpt_shape[0] * kpt_shape[1] if kpt_shape else None
    rows, segments = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            row, segment = _parse_label_line(line, path, lineno, nc, pose_len)
            rows.append(row)
            segments.append(segment)
    if not rows:
        return Labels(np.zeros((0, 5)))
    # Duplicates as ultralytics sees them: same row (float32), and for polygons the same polygon too.
    keys = [np.float32(r).tobytes() + s for r, s in zip(rows, segments, strict=True)]
    first = sorted({k: i for i, k in reversed(list(enumerate(keys)))}.values())
    return Labels(np.array([rows[i] for i in first], np.float64), len(rows) - len(first))


def _parse_label_line(line: str, path: Path, lineno: int, nc: int, pose_len: int | None) -> tuple[list[float], bytes]:
    """([cls, cx, cy, w, h], polygon bytes) from a box, polygon or (with kpt_shape) pose row."""
    where = f"label file `{path}` line {lineno}"
    try:
        values = [float(v) for v in line.split()]
    except ValueError:
        raise DataError(f"{where}: expected `class cx cy w h` numbers, got `{line.strip()}`") from None
    segment = b""
    if len(values) == 5 or (pose_len is not None and len(values) == pose_len):
        c, cx, cy, w, h = values[:5]
        coords = values[1:5]
    elif len(values) >= 7 and len(values) % 2 == 1:
        xs, ys = values[1::2], values[2::2]
        c, cx, cy = values[0], (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
        w, h = max(xs) - min(xs), max(ys) - min(ys)
        coords, segment = values[1:], np.float32(values[1:]).tobytes()
    else:
        pose = f", or {pose_len} for a pose row (kpt_shape)" if pose_len else ""
        raise DataError(f"{where}: expected `class cx cy w h` (5 values{pose}), got {len(values)} values")
    if not c.is_integer() or not 0 <= c < nc:
        raise DataError(
            f"{where}: class id {line.split()[0]} is out of range 0-{nc - 1} ({nc} names); fix the label or data.names"
        )
    if not all(np.isfinite(coords)) or min(coords) < -_COORD_SLACK or max(coords) > 1 + _COORD_SLACK:
        raise DataError(f"{where}: coordinates must be normalized to 0-1, got `{line.strip()}`")
    return [c, cx, cy, max(w, 0.0), max(h, 0.0)], segment


def label_boxes(labels: Labels, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """xyxy pixel boxes (clipped; a box with no area is dropped, in training and in the ground truth alike)."""
    from .records import clip_boxes, empty_targets

    lab = labels.rows
    if not len(lab):
        return empty_targets()
    scale = np.array([width, height, width, height])
    xyxy = np.concatenate([lab[:, 1:3] - lab[:, 3:5] / 2, lab[:, 1:3] + lab[:, 3:5] / 2], 1) * scale
    return clip_boxes(xyxy, lab[:, 0].astype(np.int64), width, height)
