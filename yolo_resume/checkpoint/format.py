"""On-disk checkpoint format: one folder per checkpoint, committed atomically, verified before use.

Layout of ``<parent>/<name>/``::

    tensors.safetensors  every tensor of the state (safetensors: plain bytes, no code)
    state.json           JSON skeleton of the state; each tensor is replaced by a reference
    meta.json            the caller's metadata plus format_version (plain JSON, cheap to read)
    manifest.json        size + checksum of the three files above, and the checksum's algorithm; written last

Why a folder: the manifest is the commit marker and the folder only ever appears under its final name
through one ``os.rename`` of a fully written, fsynced temporary folder. A crash at any instant therefore
leaves the committed checkpoints untouched plus, at worst, a ``.tmp-*`` folder that the next successful
save removes. Nothing here ever unpickles: tensors go through safetensors, everything else through
strict JSON, and every byte is checked against the manifest before it is interpreted.

Checksums catch bit flips, truncation and torn or partial writes, not a deliberate editor: the manifest
sits beside the data, so whoever can change a file can change its digest too, and a cryptographic hash
buys nothing over a fast one. New checkpoints (format version 2) use XXH3-128 (`xxhash`, tens of GB/s, so
a commit runs at disk speed) and name it in the manifest; version 1 checkpoints (SHA-256) stay readable.

Skeleton encoding (state.json). Plain JSON values stand for themselves; everything JSON cannot say
exactly is a one-key object whose key starts with ``__``:

    {"__tensor__": key}                                   torch.Tensor (key into tensors.safetensors)
    {"__ndarray__": {"key": k, "dtype": "<u4", "shape": [624]}}  numpy array, raw bytes as a uint8 tensor
    {"__npscalar__": {"dtype": "<f8", "hex": "..."}}      numpy scalar (np.float64, np.int64, ...)
    {"__tuple__": [...]}                                  tuple (random.getstate() and friends)
    {"__dict__": [[key, value], ...]}                     dict with int keys or "__"-prefixed str keys
    {"__float__": "nan" | "inf" | "-inf"}                 non-finite float (strict JSON has none)

A dict whose keys are all str without a leading ``__`` is a plain JSON object, so the common case
stays readable and a plain object can never be mistaken for a tag.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import safetensors.torch
import torch
import xxhash

from yolo_resume.errors import CheckpointError

__all__ = [
    "CHECKSUM",
    "CHECKSUMS",
    "DATA_FILES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KILL_ENV",
    "KILL_STAGES",
    "MANIFEST_FILE",
    "META_FILE",
    "STATE_FILE",
    "TENSORS_FILE",
    "TMP_PREFIX",
    "Checksum",
    "check_listing",
    "compare_digests",
    "digest_algorithm",
    "flatten_state",
    "is_checkpoint_dir",
    "load_checkpoint",
    "read_listed_meta",
    "read_meta",
    "snapshot_to_cpu",
    "tensor_digests",
    "unflatten_state",
    "verify_checkpoint",
    "write_checkpoint",
]

FORMAT_NAME = "yolo-resume-checkpoint"
# 2: manifest names its checksum algorithm ("algorithm", entries with "digest"); 1: SHA-256 ("sha256" entries).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
META_FILE = "meta.json"
MANIFEST_FILE = "manifest.json"
DATA_FILES = (TENSORS_FILE, STATE_FILE, META_FILE)
TMP_PREFIX = ".tmp-"
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".pkl", ".pickle", ".ckpt"})

# Test-only crash injection: the writer SIGKILLs itself when this variable names the current stage.
KILL_ENV = "YOLO_RESUME_TEST_KILL_AT"
KILL_STAGES = (
    "tensors_written",
    "state_written",
    "meta_written",
    "before_manifest",
    "manifest_written",
    "before_rename",
    "after_rename",
)

# Size caps are checked before a byte is parsed, so a hostile file cannot make us allocate or parse
# without bound.
MANIFEST_MAX_BYTES = 1 << 20
JSON_MAX_BYTES = 64 << 20
HEADER_MAX_BYTES = 100 << 20
CHUNK_BYTES = 8 << 20
# Tensors smaller than this are written joined with their neighbours: one syscall and hash call per
# tensor would cost more than copying their bytes.
COALESCE_BYTES = 256 << 10
MAX_NDIM = 64
MAX_NAME_CHARS = 200
# Deeper JSON than any state or metadata we write (~10 levels) is refused when parsed, before a recursive
# walk over it could exhaust the interpreter stack (a crafted meta.json nested 900 deep).
MAX_JSON_DEPTH = 64
# A tensor file with fewer bytes on disk than this fraction of its size is sparse (holes): never written by
# us (we write every byte), and hashing a crafted 4 TiB hole would take hours. Checked before hashing.
SPARSE_CHECK_MIN_BYTES = 64 << 20
MIN_ALLOCATED_FRACTION = 0.5


@dataclass(frozen=True)
class Checksum:
    """A file checksum a manifest can name: `name` as written there, `label` as errors say it."""

    name: str
    label: str
    new: Callable[[], Any]  # a hashlib-style object: update(buffer), hexdigest()
    hex_chars: int

    def hexdigest(self, data: bytes | memoryview) -> str:
        digest = self.new()
        digest.update(data)
        return digest.hexdigest()

    def is_digest(self, text: Any) -> bool:
        return type(text) is str and len(text) == self.hex_chars and all(ch in "0123456789abcdef" for ch in text)


CHECKSUMS = {
    checksum.name: checksum
    for checksum in (
        Checksum("xxh3_128", "XXH3-128", xxhash.xxh3_128, 32),
        Checksum("sha256", "SHA-256", hashlib.sha256, 64),  # format version 1 (files and tensor digests)
    )
}
CHECKSUM = CHECKSUMS["xxh3_128"]  # what new checkpoints are written with

_CORRUPT_FIX = "the checkpoint is corrupt or was tampered with; resume from an earlier checkpoint"
_FOLDER_FIX = "pass a checkpoint folder written by yolo-resume"


def _dtype_table() -> dict[torch.dtype, tuple[str, int]]:
    """torch dtype -> (safetensors dtype name, item size); only dtypes both libraries round-trip."""
    names = {
        "float64": ("F64", 8),
        "float32": ("F32", 4),
        "float16": ("F16", 2),
        "bfloat16": ("BF16", 2),
        "int64": ("I64", 8),
        "int32": ("I32", 4),
        "int16": ("I16", 2),
        "int8": ("I8", 1),
        "uint64": ("U64", 8),
        "uint32": ("U32", 4),
        "uint16": ("U16", 2),
        "uint8": ("U8", 1),
        "bool": ("BOOL", 1),
        "complex64": ("C64", 8),
        "float8_e4m3fn": ("F8_E4M3", 1),
        "float8_e5m2": ("F8_E5M2", 1),
    }
    return {getattr(torch, attr): spec for attr, spec in names.items() if hasattr(torch, attr)}


_TORCH_DTYPES = _dtype_table()
_ST_ITEMSIZE = dict(_TORCH_DTYPES.values())
# numpy kinds stored as raw bytes: bool, ints, floats, complex, bytes, unicode, timedelta, datetime.
# Object ("O") and structured/void ("V") arrays are refused: they are pickles in disguise.
_NUMPY_KINDS = frozenset("biufcSUmM")

_TAG_TENSOR = "__tensor__"
_TAG_NDARRAY = "__ndarray__"
_TAG_NPSCALAR = "__npscalar__"
_TAG_TUPLE = "__tuple__"
_TAG_DICT = "__dict__"
_TAG_FLOAT = "__float__"
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


# ---------------------------------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------------------------------


def _dumps(obj: Any, *, indent: int | None = None) -> bytes:
    # ensure_ascii keeps lone surrogates (legal in a Python str) representable; allow_nan=False turns a
    # non-finite float that slipped past the encoder into a loud bug instead of a non-standard file.
    separators = (",", ": ") if indent else (",", ":")
    return json.dumps(obj, allow_nan=False, ensure_ascii=True, indent=indent, separators=separators).encode("ascii")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # "1e999" is valid JSON syntax but would smuggle in an infinity
        raise ValueError(f"number {text} overflows to infinity")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:  # parsers disagree on which duplicate wins; refuse the ambiguity
            raise ValueError(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _loads_strict(data: bytes) -> Any:
    """Parse RFC 8259 JSON from UTF-8 bytes; ValueError naming the reason for anything else."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {data[exc.start]:#04x} at offset {exc.start})") from None
    _check_depth(text)
    try:
        return json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite_float, object_pairs_hook=_unique_keys
        )
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _check_depth(text: str) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH without recursing: drop the strings, keep the
    brackets, and take the maximum of their running sum (all in C: regex and numpy)."""
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return  # too few brackets to be too deep: the common case costs two counts
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    steps = np.frombuffer(brackets, dtype=np.uint8)
    depth = np.cumsum(np.where((steps == ord("[")) | (steps == ord("{")), 1, -1), dtype=np.int64)
    if depth.size and int(depth.max()) > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")


# ---------------------------------------------------------------------------------------------------
# State <-> (tensors, skeleton)
# ---------------------------------------------------------------------------------------------------


def _where(path: tuple[str, ...]) -> str:
    return ".".join(path) if path else "<root>"


def _float_name(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


class _Flattener:
    """Turns a state into a JSON skeleton, collecting tensors under dotted-path keys."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        # Original dtype/shape of each ndarray key (stored as uint8 bytes); used by tensor_digests. A
        # tensor keeps its dtype and shape, so its label is read off the stored tensor when needed.
        self.array_labels: dict[str, tuple[str, tuple[int, ...]]] = {}
        self._storages: set[int] = set()

    def encode(self, obj: Any, path: tuple[str, ...]) -> Any:
        kind = type(obj)
        if obj is None or kind in (bool, int, str):
            return obj
        if kind is float:
            return obj if math.isfinite(obj) else {_TAG_FLOAT: _float_name(obj)}
        if kind is list:
            return [self.encode(item, (*path, str(i))) for i, item in enumerate(obj)]
        if kind is tuple:
            return {_TAG_TUPLE: [self.encode(item, (*path, str(i))) for i, item in enumerate(obj)]}
        if isinstance(obj, dict):  # state_dict() returns an OrderedDict; it comes back as a plain dict
            return self._dict(obj, path)
        if isinstance(obj, torch.Tensor):  # nn.Parameter comes back as a plain tensor
            return {_TAG_TENSOR: self._add_tensor(obj, path)}
        if kind is np.ndarray:
            return {_TAG_NDARRAY: self._add_array(obj, path)}
        if isinstance(obj, np.generic):
            return {_TAG_NPSCALAR: _encode_npscalar(obj, path)}
        raise TypeError(
            f"cannot save {kind.__module__}.{kind.__qualname__} at {_where(path)}: checkpoint state may hold "
            "only dict, list, tuple, str, int, float, bool, None, torch.Tensor and numpy arrays/scalars"
        )

    def _dict(self, obj: dict, path: tuple[str, ...]) -> Any:
        if all(type(key) is str and not key.startswith("__") for key in obj):
            return {key: self.encode(value, (*path, key)) for key, value in obj.items()}
        pairs = []
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise TypeError(
                    f"cannot save dict key {key!r} ({type(key).__name__}) at {_where(path)}: keys must be str or int"
                )
            pairs.append([key, self.encode(value, (*path, str(key)))])
        return {_TAG_DICT: pairs}

    def _unique_key(self, path: tuple[str, ...]) -> str:
        # Dotted paths can collide ({"a.b": x, "a": {"b": y}}); the suffix is deterministic because the
        # traversal order is. "__metadata__" is reserved by safetensors.
        base = ".".join(path) or "tensor"
        key, n = base, 1
        while key in self.tensors or key == "__metadata__":
            n += 1
            key = f"{base}#{n}"
        return key

    def _add_tensor(self, tensor: torch.Tensor, path: tuple[str, ...]) -> str:
        if tensor.layout != torch.strided or tensor.dtype not in _TORCH_DTYPES:
            raise TypeError(
                f"cannot save tensor at {_where(path)}: layout {tensor.layout} / dtype {tensor.dtype} is not "
                "supported (dense tensors of standard dtypes only)"
            )
        # Checked first because a save holds ~1,500 tensors, nearly all dense CPU ones that need no grad
        # (state_dict() detaches): the conversions below would each return the same tensor, at a Python
        # call apiece (is_cpu is also ~6x cheaper than device.type).
        cpu = tensor.detach() if tensor.requires_grad else tensor
        if not cpu.is_cpu or cpu.is_conj() or cpu.is_neg() or not cpu.is_contiguous():
            cpu = cpu.resolve_conj().resolve_neg().to("cpu").contiguous()
        # safetensors refuses tensors that share memory (tied weights, views of one buffer): copy those.
        ptr = cpu.untyped_storage().data_ptr()
        if ptr and ptr in self._storages:
            cpu = cpu.clone()
            ptr = cpu.untyped_storage().data_ptr()
        self._storages.add(ptr)
        key = self._unique_key(path)
        self.tensors[key] = cpu
        return key

    def _add_array(self, array: np.ndarray, path: tuple[str, ...]) -> dict[str, Any]:
        _check_numpy_dtype(array.dtype, path)
        # Raw bytes + dtype string cover every numeric numpy dtype (uint32 RNG keys, big-endian, datetime)
        # whether or not torch/safetensors has an equivalent.
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8).copy()
        key = self._unique_key(path)
        self.tensors[key] = torch.from_numpy(raw)
        self.array_labels[key] = (array.dtype.str, tuple(array.shape))
        return {"key": key, "dtype": array.dtype.str, "shape": list(array.shape)}


