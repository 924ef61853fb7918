"""Typed training configuration.

One dataclass per section, one documented default per field (the `doc` metadata is what the
README's config reference and `--help` show). YAML is only how a config is stored: loading
validates every key and type and raises a one-line `ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

PACKAGE_CONFIGS = Path(__file__).parent / "configs"


def opt(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a one-line description."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class DataConfig:
    format: str = opt("synthetic", "Dataset format: `coco`, `yolo` or `synthetic`.")
    root: str = opt("datasets/demo", "Dataset root folder (for `yolo`, may also be a dataset YAML file).")
    train: str = opt(
        "",
        "Training split. coco: annotation JSON relative to root (default `annotations/instances_train.json`, "
        "else a Roboflow export's `train/_annotations.coco.json`); yolo: image folder or list file (default "
        "`images/train`, or the dataset YAML's `train:`).",
    )
    val: str = opt("", "Validation split, same rules as `train` (default the `val` counterpart; Roboflow: `valid/`).")
    train_images: str = opt(
        "",
        "coco only: training image folder (default `images/<name>` or `<name>` for `instances_<name>.json`, else "
        "whichever of the JSON's folder, `images/` and the root holds the images it names).",
    )
    val_images: str = opt("", "coco only: validation image folder (default found as for `train_images`).")
    names: list[str] | None = opt(None, "Class names; coco: taken from the categories when unset.")
    on_bad_image: str = opt(
        "skip",
        "An image that cannot be read or decoded, found by the check before training: `skip` it with a warning "
        "naming it (as ultralytics), or `error`: refuse to start.",
    )
    fingerprint: str = opt(
        "stat",
        "What the dataset fingerprint (compared on resume) covers per image: `stat` (path, size, mtime) or "
        "`content` (path, size, sha256 of the bytes; hashed once, then cached in the dataset index).",
    )
    num_train: int = opt(400, "synthetic: number of training images.")
    num_val: int = opt(100, "synthetic: number of validation images.")
    num_classes: int = opt(3, "synthetic: number of shape classes (1-6).")
    image_size: int = opt(160, "synthetic: side of the generated images in pixels.")
    seed: int = opt(0, "synthetic: seed of the generator (the dataset is a pure function of its params).")


@dataclass
class ModelConfig:
    cfg: str = opt("yolov5s.yaml", "Ultralytics model YAML (`yolov5s.yaml`, `yolov5n.yaml`, ... or a path).")
    imgsz: int = opt(640, "Square training and validation image size (multiple of 32).")


@dataclass
class TrainConfig:
    epochs: int = opt(100, "Number of epochs.")
    batch: int = opt(16, "Images per optimizer micro-batch.")
    nbs: int = opt(64, "Nominal batch size: gradients accumulate over round(nbs / batch) micro-batches.")
    accumulate_ramp: bool = opt(
        True,
        "As ultralytics: accumulate 1 micro-batch at the start of warmup, rising to round(nbs / batch) at its end, "
        "in windows that run across epochs (false: fixed windows that restart at each epoch).",
    )
    workers: int = opt(
        -1,
        "DataLoader worker processes (0 = load in the main process). -1 = auto: 0 on CPU, where the model, not "
        "the data, is the bottleneck and a worker only costs memory; min(8, cores per process) on CUDA.",
    )
    seed: int = opt(0, "Seed of everything random: init, data order, augmentation.")
    deterministic: bool = opt(True, "Use deterministic algorithms (required for bitwise-exact resume).")
    optimizer: str = opt(
        "auto",
        "Optimizer: `SGD` (nesterov), `AdamW`, or `auto` (as ultralytics: AdamW with lr0 = 0.002 * 5 / (4 + classes) "
        "and momentum 0.9 for runs of up to 10000 optimizer steps, else SGD with lr0 0.01; no bias warmup; chosen "
        "once when the run starts and recorded in its config).",
    )
    lr0: float = opt(0.01, "Initial learning rate.")
    lrf: float = opt(0.01, "Final learning rate as a fraction of lr0.")
    schedule: str = opt("linear", "LR decay after warmup: `linear` or `cosine`.")
    lr_decay_every: str = opt(
        "epoch",
        "`epoch`: the LR decays once per epoch, lr0 * lf(epoch) (ultralytics' LambdaLR stepped per epoch); "
        "`batch`: it decays smoothly every batch, to lr0 * lrf at the last one.",
    )
    momentum: float = opt(0.937, "SGD momentum / Adam beta1.")
    weight_decay: float = opt(0.0005, "Weight decay (not applied to norms and biases); scaled by batch/nbs.")
    warmup_epochs: float = opt(3.0, "Warmup length in epochs (batches; at most all epochs but the last).")
    warmup_momentum: float = opt(0.8, "SGD momentum at the start of warmup (Adam's beta1 only with warmup_beta1).")
    warmup_beta1: bool = opt(False, "Adam only: also ramp beta1 from warmup_momentum to momentum during warmup.")
    warmup_bias_lr: float = opt(0.1, "Bias learning rate at the start of warmup (falls to the regular LR).")
    box: float = opt(7.5, "Box loss gain.")
    cls: float = opt(0.5, "Classification loss gain.")
    dfl: float = opt(1.5, "Distribution focal loss gain.")
    ema: bool = opt(True, "Keep an exponential moving average of the weights (validated and exported).")
    ema_tau: float = opt(
        2000.0, "EMA warm-up in optimizer steps: decay = 0.9999 * (1 - exp(-updates / tau)) (ultralytics' ModelEMA)."
    )
    amp: bool = opt(True, "Mixed precision on CUDA (ignored on CPU).")
    device: str = opt("auto", "`auto`, `cpu`, `cuda` or `cuda:N`.")
    max_grad_norm: float = opt(10.0, "Gradient clipping norm (0 disables).")
    nan_retries: int = opt(
        3, "On a non-finite loss, roll back to the newest valid checkpoint at most this many times, then stop."
    )


@dataclass
class AugmentConfig:
    fliplr: float = opt(0.5, "Probability of a horizontal flip.")
    hsv_h: float = opt(0.015, "Hue jitter (fraction).")
    hsv_s: float = opt(0.7, "Saturation jitter (fraction).")
    hsv_v: float = opt(0.4, "Value jitter (fraction).")
    scale: float = opt(0.5, "Random scale range: 1 +- scale.")
    translate: float = opt(0.1, "Random translation as a fraction of imgsz.")
    mosaic: float = opt(1.0, "Probability of a 4-image mosaic.")
    close_mosaic: int = opt(10, "Disable mosaic for the last N epochs.")
    mosaic_window: int = opt(
        128,
        "Where an item's 3 mosaic partners come from: the other images of its block of about N consecutive positions "
        "in the epoch's sample order (128: the size of ultralytics' mosaic buffer at batch 16), decoded once into a "
        "cache all data-loader workers share (2 blocks of images at imgsz: 317 MB at 640 px). 0: any image of the "
        "split (~4 JPEG decodes per item instead of ~1). Runs saved before this key existed resume with 0.",
    )


@dataclass
class EvalConfig:
    every_epochs: int = opt(1, "Validate every N epochs (and always after the last one); 0 disables.")
    conf: float = opt(0.001, "NMS confidence threshold for mAP.")
    iou: float = opt(0.7, "NMS IoU threshold.")
    max_det: int = opt(300, "Maximum detections per image.")


@dataclass
class CkptConfig:
    dir: str = opt("", "Checkpoint folder (default `<run dir>/checkpoints`).")
    every_epochs: int = opt(1, "Save a checkpoint every N epochs (and after the last one).")
    every_steps: int = opt(0, "Also save every N batches (global steps, not optimizer steps; 0 = off).")
    every_minutes: float = opt(
        10.0,
        "Also save every M minutes of training (0 = off): at most M minutes of work are lost to a kill. A save "
        "stalls training ~4 ms and commits in the background (BENCHMARKS.md), under 0.1% of 10 minutes.",
    )
    keep_last: int = opt(3, "Keep the newest N checkpoints.")
    keep_best: int = opt(1, "Also keep the K checkpoints with the best fitness.")
    keep_every: int = opt(0, "Also keep every checkpoint at an epoch multiple of E (milestones; 0 = off).")
    light_every_epochs: int = opt(
        5,
        "Every N epochs also write `<run>/weights/epoch-N.safetensors`: the EMA weights alone, as best/last "
        "(yolov5n: 10 MB, a checkpoint 49 MB), kept outside the checkpoint store, so retention never counts them and "
        "nothing resumes from one (0 = off).",
    )
    async_: bool = opt(True, "Write checkpoints in a background thread (training stalls only for a memory copy).")
    max_failures: int = opt(3, "Stop training after this many consecutive failed saves (disk full, I/O error).")
    storage_options: dict[str, Any] = opt(
        {},
        "fsspec options for a remote `dir` (e.g. `endpoint_url`, `profile`, `region_name`); credentials come "
        "from the standard AWS environment and files, never from here.",
    )


@dataclass
class DistConfig:
    backend: str = opt(
        "auto", "torch.distributed backend under torchrun: `auto` (nccl on CUDA, gloo on CPU), `nccl` or `gloo`."
    )
    timeout_s: float = opt(
        600.0,
        "Seconds a rank waits for the others (gradient all-reduce, checkpoint, validation on rank 0) before the "
        "job stops with an error naming the problem; must exceed the slowest validation.",
    )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    ckpt: CkptConfig = field(default_factory=CkptConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            section: {_key_name(k): v for k, v in values.items()}
            for section, values in dataclasses.asdict(self).items()
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        """SHA-256 of the canonical JSON of the resolved config."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


