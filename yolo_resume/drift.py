"""What changed between a checkpoint and the run about to resume it, and how much that matters.

Three classes:
- harmless: cannot change the numbers (workers, device, logging, checkpoint and eval settings);
  environment differences that may change the last bits are harmless too, with a note.
- schedule: changes how training proceeds from here (epochs, LR, augmentation); allowed, shown.
- breaking: the checkpoint no longer describes this run (model, imgsz, batch, dataset);
  resuming is refused unless --allow-drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch

HARMLESS, SCHEDULE, BREAKING = "harmless", "schedule", "breaking"

# First match wins; anything unlisted is breaking, the safe default for keys added later.
KEY_CLASSES: list[tuple[str, str]] = [
    ("train.workers", HARMLESS),
    ("train.device", HARMLESS),
    ("train.deterministic", HARMLESS),
    ("eval.*", HARMLESS),
    ("ckpt.*", HARMLESS),
    ("dist.*", HARMLESS),
    ("train.nan_retries", HARMLESS),
    ("train.epochs", SCHEDULE),
    ("train.lr0", SCHEDULE),
    ("train.lrf", SCHEDULE),
    ("train.schedule", SCHEDULE),
    ("train.lr_decay_every", SCHEDULE),
    ("train.ema_tau", SCHEDULE),
    ("train.accumulate_ramp", SCHEDULE),
    ("train.momentum", SCHEDULE),
    ("train.weight_decay", SCHEDULE),
    ("train.warmup_*", SCHEDULE),
    ("train.box", SCHEDULE),
    ("train.cls", SCHEDULE),
    ("train.dfl", SCHEDULE),
    ("train.max_grad_norm", SCHEDULE),
    ("train.amp", SCHEDULE),
    ("augment.*", SCHEDULE),
    ("data.train_images", HARMLESS),  # the fingerprint catches a real change of images
    ("data.val_images", HARMLESS),
    ("data.root", HARMLESS),
    ("data.fingerprint", HARMLESS),  # the fingerprints are compared in the checkpoint's scheme
    ("data.on_bad_image", HARMLESS),  # skipping other images changes the fingerprint
    ("data.*", BREAKING),
    ("model.*", BREAKING),
    ("train.*", BREAKING),  # batch, nbs, optimizer, seed, ema, deterministic
]


@dataclass(frozen=True)
class Drift:
    what: str
    stored: object
    current: object
    kind: str
    note: str = ""


def classify_key(key: str) -> str:
    return next(kind for pattern, kind in KEY_CLASSES if fnmatch(key, pattern))


def flatten(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_drift(stored: dict, current: dict) -> list[Drift]:
    old, new = flatten(stored), flatten(current)
    return [
        Drift(key, old.get(key), new.get(key), classify_key(key))
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def environment_drift(meta: dict, current: dict) -> list[Drift]:
    """Git, dataset, versions, device and threads: `current` has the same keys as checkpoint meta (and,
    from the trainer, the means to recompute what an older checkpoint stored: see `Environment`)."""
    drifts = dataset_drift(meta, current) + code_drift(meta, current)
    for pkg, version in current["versions"].items():
        stored = (meta.get("versions") or {}).get(pkg)
        if stored != version:
            note = "results may differ in the last bits"
            if pkg == "yolo-resume":  # the stored config carries the recipe (config.from_stored)
                note = "the run keeps the training recipe of the version that started it; " + note
            drifts.append(Drift(f"version {pkg}", stored, version, HARMLESS, note))
    old_world, new_world = meta.get("world_size") or 1, current.get("world_size", 1)
    if old_world != new_world:
        drifts.append(
            Drift(
                "world size",
                old_world,
                new_world,
                HARMLESS,
                "each global batch keeps its images, but they are split across a different number of ranks: "
                "results are not bitwise those of the old world size",
            )
        )
    for key in ("device", "threads"):
        if meta.get(key) != current[key]:
            drifts.append(Drift(key, meta.get(key), current[key], HARMLESS, "results may differ in the last bits"))
    return drifts


class Environment(dict):
    """The trainer's environment (a plain dict in checkpoint metadata), plus what comparing it with an
    older checkpoint needs: the dataset fingerprint in another scheme or in 0.2's format, computed on demand."""

    def __init__(self, values: dict, fingerprint_in=None, legacy_fingerprint=None):
        super().__init__(values)
        self.fingerprint_in = fingerprint_in  # scheme -> fingerprint string
        self.legacy_fingerprint = legacy_fingerprint  # () -> the 0.2 fingerprint