def _check_numpy_dtype(dtype: np.dtype, path: tuple[str, ...]) -> None:
    if dtype.kind not in _NUMPY_KINDS or dtype.hasobject:
        raise TypeError(f"cannot save numpy dtype {dtype} at {_where(path)}: object/structured dtypes hold code")


def _encode_npscalar(value: np.generic, path: tuple[str, ...]) -> dict[str, str]:
    _check_numpy_dtype(value.dtype, path)
    # Zero-width dtypes (np.str_("")) still report a padding byte from tobytes(); they hold no data.
    raw = value.tobytes() if value.dtype.itemsize else b""
    return {"dtype": value.dtype.str, "hex": raw.hex()}


class _Decoder:
    """Rebuilds a state from its skeleton; subclasses decide what a tensor reference turns into.

    Every malformation raises ValueError naming the skeleton path, so the same walk serves loading
    (real tensors) and verification (header entries only)."""

    def __init__(self, available: Iterable[str]) -> None:
        self.available = set(available)
        self.used: set[str] = set()

    def tensor(self, key: str, path: tuple[str, ...]) -> Any:
        raise NotImplementedError

    def array(self, key: str, dtype: np.dtype, shape: tuple[int, ...], path: tuple[str, ...]) -> Any:
        raise NotImplementedError

    def decode_root(self, skeleton: Any) -> Any:
        try:
            obj = self.decode(skeleton, ())
        except RecursionError:
            raise ValueError("state nested too deeply") from None
        unreferenced = sorted(self.available - self.used)
        if unreferenced:
            raise ValueError(f"tensor {unreferenced[0]!r} is not referenced by the state")
        return obj

    def decode(self, node: Any, path: tuple[str, ...]) -> Any:
        kind = type(node)
        if node is None or kind in (bool, int, str):
            return node
        if kind is float:
            if not math.isfinite(node):
                raise ValueError(f"bare non-finite float at {_where(path)}")
            return node
        if kind is list:
            return [self.decode(item, (*path, str(i))) for i, item in enumerate(node)]
        if kind is dict:
            return self._object(node, path)
        raise ValueError(f"unexpected {kind.__name__} at {_where(path)}")

    def _object(self, node: dict, path: tuple[str, ...]) -> Any:
        if len(node) == 1:
            ((tag, body),) = node.items()
            if tag.startswith("__"):
                return self._tagged(tag, body, path)
        for key in node:
            if key.startswith("__"):
                raise ValueError(f"reserved key {key!r} in a plain object at {_where(path)}")
        return {key: self.decode(value, (*path, key)) for key, value in node.items()}

    def _tagged(self, tag: str, body: Any, path: tuple[str, ...]) -> Any:
        if tag == _TAG_TUPLE and type(body) is list:
            return tuple(self.decode(item, (*path, str(i))) for i, item in enumerate(body))
        if tag == _TAG_DICT and type(body) is list:
            return self._pairs(body, path)
        if tag == _TAG_FLOAT and body in _NONFINITE:
            return _NONFINITE[body]
        if tag == _TAG_TENSOR and type(body) is str:
            return self.tensor(self._claim(body, path), path)
        if tag == _TAG_NDARRAY and type(body) is dict and set(body) == {"key", "dtype", "shape"}:
            dtype, shape = _parse_dtype(body["dtype"], path), _parse_shape(body["shape"], path)
            return self.array(self._claim(body["key"], path), dtype, shape, path)
        if tag == _TAG_NPSCALAR and type(body) is dict and set(body) == {"dtype", "hex"}:
            return _decode_npscalar(body, path)
        raise ValueError(f"malformed or unknown tag {tag!r} at {_where(path)}")

    def _pairs(self, body: list, path: tuple[str, ...]) -> dict:
        obj: dict = {}
        for pair in body:
            if type(pair) is not list or len(pair) != 2 or type(pair[0]) not in (str, int) or pair[0] in obj:
                raise ValueError(f"malformed dict entry at {_where(path)}")
            obj[pair[0]] = self.decode(pair[1], (*path, str(pair[0])))
        return obj

    def _claim(self, key: Any, path: tuple[str, ...]) -> str:
        if type(key) is not str or key not in self.available:
            raise ValueError(f"{_where(path)} references tensor {key!r}, which is not in {TENSORS_FILE}")
        if key in self.used:
            raise ValueError(f"tensor {key!r} is referenced twice")
        self.used.add(key)
        return key