SECTIONS: dict[str, type] = _section_types()


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. `train.epochs`."""
    return [f"{s}.{_key_name(f.name)}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _key_name(field_name: str) -> str:
    """YAML key of a field: a trailing underscore only dodges a Python keyword (`async_` -> `async`)."""
    return field_name.rstrip("_")


def field_docs() -> list[tuple[str, str, Any, str]]:
    """(dotted key, type name, default, doc) for every field: the config reference."""
    rows = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append((f"{section}.{_key_name(f.name)}", _type_name(hints[f.name]), default, f.metadata["doc"]))
    return rows


def _type_name(tp: Any) -> str:
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5)
    if not close:
        leaf = key.rsplit(".", 1)[-1]
        close = [k for k in all_keys() if k.rsplit(".", 1)[-1] == leaf][:1]
    return f"; did you mean `{close[0]}`?" if close else "; see the config reference in README.md"


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp`, or raise a ConfigError naming the key and type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_value(key, value, inner[0])
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key `{key}` must be a mapping of names to values, got {value!r}")
        return dict(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key `{key}` must be a list of {item_tp.__name__}, got {value!r}")
        return [_check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key `{key}` must be of type {_type_name(tp)}, got {value!r}")


def from_dict(raw: dict[str, Any], source: str = "config") -> Config:
    """Build a validated Config from a nested dict (missing keys take their defaults)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping of sections (data, model, train, ...), got {type(raw).__name__}")
    cfg = Config()
    for section, values in raw.items():
        if section not in SECTIONS:
            close = difflib.get_close_matches(str(section), list(SECTIONS), n=1, cutoff=0.5)
            hint = f"; did you mean `{close[0]}`?" if close else f"; sections are {', '.join(SECTIONS)}"
            raise ConfigError(f"unknown config section `{section}` in {source}{hint}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section `{section}` in {source} must be a mapping, got {values!r}")
        for key, value in values.items():
            set_key(cfg, f"{section}.{key}", value)
    validate(cfg)
    return cfg


