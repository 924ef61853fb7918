"""The file list behind a dataset fingerprint, kept in the run so that a refused resume can say which files
changed (a fingerprint only says that something did).

One small JSON per distinct fingerprint, `<run>/datasets/<fingerprint digest>.json`: every image with its
size and mtime (and content hash when computed), every label file with its sha256 (COCO: the JSON's).
Checkpoints name the manifest of their fingerprint (`dataset_manifest` in their metadata).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from .records import Split, _rel, record_columns

MANIFEST_DIR = "datasets"
_SHOWN = 5  # files named per kind of change


def split_manifest(split: Split) -> dict:
    rels, sizes, mtimes, contents = record_columns(split)
    images = {
        rel: [size, mtime, content] for rel, size, mtime, content in zip(rels, sizes, mtimes, contents, strict=True)
    }
    labels = dict(split.label_files.items())
    if split.coco_json is not None:
        labels = {_rel(split.coco_json, split.base): split.label_digest}
    return {"base": str(split.base), "images": images, "labels": labels}


def write_manifest(run_dir: Path, fingerprint: str, train: Split, val: Split) -> Path:
    """The manifest of `fingerprint` in `run_dir` (written once, atomically); its path."""
    name = hashlib.sha256(fingerprint.encode()).hexdigest()[:16] + ".json"
    path = Path(run_dir) / MANIFEST_DIR / name
    if path.is_file():
        return path
    body = {"fingerprint": fingerprint, "train": split_manifest(train), "val": split_manifest(val)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(body, f, separators=(",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest(path: str | None) -> dict | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            body = json.load(f)
    except (OSError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def changed_files(old: dict, new: dict) -> list[str]:
    """`train: 2 images changed (a.jpg, b.jpg); val: 1 label removed (...)`-style phrases, one per kind."""
    phrases = []
    for split in ("train", "val"):
        before, after = old.get(split) or {}, new.get(split) or {}
        for kind in ("images", "labels"):
            a, b = before.get(kind) or {}, after.get(kind) or {}
            singular = kind[:-1]
            for verb, names in (
                ("changed", [k for k in b if k in a and a[k] != b[k]]),
                ("added", [k for k in b if k not in a]),
                ("removed", [k for k in a if k not in b]),
            ):
                if names:
                    shown = ", ".join(sorted(names)[:_SHOWN]) + (" ..." if len(names) > _SHOWN else "")
                    count = f"{len(names)} {singular if len(names) == 1 else kind}"
                    phrases.append(f"{split}: {count} {verb} ({shown})")
    return phrases