def _parse_dtype(text: Any, path: tuple[str, ...]) -> np.dtype:
    try:
        dtype = np.dtype(text) if type(text) is str else None
    except (TypeError, ValueError):
        dtype = None
    # Requiring the canonical spelling rules out every alias and structured-dtype mini-language.
    if dtype is None or dtype.str != text or dtype.kind not in _NUMPY_KINDS or dtype.hasobject:
        raise ValueError(f"unsupported numpy dtype {text!r} at {_where(path)}")
    return dtype


def _parse_shape(shape: Any, path: tuple[str, ...]) -> tuple[int, ...]:
    if type(shape) is not list or len(shape) > MAX_NDIM or any(type(d) is not int or d < 0 for d in shape):
        raise ValueError(f"malformed shape {shape!r} at {_where(path)}")
    return tuple(shape)


def _decode_npscalar(body: dict, path: tuple[str, ...]) -> np.generic:
    dtype = _parse_dtype(body["dtype"], path)
    try:
        raw = bytes.fromhex(body["hex"]) if type(body["hex"]) is str else None
    except ValueError:
        raw = None
    if raw is None or len(raw) != dtype.itemsize:
        raise ValueError(f"malformed numpy scalar at {_where(path)}")
    if dtype.itemsize == 0:  # np.str_("") and np.bytes_(b"") have zero-width dtypes
        return dtype.type()
    return np.frombuffer(raw, dtype=dtype)[0]