# What a config stored by an older yolo-resume meant when it lacks a key (checkpoint configs are complete,
# so a missing key means "saved before this key existed"): the recipe the run was trained with.
def legacy_recipe(stored: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per section, the keys an older run meant differently from today's defaults:
    - before 0.2.0 (no `train.lr_decay_every`): per-batch decay, Adam beta1 warmup, no bias warmup for
      Adam, fixed accumulation windows;
    - before windowed mosaic partners became the default (no `augment.mosaic_window`): partners from the
      whole split (0), so the resumed items are the ones the run would have had."""
    legacy: dict[str, dict[str, Any]] = {}
    train, augment = (stored.get(k) if isinstance(stored.get(k), dict) else None for k in ("train", "augment"))
    if train is not None and "lr_decay_every" not in train:
        legacy["train"] = {"lr_decay_every": "batch", "warmup_beta1": True, "accumulate_ramp": False}
        if train.get("optimizer", "SGD") != "SGD":
            legacy["train"]["warmup_bias_lr"] = 0.0
    if augment is not None and "mosaic_window" not in augment:
        legacy["augment"] = {"mosaic_window": 0}
    return legacy


def from_stored(raw: dict[str, Any], source: str) -> Config:
    """The config saved in a checkpoint, with the meaning it had when it was saved (see `legacy_recipe`),
    so that a run started by an older version resumes with the schedule and items it was trained with."""
    if isinstance(raw, dict):
        raw = dict(raw) | {section: raw[section] | keys for section, keys in legacy_recipe(raw).items()}
    return from_dict(raw, source)


def set_key(cfg: Config, dotted: str, value: Any) -> None:
    """Set `section.key` to `value`, checking the key exists and the type matches."""
    parts = str(dotted).split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"unknown config key `{dotted}`{_suggest(str(dotted))}")
    section, key = parts
    hints = typing.get_type_hints(SECTIONS[section])
    if key not in hints and f"{key}_" in hints:
        key = f"{key}_"
    if key not in hints:
        raise ConfigError(f"unknown config key `{dotted}`{_suggest(dotted)}")
    setattr(getattr(cfg, section), key, _check_value(dotted, value, hints[key]))


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--set key=value` strings; values are parsed as YAML (`3`, `0.5`, `true`, `[a, b]`)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got `{item}` (e.g. --set train.epochs=3)")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: value `{text}` is not valid YAML ({_first_line(exc)})") from None
        set_key(cfg, key.strip(), value)
    validate(cfg)
    return cfg


CHOICES = {
    "data.format": ("coco", "yolo", "synthetic"),
    "data.on_bad_image": ("skip", "error"),
    "data.fingerprint": ("stat", "content"),
    "train.optimizer": ("auto", "SGD", "AdamW"),
    "train.schedule": ("linear", "cosine"),
    "train.lr_decay_every": ("epoch", "batch"),
    "dist.backend": ("auto", "nccl", "gloo"),
}

# storage_options keys that would put a secret into config.yaml and every checkpoint's metadata.
SECRET_OPTION_WORDS = ("key", "secret", "token", "password", "credential")


# (low, high, low inclusive, high inclusive); None = unbounded. Every float must also be finite (no NaN,
# no inf), so that a bad value stops the run before training, not in the middle of its first validation.
RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "train.lr0": (0, None, False, True),
    "train.lrf": (0, 1, False, True),
    "train.momentum": (0, 1, True, False),
    "train.weight_decay": (0, None, True, True),
    "train.warmup_momentum": (0, 1, True, False),
    "train.warmup_bias_lr": (0, None, True, True),
    "train.box": (0, None, True, True),
    "train.cls": (0, None, True, True),
    "train.dfl": (0, None, True, True),
    "train.max_grad_norm": (0, None, True, True),
    "augment.fliplr": (0, 1, True, True),
    "augment.hsv_h": (0, 1, True, True),
    "augment.hsv_s": (0, 1, True, True),
    "augment.hsv_v": (0, 1, True, True),
    "augment.scale": (0, 1, True, False),
    "augment.translate": (0, 1, True, False),
    "augment.mosaic": (0, 1, True, True),
    "augment.close_mosaic": (0, None, True, True),
    "eval.conf": (0, 1, True, False),
    "eval.iou": (0, 1, False, True),
    "eval.max_det": (1, None, True, True),
    "data.num_train": (0, None, True, True),
    "data.num_val": (0, None, True, True),
}


def _check_ranges(cfg: Config) -> None:
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            dotted = f"{section}.{_key_name(f.name)}"
            value = getattr(getattr(cfg, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key `{dotted}` must be a finite number, got {value}")
            if dotted in RANGES:
                _check_range(dotted, value, *RANGES[dotted])


def _check_range(key: str, value: float, low, high, low_inclusive: bool, high_inclusive: bool) -> None:
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        left = "" if low is None else f"{'>=' if low_inclusive else '>'} {low:g}"
        right = "" if high is None else f"{'<=' if high_inclusive else '<'} {high:g}"
        bounds = " and ".join(b for b in (left, right) if b)
        raise ConfigError(f"config key `{key}` must be {bounds}, got {value:g}")


def validate(cfg: Config) -> None:
    """Every value in range (types are checked when set), and the cross-field checks types cannot express."""
    _check_ranges(cfg)
    for dotted, choices in CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"config key `{dotted}` must be one of {', '.join(choices)}, got `{value}`")
    positive = {
        "train.epochs": cfg.train.epochs,
        "train.batch": cfg.train.batch,
        "train.nbs": cfg.train.nbs,
        "model.imgsz": cfg.model.imgsz,
        "data.image_size": cfg.data.image_size,
        "ckpt.max_failures": cfg.ckpt.max_failures,
        "dist.timeout_s": cfg.dist.timeout_s,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key `{key}` must be > 0, got {value}")
    non_negative = {
        "ckpt.every_epochs": cfg.ckpt.every_epochs,
        "ckpt.every_steps": cfg.ckpt.every_steps,
        "ckpt.every_minutes": cfg.ckpt.every_minutes,
        "ckpt.keep_last": cfg.ckpt.keep_last,
        "ckpt.keep_best": cfg.ckpt.keep_best,
        "ckpt.keep_every": cfg.ckpt.keep_every,
        "ckpt.light_every_epochs": cfg.ckpt.light_every_epochs,
        "augment.mosaic_window": cfg.augment.mosaic_window,
        "eval.every_epochs": cfg.eval.every_epochs,
        "train.warmup_epochs": cfg.train.warmup_epochs,
        "train.nan_retries": cfg.train.nan_retries,
    }
    if not cfg.train.ema_tau > 0:  # also refuses NaN
        raise ConfigError(f"config key `train.ema_tau` must be > 0, got {cfg.train.ema_tau}")
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key `{key}` must be >= 0, got {value}")
    if cfg.augment.mosaic_window == 1:
        raise ConfigError("config key `augment.mosaic_window` must be 0 (partners from the whole split) or >= 2, got 1")
    if cfg.train.workers < -1:
        raise ConfigError(f"config key `train.workers` must be >= 0, or -1 for auto, got {cfg.train.workers}")
    if cfg.model.imgsz % 32:
        raise ConfigError(f"config key `model.imgsz` must be a multiple of 32, got {cfg.model.imgsz}")
    if cfg.data.format == "synthetic" and not 1 <= cfg.data.num_classes <= 6:
        raise ConfigError(f"config key `data.num_classes` must be 1-6 for synthetic data, got {cfg.data.num_classes}")
    if cfg.data.format == "synthetic" and (cfg.data.num_train < 1 or cfg.data.num_val < 1):
        raise ConfigError("config keys `data.num_train` and `data.num_val` must be >= 1")
    _check_no_secrets(cfg.ckpt.storage_options)
    dev = cfg.train.device
    if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
        raise ConfigError(f"config key `train.device` must be auto, cpu, cuda or cuda:N, got `{dev}`")


def _check_no_secrets(options: dict[str, Any]) -> None:
    for name in options:
        if any(word in name.lower() for word in SECRET_OPTION_WORDS):
            raise ConfigError(
                f"config key `ckpt.storage_options.{name}` looks like a credential, and the config is saved in every "
                "checkpoint; remove it and use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                "~/.aws/credentials instead"
            )


def resolve_paths(cfg: Config, base: Path | None = None) -> Config:
    """Relative local paths (data.root, ckpt.dir, a model.cfg file) made absolute against `base` (the working
    directory) once, when a run starts: its config.yaml and checkpoints then resume from any directory."""
    base = Path(base or os.getcwd())
    if cfg.data.root and not Path(cfg.data.root).expanduser().is_absolute():
        cfg.data.root = str((base / cfg.data.root).resolve())
    if cfg.ckpt.dir and "://" not in cfg.ckpt.dir and not Path(cfg.ckpt.dir).expanduser().is_absolute():
        cfg.ckpt.dir = str((base / cfg.ckpt.dir).resolve())
    model = Path(cfg.model.cfg)
    if not model.is_absolute() and len(model.parts) > 1 and (base / model).is_file():  # a bare name is packaged
        cfg.model.cfg = str((base / model).resolve())
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (the packaged demo when `path` is None) and apply overrides."""
    path = Path(path) if path else PACKAGE_CONFIGS / "demo.yaml"
    if not path.is_file():
        raise ConfigError(f"config file `{path}` not found; pass an existing YAML file to --config")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file `{path}` is not valid YAML: {_first_line(exc)}") from None
    cfg = from_dict(raw, source=str(path))
    return apply_overrides(cfg, overrides or [])


def _first_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
