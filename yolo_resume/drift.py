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
    """Git, dataset, versions, device and threads: `current` has the same keys as checkpoint meta."""
    drifts = []
    if meta.get("dataset_fingerprint") != current["dataset_fingerprint"]:
        drifts.append(
            Drift(
                "dataset fingerprint",
                _short(meta.get("dataset_fingerprint")),
                _short(current["dataset_fingerprint"]),
                BREAKING,
                "the images or labels changed",
            )
        )
    old_git, new_git = meta.get("git") or {}, current["git"]
    if (old_git.get("commit"), old_git.get("dirty")) != (new_git.get("commit"), new_git.get("dirty")):
        drifts.append(
            Drift(
                "git commit",
                _git(old_git),
                _git(new_git),
                HARMLESS,
                "code changed: results may differ from an uninterrupted run",
            )
        )
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


def _short(fingerprint: str | None) -> str | None:
    return fingerprint[:12] if fingerprint else fingerprint


def _git(info: dict) -> str:
    commit = (info.get("commit") or "none")[:10]
    return commit + ("+dirty" if info.get("dirty") else "")