def _array_nbytes(dtype: np.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


class _TensorLoader(_Decoder):
    def __init__(self, tensors: Mapping[str, torch.Tensor], device: str | torch.device | None) -> None:
        super().__init__(tensors)
        self.tensors = tensors
        self.device = device

    def tensor(self, key: str, path: tuple[str, ...]) -> torch.Tensor:
        tensor = self.tensors[key]
        return tensor if self.device is None else tensor.to(self.device)

    def array(self, key: str, dtype: np.dtype, shape: tuple[int, ...], path: tuple[str, ...]) -> np.ndarray:
        raw = self.tensors[key]
        if raw.dtype != torch.uint8 or tuple(raw.shape) != (_array_nbytes(dtype, shape),):
            raise ValueError(f"byte size of numpy array {key!r} does not match its dtype and shape")
        # .copy(): a writable, aligned array that owns its memory, like the one that was saved.
        return raw.detach().cpu().contiguous().numpy().view(dtype).reshape(shape).copy()


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split `obj` into CPU tensors keyed by dotted path and a JSON-able skeleton referencing them.

    The tensors are contiguous, detached and do not share memory with each other; they may alias the
    caller's CPU tensors (use `snapshot_to_cpu` first for an independent copy). Raises TypeError naming
    the path of anything that cannot be stored exactly."""
    flattener = _Flattener()
    skeleton = flattener.encode(obj, ())
    return flattener.tensors, skeleton


def unflatten_state(
    tensors: Mapping[str, torch.Tensor], skeleton: Any, device: str | torch.device | None = None
) -> Any:
    """Inverse of `flatten_state`; tensors are moved to `device` when given (numpy arrays stay numpy).

    Raises ValueError if the skeleton is malformed, references a missing tensor or leaves one unused."""
    return _TensorLoader(tensors, device).decode_root(skeleton)


def snapshot_to_cpu(state: Any) -> Any:
    """A deep copy of `state` whose tensors are fresh CPU copies and arrays fresh numpy copies.

    Lets a background thread write a checkpoint while training keeps mutating the originals."""
    return _snapshot(state, ())


def _snapshot(obj: Any, path: tuple[str, ...]) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if type(obj) is np.ndarray:
        return obj.copy()
    if isinstance(obj, dict):
        return {key: _snapshot(value, (*path, str(key))) for key, value in obj.items()}
    if type(obj) is list:
        return [_snapshot(item, (*path, str(i))) for i, item in enumerate(obj)]
    if type(obj) is tuple:
        return tuple(_snapshot(item, (*path, str(i))) for i, item in enumerate(obj))
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, np.generic):
        return obj  # immutable
    raise TypeError(f"cannot snapshot {type(obj).__qualname__} at {_where(path)}")


def tensor_digests(
    state: dict, groups: Iterable[str] = ("model", "ema", "optimizer"), algorithm: str = CHECKSUM.name
) -> dict[str, str]:
    """A digest per top-level group over its tensors, independent of dict order and of the process.

    Covers, for each flattened key in sorted order: the key, the dtype, the shape and the raw bytes, each
    length-prefixed so that no two different sequences of fields hash the same stream. A value says how
    it was made, ``"xxh3_128:<hex>"``; ``algorithm="sha256"`` gives the bare hex that checkpoints of format
    version 1 hold (to recompute one of those). Compare digests with `compare_digests`."""
    checksum = CHECKSUMS[algorithm]
    digests = {}
    for group in groups:
        if group not in state:
            continue
        flattener = _Flattener()
        flattener.encode(state[group], (group,))
        digest = checksum.new()
        for key in sorted(flattener.tensors):
            tensor = flattener.tensors[key]
            dtype, shape = flattener.array_labels.get(key) or (str(tensor.dtype), tuple(tensor.shape))
            raw = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            # One update for the small fields and the raw bytes' length prefix, one for the raw bytes:
            # the same stream as a field at a time, in two calls instead of eight.
            fields = (key.encode("utf-8", "surrogatepass"), dtype.encode(), repr(shape).encode())
            digest.update(b"".join(_length_prefixed(field) for field in fields) + _length(raw))
            digest.update(raw)
        hexdigest = digest.hexdigest()
        # Version 1 wrote bare SHA-256 hex; keeping that spelling lets an old digest be recomputed exactly.
        digests[group] = hexdigest if checksum.name == "sha256" else f"{checksum.name}:{hexdigest}"
    return digests


def digest_algorithm(value: Any) -> str | None:
    """The algorithm of one `tensor_digests` value: the prefix it names, "sha256" for the bare 64-hex of
    format version 1, None for anything else."""
    if type(value) is not str:
        return None
    name, sep, hexdigest = value.rpartition(":")
    if not sep:
        name, hexdigest = "sha256", value
    checksum = CHECKSUMS.get(name)
    return name if checksum is not None and checksum.is_digest(hexdigest) else None


def compare_digests(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, bool | None]:
    """Per group of either side: True when both digests are equal, False when they differ or the group is
    missing on one side, None when they were made by different (or unknown) algorithms and so say nothing
    about each other (a SHA-256 digest of an old checkpoint beside an XXH3 one of a new checkpoint):
    recompute one side with `tensor_digests(state, algorithm=digest_algorithm(value))` to compare them."""
    result: dict[str, bool | None] = {}
    for group in sorted(set(a) | set(b)):
        if group not in a or group not in b:
            result[group] = False
            continue
        algorithm = digest_algorithm(a[group])
        result[group] = a[group] == b[group] if algorithm and algorithm == digest_algorithm(b[group]) else None
    return result


def _length(data: bytes | memoryview) -> bytes:
    return len(data).to_bytes(8, "little")


def _length_prefixed(data: bytes) -> bytes:
    return _length(data) + data


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def _encode_meta(obj: Any, path: tuple[str, ...]) -> Any:
    """Plain JSON for meta.json; non-finite floats (a NaN loss) are tagged instead of failing the save."""
    if isinstance(obj, np.generic) and obj.dtype.kind in "biuf":
        obj = obj.item()  # metrics are often numpy scalars; meta is plain JSON, so store the value
    if obj is None:
        return None
    if isinstance(obj, bool):  # before int: bool is an int subclass
        return bool(obj)
    if isinstance(obj, str):
        return str(obj)
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else {_TAG_FLOAT: _float_name(obj)}
    if isinstance(obj, (list, tuple)):
        return [_encode_meta(item, (*path, str(i))) for i, item in enumerate(obj)]
    if isinstance(obj, dict):
        if list(obj) == [_TAG_FLOAT]:
            raise TypeError(f"meta key {_TAG_FLOAT!r} alone at {_where(path)} is reserved")
        for key in obj:
            if type(key) is not str:
                raise TypeError(f"meta key {key!r} at {_where(path)} is not a str; meta must be JSON-able")
        return {key: _encode_meta(value, (*path, key)) for key, value in obj.items()}
    raise TypeError(f"meta value at {_where(path)} is a {type(obj).__qualname__}; meta must be JSON-able")


def _decode_meta(obj: Any) -> Any:
    if type(obj) is list:
        return [_decode_meta(item) for item in obj]
    if type(obj) is dict:
        if list(obj) == [_TAG_FLOAT] and obj[_TAG_FLOAT] in _NONFINITE:
            return _NONFINITE[obj[_TAG_FLOAT]]
        return {key: _decode_meta(value) for key, value in obj.items()}
    return obj


class _TensorFile:
    """A safetensors file streamed straight from the tensors' memory, hashed as it is written.

    `safetensors.torch.save` first builds the whole file as one bytes object (a full copy, plus a
    slow shared-storage scan), then we would hash and write it: three passes over ~150 MB for a
    YOLOv5s state. Here the header is built by hand in one pass (the layout is tiny and
    `verify_checkpoint` plus `safetensors.load_file` check it on every load), large tensors are written
    from zero-copy views, and each run of small tensors (a YOLOv5s save holds ~1,400 under
    COALESCE_BYTES: BatchNorm vectors, AdamW steps) is joined into one bytes object, so ~1,500
    tensors cost a few dozen writes and hash updates, not 1,500. Data follow the tensors' order, as before.
    Tensors are contiguous CPU tensors here (see `_Flattener._add_tensor`), so nothing is copied but the
    small tensors' bytes."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        entries: list[str] = []
        self.buffers: list[Any] = []  # objects with the buffer protocol, in file order
        run: list[np.ndarray] = []  # consecutive small tensors, not yet joined
        run_bytes = offset = 0
        for key, tensor in tensors.items():
            nbytes = tensor.nbytes
            entries.append(_header_entry_json(key, tensor, offset, offset + nbytes))
            offset += nbytes
            if nbytes >= COALESCE_BYTES:
                self._join(run)
                run, run_bytes = [], 0
                self.buffers.append(_buffer(tensor))
            elif nbytes:
                run.append(_buffer(tensor))
                run_bytes += nbytes
                if run_bytes >= CHUNK_BYTES:
                    self._join(run)
                    run, run_bytes = [], 0
        self._join(run)
        blob = ("{" + ",".join(entries) + "}").encode("ascii")
        blob += b" " * (-len(blob) % 8)  # data section 8-byte aligned, as safetensors writes it
        self.prefix = len(blob).to_bytes(8, "little") + blob
        self.size = len(self.prefix) + offset

    def _join(self, run: list[np.ndarray]) -> None:
        # One copy of the small tensors' bytes, in C and on this thread (a torch.cat of the ~1,400 byte
        # views measured slower: a dispatch per input, and intra-op threads on a busy machine).
        if run:
            self.buffers.append(b"".join(run))

    def write(self, path: Path) -> str:
        """Write, fsync, and return the `CHECKSUM` digest of what was written.

        A second thread hashes the same slices while this one writes them (xxhash and hashlib release
        the GIL on each buffer, so a slow hash such as SHA-256 overlaps the writes too), and the kernel
        is asked to start writing each CHUNK_BYTES slice to disk at once (`_start_writeback`), so the
        disk works while later slices are copied and the final fsync has little left to wait for."""
        digest = CHECKSUM.new()
        slices = [part for buffer in (self.prefix, *self.buffers) for part in _slices(buffer)]
        hasher = threading.Thread(target=lambda: [digest.update(part) for part in slices], name="checksum")
        hasher.start()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                written = started = 0
                for part in slices:
                    _write_all(fd, part)
                    written += part.nbytes
                    if written - started >= CHUNK_BYTES:
                        _start_writeback(fd, started, written - started)
                        started = written
                os.fsync(fd)  # the guarantee: nothing above replaces it
            finally:
                os.close(fd)
        finally:
            hasher.join()
        return digest.hexdigest()


def _slices(buffer: Any) -> list[memoryview]:
    view = memoryview(buffer).cast("B")
    return [view[i : i + CHUNK_BYTES] for i in range(0, view.nbytes, CHUNK_BYTES)]


# JSON string escaping exactly as json.dumps(ensure_ascii=True) does it (the C encoder), for one key.
_json_str = json.encoder.encode_basestring_ascii


def _header_entry_json(key: str, tensor: torch.Tensor, begin: int, end: int) -> str:
    """`"key":{"dtype":...,"shape":[...],"data_offsets":[begin,end]}`: the bytes json.dumps(separators=
    (",", ":")) writes for this entry, without a dict and two lists per tensor."""
    shape = ",".join(map(str, tensor.shape))
    dtype = _TORCH_DTYPES[tensor.dtype][0]
    return f'{_json_str(key)}:{{"dtype":"{dtype}","shape":[{shape}],"data_offsets":[{begin},{end}]}}'


def _numpy_viewable() -> frozenset[torch.dtype]:
    """The dtypes whose tensors `.numpy()` views directly; bfloat16 and float8 have no numpy twin."""
    viewable = set()
    for dtype in _TORCH_DTYPES:
        try:
            torch.zeros(1, dtype=dtype).numpy()
        except TypeError:
            continue
        viewable.add(dtype)
    return frozenset(viewable)


_NUMPY_VIEWABLE = _numpy_viewable()


def _buffer(tensor: torch.Tensor) -> np.ndarray:
    """The raw bytes of a contiguous CPU tensor as a numpy array (buffer protocol), without a copy.
    `.numpy()` alone is a third of the cost of reshape + view(uint8) + numpy, so it is the rule."""
    if tensor.dtype in _NUMPY_VIEWABLE:
        return tensor.numpy()
    return tensor.reshape(-1).view(torch.uint8).numpy()


def _libc_sync_file_range() -> Callable[[int, int, int], None]:
    """`sync_file_range(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)` where libc has it (Linux), else a
    no-op. It only starts writeback of dirty pages early and guarantees nothing; durability still
    comes from the fsync, which also reports any writeback error, so its result is ignored."""
    try:
        import ctypes

        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (ImportError, OSError, AttributeError, TypeError):
        return lambda fd, offset, nbytes: None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    write = 2  # SYNC_FILE_RANGE_WRITE: queue the range for writeback, do not wait for it

    def start(fd: int, offset: int, nbytes: int) -> None:
        call(fd, offset, nbytes, write)  # ctypes releases the GIL during the call

    return start


_start_writeback = _libc_sync_file_range()


@dataclass
class _Encoded:
    tensors: _TensorFile
    json_files: dict[str, bytes]  # state.json, meta.json


def _encode_files(state: dict, meta: dict) -> _Encoded:
    """Everything encoded in memory first: a state that cannot be stored fails before any disk write."""
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise TypeError("write_checkpoint needs state and meta dicts")
    tensors, skeleton = flatten_state(state)
    meta_doc = _encode_meta({**meta, "format_version": FORMAT_VERSION}, ())
    return _Encoded(_TensorFile(tensors), {STATE_FILE: _dumps(skeleton), META_FILE: _dumps(meta_doc, indent=2)})


def _manifest(listing: dict[str, dict]) -> bytes:
    doc = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "algorithm": CHECKSUM.name, "files": listing}
    return _dumps(doc, indent=2)