def _fingerprint_like(stored: str | None, current: dict) -> str | None:
    """The current dataset fingerprint in the form `stored` has (scheme, or the 0.2 format)."""
    now = current["dataset_fingerprint"]
    if not stored or stored.split(":", 1)[0] == now.split(":", 1)[0]:
        return now
    scheme = stored.split(":", 1)[0]
    if not scheme.startswith("v2-") and getattr(current, "legacy_fingerprint", None):
        return current.legacy_fingerprint()
    if scheme.startswith("v2-") and getattr(current, "fingerprint_in", None):
        return current.fingerprint_in(scheme[3:])
    return now


def dataset_drift(meta: dict, current: dict) -> list[Drift]:
    """The dataset fingerprint, compared like with like; when it differs, which files changed and how to go on."""
    from .data.manifest import changed_files, read_manifest

    stored = meta.get("dataset_fingerprint")
    if stored == _fingerprint_like(stored, current):
        return []
    old, new = read_manifest(meta.get("dataset_manifest")), read_manifest(current.get("dataset_manifest"))
    changes = changed_files(old, new) if old and new else []
    what = "; ".join(changes) if changes else "the images or labels changed (no file list recorded with the checkpoint)"
    note = (
        f"{what}. If the data is meant to change (e.g. a broken image fixed), resume with --allow-drift: training "
        "continues on the new data, so it no longer matches an uninterrupted run"
    )
    return [Drift("dataset fingerprint", _short(stored), _short(current["dataset_fingerprint"]), BREAKING, note)]


def code_drift(meta: dict, current: dict) -> list[Drift]:
    """The experiment's repo (the config file's) and yolo-resume's own code, each compared with itself: a
    checkpoint that recorded a repo is compared with that repo now, wherever this process runs."""
    from .provenance import git_info

    drifts = []
    old_git, new_git = meta.get("git") or {}, current["git"]
    if old_git.get("repo") and old_git.get("repo") != new_git.get("repo"):
        new_git = git_info(old_git["repo"])
    if (old_git.get("commit"), old_git.get("dirty")) != (new_git.get("commit"), new_git.get("dirty")):
        drifts.append(
            Drift(
                "git commit" + (f" of {old_git['repo']}" if old_git.get("repo") else ""),
                _git(old_git),
                _git(new_git),
                HARMLESS,
                "the experiment's code changed: results may differ from an uninterrupted run",
            )
        )
    old_code, new_code = meta.get("code"), current.get("code") or {}
    if old_code is not None and (old_code.get("commit"), old_code.get("dirty")) != (
        new_code.get("commit"),
        new_code.get("dirty"),
    ):
        drifts.append(
            Drift("yolo-resume commit", _git(old_code), _git(new_code), HARMLESS, "results may differ in the last bits")
        )
    return drifts


def _short(fingerprint: str | None) -> str | None:
    """`v2-stat:1a2b3c4d5e6f` (scheme and the train digest's start), or 0.2's bare digest start."""
    if not fingerprint:
        return fingerprint
    head, _, rest = fingerprint.partition(":")
    return f"{head}:{rest[:12]}" if head.startswith("v2-") else fingerprint[:12]


def _git(info: dict) -> str:
    commit = (info.get("commit") or "none")[:10]
    return commit + ("+dirty" if info.get("dirty") else "")