def _check_name(name: str) -> None:
    bad = (
        type(name) is not str
        or not name
        or len(name) > MAX_NAME_CHARS
        or name.startswith(".")  # ".", "..", hidden names and our own .tmp- folders
        or any(ch in name for ch in "/\\\0\n\r")
    )
    if bad:
        raise CheckpointError(
            f"invalid checkpoint name {name!r}; use a plain folder name such as 'epoch_0003' "
            "(no path separators, not starting with '.')"
        )


_crash_counts: dict[str, int] = {}


def _crash_point(stage: str) -> None:
    """Test hook: simulate power loss / OOM-kill right here. `KILL_ENV=stage` kills at the first
    write reaching `stage`, `KILL_ENV=stage:N` at the N-th (so earlier checkpoints exist)."""
    wanted = os.environ.get(KILL_ENV)
    if not wanted or wanted.split(":")[0] != stage:
        return
    _crash_counts[stage] = _crash_counts.get(stage, 0) + 1
    nth = int(wanted.split(":")[1]) if ":" in wanted else 1
    if _crash_counts[stage] >= nth:
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view[:CHUNK_BYTES])
        if written <= 0:  # never spin on a device that accepts nothing
            raise OSError(errno.EIO, "write accepted no bytes")
        view = view[written:]


def _write_file(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


class _Commit:
    """One save: temp folder -> files -> manifest -> rename. `step` names what failed in errors."""

    def __init__(self, parent: Path, name: str) -> None:
        self.parent = parent
        self.final = parent / name
        self.tmp = parent / f"{TMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}"
        self.step = "creating the temporary folder"

    def run(self, encoded: _Encoded) -> None:
        self.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(self.tmp, 0o755)
        self.step = f"writing {TENSORS_FILE}"
        listing = {
            TENSORS_FILE: {"size": encoded.tensors.size, "digest": encoded.tensors.write(self.tmp / TENSORS_FILE)}
        }
        _crash_point(KILL_STAGES[0])
        for name, stage in zip(DATA_FILES[1:], KILL_STAGES[1:3], strict=True):
            self.step = f"writing {name}"
            data = encoded.json_files[name]
            _write_file(self.tmp / name, data)
            listing[name] = {"size": len(data), "digest": CHECKSUM.hexdigest(data)}
            _crash_point(stage)
        _crash_point("before_manifest")
        self.step = f"writing {MANIFEST_FILE}"
        _write_file(self.tmp / MANIFEST_FILE, _manifest(listing))
        _crash_point("manifest_written")
        self.step = "syncing the temporary folder"
        _fsync_dir(self.tmp)
        _crash_point("before_rename")
        self.step = f"renaming the temporary folder to {self.final.name}"
        # rename() silently replaces an empty folder, so re-check right before it; a concurrent save that
        # wins the remaining race leaves a non-empty folder, which makes rename() fail instead.
        if os.path.lexists(self.final):
            raise FileExistsError(errno.EEXIST, "a checkpoint of this name appeared during the save", str(self.final))
        os.rename(self.tmp, self.final)
        _crash_point("after_rename")


def _save_failed(name: str, step: str, exc: BaseException) -> CheckpointError:
    if isinstance(exc, OSError):
        reason = f"{exc.strerror or exc} (errno {exc.errno})"
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            fix = "free disk space (or raise the quota/file size limit) and save again"
        elif exc.errno in (errno.EPERM, errno.EACCES, errno.EROFS):
            fix = "make the output folder writable and save again"
        else:
            fix = "check the disk and save again"
    else:
        reason, fix = f"{type(exc).__name__}: {exc}", "this is a bug in yolo-resume; please report it"
    err = CheckpointError(
        f"saving checkpoint {name} failed: {reason} while {step}; committed checkpoints are untouched; {fix}"
    )
    err.errno = getattr(exc, "errno", None)
    return err


def write_checkpoint(parent: Path, name: str, state: dict, meta: dict) -> Path:
    """Atomically create checkpoint folder `parent/name`; never overwrites. Returns its path.

    Raises TypeError for a state/meta that cannot be stored exactly (nothing is written), and
    CheckpointError if the name exists or any disk operation fails (the temporary folder is removed;
    `err.errno` and `err.__cause__` keep the OS error)."""
    parent = Path(parent)
    _check_name(name)
    final = parent / name
    if os.path.lexists(final):
        raise CheckpointError(
            f"checkpoint {final} already exists; checkpoints are never overwritten — save under a new name "
            "or delete it first"
        )
    encoded = _encode_files(state, meta)
    commit = _Commit(parent, name)
    try:
        commit.run(encoded)
    except BaseException as exc:
        shutil.rmtree(commit.tmp, ignore_errors=True)
        if isinstance(exc, Exception):
            raise _save_failed(name, commit.step, exc) from exc
        raise  # KeyboardInterrupt/SystemExit: clean up, but do not disguise them
    _sync_parent(final)
    _remove_stale_temps(parent)
    return final


def _sync_parent(final: Path) -> None:
    try:
        _fsync_dir(final.parent)  # makes the rename itself durable
    except OSError as exc:
        err = CheckpointError(
            f"checkpoint {final} was written but syncing {final.parent} failed: {exc.strerror} (errno "
            f"{exc.errno}); it may not survive a power loss — check the disk and save again under a new name"
        )
        err.errno = exc.errno
        raise err from exc


def _temp_owner(folder_name: str) -> int | None:
    """pid encoded in `.tmp-<name>-<pid>-<hex>`, or None for a name we did not create."""
    parts = folder_name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    return int(parts[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _remove_stale_temps(parent: Path) -> None:
    """Best effort: remove temp folders of dead writers. Temp folders of live processes (this one
    included: a concurrent save on another thread) are left alone."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX) or not entry.is_dir(follow_symlinks=False):
            continue
        pid = _temp_owner(entry.name)
        if pid is not None and pid > 0 and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(entry.path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Verification and loading
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    size: int
    digest: str
    checksum: Checksum  # the algorithm its manifest names


@dataclass(frozen=True)
class _Layout:
    """What a manifest of one format version looks like."""

    keys: frozenset[str]
    digest_key: str  # per-file entry: {"size": ..., digest_key: ...}
    checksum: Checksum | None  # None: named by the manifest's "algorithm"


_LAYOUTS = {
    1: _Layout(frozenset({"format", "format_version", "files"}), "sha256", CHECKSUMS["sha256"]),
    2: _Layout(frozenset({"format", "format_version", "algorithm", "files"}), "digest", None),
}


@dataclass(frozen=True)
class _HeaderEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _refuse(path: Path | str, file: str | None, problem: str, fix: str = _CORRUPT_FIX) -> CheckpointError:
    where = f"checkpoint {path}" + (f": {file}" if file else "")
    message = f"{where}: {problem}; {fix}"
    return CheckpointError(message.replace("\n", "\\n").replace("\r", "\\r"))  # always one line


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        culprit = Path(exc.filename).name if exc.filename else "a file"
        raise _refuse(
            path,
            culprit,
            f"cannot be read: {exc.strerror} (errno {exc.errno})",
            "check the path and permissions",
        ) from exc


def _open_regular(path: Path) -> BinaryIO:
    # O_NOFOLLOW: a symlink swapped in after the listing is refused; O_NONBLOCK: a FIFO cannot hang us.
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return os.fdopen(fd, "rb", buffering=0)


def _read_exact(file: BinaryIO, count: int) -> bytes:
    chunks, left = [], count
    while left:
        chunk = file.read(min(left, CHUNK_BYTES))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _check_folder(path: Path) -> None:
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint {path} does not exist; check the path ({_FOLDER_FIX})")
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES and not path.is_dir():
        # Refused by name alone: a pickle is never opened, let alone handed to torch.load.
        raise CheckpointError(f"{path} is a pickle ({suffix}); yolo-resume never unpickles checkpoints — {_FOLDER_FIX}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a folder; {_FOLDER_FIX}")
    if path.name.startswith(TMP_PREFIX):
        raise CheckpointError(
            f"checkpoint {path} is the temporary folder of an unfinished save; resume from a committed checkpoint"
        )


def _list_files(path: Path) -> dict[str, os.stat_result]:
    names = sorted(os.listdir(path))
    for name in names:
        suffix = os.path.splitext(name)[1].lower()
        if suffix in PICKLE_SUFFIXES:
            raise _refuse(
                path,
                repr(name),
                f"unexpected pickle file ({suffix}); yolo-resume never unpickles checkpoints",
                "delete that file or resume from an earlier checkpoint",
            )
    listing = {}
    for name in names:
        info = os.lstat(path / name)
        if stat.S_ISLNK(info.st_mode):
            raise _refuse(path, repr(name), "is a symlink; checkpoint files must be regular files")
        if not stat.S_ISREG(info.st_mode):
            raise _refuse(path, repr(name), "unexpected entry that is not a regular file")
        listing[name] = info
    return listing


def _check_plain_name(path: Path, name: Any) -> None:
    plain = (
        type(name) is str
        and name not in ("", ".", "..")
        and len(name) <= 255
        and not any(ch in name for ch in "/\\\0")
        and not os.path.isabs(name)
    )
    if not plain:
        raise _refuse(
            path,
            MANIFEST_FILE,
            f"lists unsafe file name {name!r}; only plain names inside the folder are allowed",
        )


def _parse_manifest(path: Path, doc: Any) -> tuple[int, dict[str, _Entry]]:
    """(format version, entries) of a manifest of any readable version."""
    if type(doc) is not dict or not {"format", "format_version", "files"} <= set(doc):
        raise _refuse(path, MANIFEST_FILE, "is not a yolo-resume manifest (keys format, format_version, files)")
    if doc["format"] != FORMAT_NAME:
        raise _refuse(path, MANIFEST_FILE, f"format is {doc['format']!r}, not {FORMAT_NAME!r}")
    version = doc["format_version"]
    if type(version) is not int or version not in _LAYOUTS:
        raise _refuse(
            path,
            MANIFEST_FILE,
            f"format_version {version!r} is not supported (this yolo-resume reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))})",
            "use the yolo-resume release that wrote this checkpoint",
        )
    layout = _LAYOUTS[version]
    if set(doc) != layout.keys:
        keys = ", ".join(sorted(layout.keys))
        raise _refuse(path, MANIFEST_FILE, f"is not a yolo-resume manifest of version {version} (keys {keys})")
    checksum = layout.checksum or _named_checksum(path, doc["algorithm"])
    if type(doc["files"]) is not dict:
        raise _refuse(path, MANIFEST_FILE, "'files' is not an object")
    entries = {}
    for name, entry in doc["files"].items():
        _check_plain_name(path, name)
        if type(entry) is not dict or set(entry) != {"size", layout.digest_key}:
            raise _refuse(path, MANIFEST_FILE, f"entry {name!r} must have exactly 'size' and '{layout.digest_key}'")
        size, digest = entry["size"], entry[layout.digest_key]
        if type(size) is not int or size < 0 or not checksum.is_digest(digest):
            raise _refuse(path, MANIFEST_FILE, f"entry {name!r} has a malformed size or {checksum.label} digest")
        entries[name] = _Entry(size, digest, checksum)
    return version, entries


def _named_checksum(path: Path, name: Any) -> Checksum:
    if type(name) is not str or name not in CHECKSUMS:
        raise _refuse(
            path,
            MANIFEST_FILE,
            f"checksum algorithm {name!r} is not supported (this yolo-resume reads {', '.join(CHECKSUMS)})",
            "use the yolo-resume release that wrote this checkpoint",
        )
    return CHECKSUMS[name]


def _check_file_set(path: Path, version: int, entries: dict[str, _Entry], sizes: Mapping[str, int]) -> None:
    listed, present = set(entries), set(sizes) - {MANIFEST_FILE}
    missing, extra = sorted(listed - present), sorted(present - listed)
    if missing:
        raise _refuse(path, repr(missing[0]), "is listed in the manifest but missing")
    if extra:
        raise _refuse(
            path,
            repr(extra[0]),
            "unexpected file (not in the manifest)",
            "remove it or resume from an earlier checkpoint",
        )
    unknown = sorted(listed - set(DATA_FILES))
    if unknown:
        raise _refuse(path, repr(unknown[0]), f"unexpected file (not part of format version {version})")
    unlisted = [name for name in DATA_FILES if name not in listed]
    if unlisted:
        raise _refuse(path, unlisted[0], "is missing from the manifest")
    for name in DATA_FILES:
        actual, expected = sizes[name], entries[name].size
        if actual != expected:
            raise _refuse(path, name, f"is {actual} bytes but the manifest says {expected} (truncated or modified)")


def check_listing(
    where: Path | str,
    sizes: Mapping[str, int],
    read: Callable[[str, int], bytes],
    manifest_sha256: str | None = None,
) -> dict[str, _Entry]:
    """The checks that need no hashing of the tensor file, over any store: the manifest (at most 1 MiB,
    strict JSON, plain names; with `manifest_sha256`, the digest a commit marker holds), then the file set
    and every size against it. `sizes` lists the folder (name -> bytes); `read(name, limit)` returns at
    most `limit` bytes of a file. A local folder and an object-store prefix are checked by this one code."""
    if MANIFEST_FILE not in sizes:
        raise _refuse(
            where,
            MANIFEST_FILE,
            "is missing (the save or upload never completed, or this is not a yolo-resume checkpoint)",
            "resume from an earlier checkpoint",
        )
    if sizes[MANIFEST_FILE] > MANIFEST_MAX_BYTES:
        raise _refuse(where, MANIFEST_FILE, f"is larger than the {MANIFEST_MAX_BYTES} byte limit")
    data = read(MANIFEST_FILE, MANIFEST_MAX_BYTES + 1)
    # The commit marker stays SHA-256: it covers only this small manifest (well under a millisecond), and
    # the manifest's own checksums cover the data files.
    if manifest_sha256 is not None and hashlib.sha256(data).hexdigest() != manifest_sha256:
        raise _refuse(where, MANIFEST_FILE, "SHA-256 does not match the commit marker (modified after the commit)")
    try:
        doc = _loads_strict(data)
    except ValueError as exc:
        raise _refuse(where, MANIFEST_FILE, f"is not strict JSON: {exc}") from None
    version, entries = _parse_manifest(where, doc)
    _check_file_set(where, version, entries, sizes)
    return entries


def read_listed_meta(
    where: Path | str,
    sizes: Mapping[str, int],
    read: Callable[[str, int], bytes],
    manifest_sha256: str | None = None,
) -> dict:
    """meta.json after `check_listing` and a check of its own bytes against the manifest."""
    entries = check_listing(where, sizes, read, manifest_sha256)
    return _decode_meta(_parse_json_file(where, META_FILE, _read_listed(where, META_FILE, entries[META_FILE], read)))


def _read_listed(where: Path | str, name: str, entry: _Entry, read: Callable[[str, int], bytes]) -> bytes:
    """Read a JSON file whole and check the very bytes that will be parsed against the manifest."""
    if entry.size > JSON_MAX_BYTES:
        raise _refuse(where, name, f"is larger than the {JSON_MAX_BYTES} byte limit")
    data = read(name, entry.size + 1)
    if len(data) != entry.size or entry.checksum.hexdigest(data) != entry.digest:
        raise _refuse(where, name, _mismatch(entry))
    return data


def _local_reader(path: Path) -> Callable[[str, int], bytes]:
    def read(name: str, limit: int) -> bytes:
        with _open_regular(path / name) as file:
            return _read_exact(file, limit)

    return read


def _check_structure(path: Path) -> dict[str, _Entry]:
    """Everything that needs no hashing: folder, listing, manifest, file names, file set, sizes."""
    _check_folder(path)
    sizes = {name: info.st_size for name, info in _list_files(path).items()}
    return check_listing(path, sizes, _local_reader(path))


def _mismatch(entry: _Entry) -> str:
    return f"{entry.checksum.label} does not match the manifest (file is corrupt or was modified)"


def _check_tensor_file_digest(path: Path, entry: _Entry) -> None:
    digest, total = entry.checksum.new(), 0
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    with _open_regular(path / TENSORS_FILE) as file:
        while count := file.readinto(buffer):
            digest.update(view[:count])
            total += count
    if total != entry.size or digest.hexdigest() != entry.digest:
        raise _refuse(path, TENSORS_FILE, _mismatch(entry))


def _parse_json_file(path: Path, name: str, data: bytes) -> Any:
    try:
        doc = _loads_strict(data)
    except ValueError as exc:
        raise _refuse(path, name, f"is not strict JSON: {exc}") from None
    if type(doc) is not dict:
        raise _refuse(path, name, "top level is not a JSON object")
    return doc


def _read_header(path: Path, file_size: int) -> dict[str, _HeaderEntry]:
    """Parse and bounds-check the safetensors header ourselves before the library sees the file."""
    with _open_regular(path / TENSORS_FILE) as file:
        prefix = _read_exact(file, 8)
        if len(prefix) < 8:
            raise _refuse(path, TENSORS_FILE, f"is {file_size} bytes, too short for a safetensors header")
        length = int.from_bytes(prefix, "little")
        if length > HEADER_MAX_BYTES:
            raise _refuse(path, TENSORS_FILE, f"header length {length} exceeds the {HEADER_MAX_BYTES} byte limit")
        if length > file_size - 8:
            raise _refuse(path, TENSORS_FILE, f"header length {length} runs past the end of the {file_size} byte file")
        raw = _read_exact(file, length)
    try:
        header = _loads_strict(raw)
    except ValueError as exc:
        raise _refuse(path, TENSORS_FILE, f"header is not strict JSON: {exc}") from None
    if type(header) is not dict:
        raise _refuse(path, TENSORS_FILE, "header is not a JSON object")
    entries = _header_entries(path, header)
    _check_coverage(path, entries, file_size - 8 - length)
    return entries


def _header_entries(path: Path, header: dict) -> dict[str, _HeaderEntry]:
    entries = {}
    for key, spec in header.items():
        if key == "__metadata__":
            if type(spec) is not dict or any(type(v) is not str for v in spec.values()):
                raise _refuse(path, TENSORS_FILE, "header __metadata__ must map strings to strings")
            continue
        entries[key] = _header_entry(path, key, spec)
    return entries


def _header_entry(path: Path, key: str, spec: Any) -> _HeaderEntry:
    def bad(problem: str) -> CheckpointError:
        return _refuse(path, TENSORS_FILE, f"tensor {key!r}: {problem}")

    if type(spec) is not dict or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise bad("entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if type(dtype) is not str or dtype not in _ST_ITEMSIZE:
        raise bad(f"unsupported dtype {dtype!r}")
    if type(shape) is not list or len(shape) > MAX_NDIM or any(type(d) is not int or d < 0 for d in shape):
        raise bad(f"malformed shape {shape!r}")
    if type(offsets) is not list or len(offsets) != 2 or any(type(o) is not int for o in offsets):
        raise bad(f"malformed data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise bad(f"data_offsets {offsets} are out of order")
    if end - begin != math.prod(shape) * _ST_ITEMSIZE[dtype]:
        raise bad(f"data_offsets {offsets} do not match shape {shape} of {dtype}")
    return _HeaderEntry(dtype, tuple(shape), begin, end)


def _check_coverage(path: Path, entries: dict[str, _HeaderEntry], data_size: int) -> None:
    """Tensor byte ranges must tile the data section exactly: no overlap, no gap, nothing outside."""
    cursor, previous = 0, None
    for key, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end, item[0])):
        if entry.end > data_size:
            raise _refuse(
                path,
                TENSORS_FILE,
                f"tensor {key!r} data_offsets end at {entry.end}, out of bounds of the {data_size} byte data section",
            )
        if entry.begin < cursor:
            raise _refuse(path, TENSORS_FILE, f"tensors {previous!r} and {key!r} overlap")
        if entry.begin > cursor:
            raise _refuse(path, TENSORS_FILE, f"unaccounted bytes {cursor}..{entry.begin} before tensor {key!r}")
        cursor, previous = entry.end, key
    if cursor != data_size:
        raise _refuse(path, TENSORS_FILE, f"tensor data ends at {cursor} but the data section is {data_size} bytes")


class _ReferenceChecker(_Decoder):
    """Walks the skeleton against the safetensors header only: proves the load cannot fail."""

    def __init__(self, header: dict[str, _HeaderEntry]) -> None:
        super().__init__(header)
        self.header = header

    def tensor(self, key: str, path: tuple[str, ...]) -> None:
        return None

    def array(self, key: str, dtype: np.dtype, shape: tuple[int, ...], path: tuple[str, ...]) -> None:
        entry = self.header[key]
        if entry.dtype != "U8" or entry.shape != (_array_nbytes(dtype, shape),):
            raise ValueError(f"byte size of numpy array {key!r} does not match its dtype and shape")


def _verify(path: Path) -> tuple[Any, dict]:
    """Full verification; returns (skeleton, meta) so that loading does not parse twice. The cheap checks
    come first (sizes against the manifest, the small JSON files, the bytes actually on disk: a sparse
    file is refused), then the safetensors header against the file size, so a crafted tensor file costs
    at most the bytes it really holds. A header error is reported after the hash: a flipped bit in it
    is named for what it is, a checksum mismatch."""
    entries = _check_structure(path)
    read = _local_reader(path)
    state_bytes = _read_listed(path, STATE_FILE, entries[STATE_FILE], read)
    meta_bytes = _read_listed(path, META_FILE, entries[META_FILE], read)
    skeleton = _parse_json_file(path, STATE_FILE, state_bytes)
    meta = _decode_meta(_parse_json_file(path, META_FILE, meta_bytes))
    _check_not_sparse(path)
    try:
        header, header_error = _read_header(path, entries[TENSORS_FILE].size), None
    except CheckpointError as exc:
        header, header_error = None, exc
    _check_tensor_file_digest(path, entries[TENSORS_FILE])
    if header_error is not None:
        raise header_error
    try:
        _ReferenceChecker(header).decode_root(skeleton)
    except ValueError as exc:
        raise _refuse(path, STATE_FILE, str(exc)) from None
    return skeleton, meta


def _check_not_sparse(path: Path) -> None:
    info = os.lstat(path / TENSORS_FILE)
    allocated = getattr(info, "st_blocks", None)
    if allocated is None or info.st_size < SPARSE_CHECK_MIN_BYTES:
        return
    if allocated * 512 < info.st_size * MIN_ALLOCATED_FRACTION:
        raise _refuse(
            path,
            TENSORS_FILE,
            f"is a sparse file ({allocated * 512} of its {info.st_size} bytes are on disk); yolo-resume writes "
            "every byte, so this file was crafted or damaged",
        )


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError naming the checkpoint, the file and the problem unless `path` is intact."""
    path = Path(path)
    with _reading(path):
        _verify(path)


def read_meta(path: Path) -> dict:
    """meta.json of a checkpoint, after the cheap checks (manifest, file set, sizes, meta.json's hash).

    Does not hash the tensor file: use it to list checkpoints; `load_checkpoint` verifies everything."""
    path = Path(path)
    with _reading(path):
        _check_folder(path)
        sizes = {name: info.st_size for name, info in _list_files(path).items()}
        return read_listed_meta(path, sizes, _local_reader(path))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """Verify `path` completely, then return (state, meta) with tensors on `map_location`."""
    path = Path(path)
    with _reading(path):
        skeleton, meta = _verify(path)
        try:
            tensors = safetensors.torch.load_file(path / TENSORS_FILE, device="cpu")
        except Exception as exc:  # verified a moment ago: only a concurrent modification gets here
            raise _refuse(path, TENSORS_FILE, f"safetensors could not load it: {exc}") from exc
    try:
        state = unflatten_state(tensors, skeleton, device=map_location)
    except ValueError as exc:
        raise _refuse(path, STATE_FILE, str(exc)) from None
    return state, meta


def is_checkpoint_dir(path: Path) -> bool:
    """True for a folder with a manifest (not verified); temporary `.tmp-*` folders never count."""
    path = Path(path)
    if path.name.startswith(TMP_PREFIX):
        return False
    try:
        return path.is_dir() and stat.S_ISREG(os.lstat(path / MANIFEST_FILE).st_mode)
    except OSError:
        return False
