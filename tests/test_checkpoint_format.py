"""Checkpoint format: exact round trip, atomic commit, refusal of every corrupt or hostile input."""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from yolo_resume.checkpoint import format as fmt
from yolo_resume.checkpoint.format import (
    KILL_ENV,
    KILL_STAGES,
    flatten_state,
    is_checkpoint_dir,
    load_checkpoint,
    read_meta,
    snapshot_to_cpu,
    tensor_digests,
    unflatten_state,
    verify_checkpoint,
    write_checkpoint,
)
from yolo_resume.errors import CheckpointError, UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
META = {"epoch": 3, "loss": math.nan, "best": -math.inf, "name": "run-1", "lrs": [0.1, 0.01]}
DATA_FILES = ("tensors.safetensors", "state.json", "meta.json")
NO_EQUAL_DTYPES = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}


# ---------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------


def make_state(seed: int = 0) -> dict:
    """A small but realistic training state: model, EMA, two optimizers after a step, every RNG."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sgd = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    model(torch.randn(2, 3, 8, 8)).square().sum().backward()
    adamw.step()
    sgd.step()
    random.seed(seed)
    np.random.seed(seed)
    return {
        "model": model.state_dict(),
        "ema": {key: value.detach().clone().to(torch.float16) for key, value in model.state_dict().items()},
        "optimizer": adamw.state_dict(),
        "sgd": sgd.state_dict(),
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "numpy_generator": np.random.default_rng(seed).bit_generator.state,
            "torch": torch.get_rng_state(),
        },
        "epoch": 7,
        "floats": [math.inf, -math.inf, math.nan, -0.0, 5e-324, 0.1, 1e308],
        "nested": (1, (2.5, "x", None, True), [(), {}, []]),
        "int_keys": {0: "a", 10: {"b": 1}, "s": 2, -1: None},
        "dunder": {"__tensor__": "not a reference", "__float__": "nan"},
        "big": [2**200, -(2**100)],
        "arrays": {
            "matrix": np.arange(6, dtype=np.float32).reshape(2, 3),
            "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)),
            "zero_dim": np.array(3, dtype=np.int16),
            "empty": np.zeros((0, 4)),
            "big_endian": np.arange(3, dtype=">i4"),
            "strings": np.array(["ab", "c"]),
            "dates": np.array(["2024-01-02"], dtype="M8[D]"),
        },
        "np_scalars": [np.float32(1.5), np.int64(-3), np.bool_(True)],
        "tensors": {
            "bf16": torch.randn(3).to(torch.bfloat16),
            "zero_dim": torch.tensor(2.5, dtype=torch.float64),
            "empty": torch.empty(0, 3),
            "bool": torch.tensor([True, False]),
            "uint8": torch.arange(5, dtype=torch.uint8),
            "transposed": torch.arange(6.0).reshape(2, 3).t(),
            "nan": torch.tensor([math.nan, -math.inf, -0.0]),
        },
    }


@pytest.fixture(scope="module")
def state() -> dict:
    return make_state()


@pytest.fixture
def ckpt(tmp_path: Path, state: dict) -> Path:
    return write_checkpoint(tmp_path, "ckpt", state, META)


def assert_same(a, b, path: str = "state") -> None:
    """Exact equality including types, key order and key types, and bitwise tensor/array contents."""
    if isinstance(a, dict):
        assert type(b) is dict, path  # OrderedDict comes back as dict
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}.{i}")
    elif isinstance(a, torch.Tensor):
        assert type(b) is torch.Tensor and b.dtype == a.dtype and b.shape == a.shape, path
        assert b.device.type == "cpu", path
        assert torch.equal(bytes_of(a), bytes_of(b)), path  # bitwise: NaN payloads and -0.0 included
        if a.dtype not in NO_EQUAL_DTYPES and not (a.is_floating_point() and a.isnan().any()):
            assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert type(b) is np.ndarray and b.dtype == a.dtype and b.shape == a.shape, path
        assert np.ascontiguousarray(a).tobytes() == b.tobytes() and b.flags.writeable, path
    elif isinstance(a, float) and not isinstance(a, np.generic):
        assert type(b) is float, path
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), path
    else:
        assert type(b) is type(a) and b == a, path


def bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def rewrite_manifest(folder: Path, **extra: dict) -> None:
    """Make the manifest consistent with whatever is on disk: a hostile but self-consistent checkpoint."""
    files = {
        p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in sorted(folder.iterdir())
        if p.name != "manifest.json" and not p.is_symlink()
    }
    files.update(extra)
    manifest = {"format": "yolo-resume-checkpoint", "format_version": 1, "files": files}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def refused(folder: Path, *needles: str, loader=verify_checkpoint) -> str:
    with pytest.raises(CheckpointError) as info:
        loader(folder)
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "\n" not in message and str(folder) in message, message
    for needle in needles:
        assert needle in message, message
    return message


def flip_bit(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def edit_header(folder: Path, mutate) -> None:
    """Rewrite the safetensors header with `mutate(header_dict)`, keep the data, re-hash the manifest."""
    path = folder / "tensors.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    mutate(header)
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + length :])
    rewrite_manifest(folder)


def header_of(folder: Path) -> dict:
    raw = (folder / "tensors.safetensors").read_bytes()
    return json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])


# ---------------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------------


def test_round_trip_is_exact(ckpt: Path, state: dict) -> None:
    loaded, meta = load_checkpoint(ckpt)
    assert_same(state, loaded)
    assert meta.pop("format_version") == 2
    assert math.isnan(meta.pop("loss")) and math.isnan(META["loss"])
    assert meta == {k: v for k, v in META.items() if k != "loss"}
    assert read_meta(ckpt)["epoch"] == 3


def test_layout_keys_and_json_are_readable(ckpt: Path) -> None:
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([*DATA_FILES, "manifest.json"])
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["format"] == "yolo-resume-checkpoint" and manifest["format_version"] == 2
    assert set(manifest["files"]) == set(DATA_FILES)
    keys = set(header_of(ckpt))
    assert {"model.0.weight", "ema.1.running_var", "optimizer.state.3.exp_avg", "rng.torch"} <= keys
    assert "sgd.state.0.momentum_buffer" in keys and "rng.numpy.1" in keys
    for name in ("state.json", "meta.json", "manifest.json"):  # strict JSON, no NaN/Infinity constants
        text = (ckpt / name).read_text(encoding="utf-8")
        assert "NaN" not in text and "Infinity" not in text
    assert json.loads((ckpt / "meta.json").read_text())["format_version"] == 2


def test_rng_states_resume_the_same_streams(tmp_path: Path) -> None:
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    generator = np.random.default_rng(14)
    random.random(), np.random.rand(), generator.random(), torch.rand(1)  # advance past the seed state
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "generator": generator.bit_generator.state,
        "torch": torch.get_rng_state(),
    }
    expected = (random.random(), np.random.rand(3).tolist(), generator.random(2).tolist(), torch.rand(3))
    write_checkpoint(tmp_path, "rng", {"rng": rng}, {})
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    loaded = load_checkpoint(tmp_path / "rng")[0]["rng"]
    random.setstate(loaded["python"])
    np.random.set_state(loaded["numpy"])
    restored = np.random.default_rng()
    restored.bit_generator.state = loaded["generator"]
    torch.set_rng_state(loaded["torch"])
    actual = (random.random(), np.random.rand(3).tolist(), restored.random(2).tolist(), torch.rand(3))
    assert actual[:3] == expected[:3] and torch.equal(actual[3], expected[3])
    assert loaded["generator"]["state"]["state"] > 2**64  # big ints survived JSON


def test_training_step_after_resume_is_bitwise_identical(tmp_path: Path) -> None:
    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
        return model, torch.optim.AdamW(model.parameters(), lr=0.01)

    def step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        model(torch.randn(4, 5)).square().mean().backward()
        opt.step()

    model, opt = build()
    step(model, opt)
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "torch_rng": torch.get_rng_state()}
    loaded, _ = load_checkpoint(write_checkpoint(tmp_path, "c", state, {}))
    step(model, opt)  # the uninterrupted run

    resumed, resumed_opt = build()
    resumed.load_state_dict(loaded["model"])
    resumed_opt.load_state_dict(loaded["optimizer"])
    torch.set_rng_state(loaded["torch_rng"])
    step(resumed, resumed_opt)
    assert tensor_digests({"model": resumed.state_dict(), "optimizer": resumed_opt.state_dict()}) == tensor_digests(
        {"model": model.state_dict(), "optimizer": opt.state_dict()}
    )


def test_every_supported_dtype_and_shared_storage(tmp_path: Path) -> None:
    tensors = {str(dtype): torch.zeros(2, 3).to(dtype) for dtype in fmt._TORCH_DTYPES}
    tensors.update({f"scalar-{dtype}": torch.ones(()).to(dtype) for dtype in fmt._TORCH_DTYPES})
    base = torch.arange(12.0)
    shared = {"whole": base, "view": base[2:6], "same": base, "tied": base.view(3, 4)}
    state = {"tensors": tensors, "shared": shared, "param": nn.Parameter(torch.ones(2))}
    loaded, _ = load_checkpoint(write_checkpoint(tmp_path, "dtypes", state, {}))
    state["param"] = state["param"].detach()  # a Parameter comes back as a plain tensor
    assert_same(state, loaded)
    loaded["shared"]["whole"][0] = 99.0  # restored tensors are independent
    assert loaded["shared"]["same"][0] == 0.0 and base[0] == 0.0


def test_many_small_tensors_between_large_ones_round_trip_bitwise(tmp_path: Path, monkeypatch) -> None:
    # Small limits so that runs of small tensors are joined, cut at CHUNK_BYTES and interrupted by large
    # tensors written from their own memory, in every order; bit patterns (NaN payloads, -0.0) included.
    monkeypatch.setattr(fmt, "COALESCE_BYTES", 64)
    monkeypatch.setattr(fmt, "CHUNK_BYTES", 256)
    generator = torch.Generator().manual_seed(0)
    dtypes = list(fmt._TORCH_DTYPES)
    state: dict = {}
    for i in range(120):
        dtype = dtypes[i % len(dtypes)]
        shape = [(), (0,), (3,), (2, 5), (40,), (7, 9)][i % 6]
        raw = torch.randint(
            0, 256, (math.prod(shape) * fmt._ST_ITEMSIZE[fmt._TORCH_DTYPES[dtype][0]],), generator=generator
        )
        raw = raw % 2 if dtype == torch.bool else raw  # a bool byte is 0 or 1
        state[f"t{i}"] = raw.to(torch.uint8).view(dtype).reshape(shape)
    base = torch.arange(60.0).reshape(6, 10)
    state["views"] = {"base": base, "column": base[:, 3], "transposed": base.t(), "row": base[2], "tied": base}
    state["bf16"] = torch.randn(33, generator=generator).to(torch.bfloat16)
    state["grad"] = torch.ones(5, requires_grad=True) * 2  # non-leaf tensor that requires grad
    ckpt = write_checkpoint(tmp_path, "mixed", state, {})
    loaded, _ = load_checkpoint(ckpt)
    state["grad"] = state["grad"].detach()
    assert_same(state, loaded)
    raw = (ckpt / "tensors.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + length].rstrip(b" ")
    # The hand-built header is exactly what json.dumps writes for the same entries (canonical, strict).
    assert json.dumps(json.loads(header), separators=(",", ":")).encode() == header


def test_flatten_keys_are_unique_and_deterministic() -> None:
    state = {
        "a.b": torch.ones(1),
        "a": {"b": torch.zeros(1)},
        "__metadata__": torch.ones(1),
        "l": [torch.ones(2)],
    }
    tensors, skeleton = flatten_state(state)
    assert list(tensors) == ["a.b", "a.b#2", "__metadata__#2", "l.0"]
    assert flatten_state(state)[1] == skeleton
    assert_same(state, unflatten_state(tensors, skeleton))


def test_unsupported_values_name_their_path(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"at a\.1"):
        flatten_state({"a": [1, object()]})
    with pytest.raises(TypeError, match="keys must be str or int"):
        flatten_state({"x": {(1, 2): 3}})
    with pytest.raises(TypeError, match="object"):
        flatten_state({"x": np.array([None, 1], dtype=object)})
    with pytest.raises(TypeError):
        write_checkpoint(tmp_path, "bad", {"a": {1.5: 2}}, {})
    with pytest.raises(TypeError, match="JSON-able"):
        write_checkpoint(tmp_path, "bad", {}, {"path": Path("x")})
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp folder


def test_malformed_skeleton_is_refused_by_unflatten() -> None:
    tensors, skeleton = flatten_state({"t": torch.ones(2)})
    for bad in ({"t": {"__tensor__": "missing"}}, {"__bogus__": 1}, {"a": 1, "__tensor__": "t"}, [1.5e400]):
        with pytest.raises(ValueError):
            unflatten_state(tensors, bad)
    with pytest.raises(ValueError, match="not referenced"):
        unflatten_state({**tensors, "extra": torch.ones(1)}, skeleton)
    assert torch.equal(unflatten_state(tensors, skeleton, device="cpu")["t"], torch.ones(2))


leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**130), max_value=2**130)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6)
    | st.integers(0, 3).map(lambda n: torch.arange(n, dtype=torch.float32))
    | st.integers(0, 3).map(lambda n: np.arange(n, dtype=np.uint32))
)
trees = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=4) | st.integers(-3, 3), children, max_size=3)
    ),
    max_leaves=12,
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(trees)
def test_flatten_round_trips_arbitrary_trees_through_strict_json(tree) -> None:
    tensors, skeleton = flatten_state({"root": tree})
    text = json.dumps(skeleton, allow_nan=False)
    assert_same({"root": tree}, unflatten_state(tensors, fmt._loads_strict(text.encode())))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_saved_from_cpu_and_mapped_back(tmp_path: Path) -> None:
    model = nn.Linear(4, 3).cuda()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4, device="cuda")).sum().backward()
    opt.step()
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "cuda_rng": torch.cuda.get_rng_state_all(),
    }
    snap = snapshot_to_cpu(state)
    assert snap["model"]["weight"].device.type == "cpu"
    assert tensor_digests(state) == tensor_digests(snap)
    path = write_checkpoint(tmp_path, "cuda", state, {})
    on_cpu, _ = load_checkpoint(path)
    assert_same(snap, on_cpu)
    on_gpu, _ = load_checkpoint(path, map_location="cuda")
    assert on_gpu["model"]["weight"].is_cuda and torch.equal(on_gpu["model"]["weight"], model.weight.detach())
    fresh = torch.optim.AdamW(model.parameters())
    fresh.load_state_dict(on_gpu["optimizer"])  # a real consumer accepts the restored structure


def test_snapshot_is_an_independent_copy(state: dict) -> None:
    original = {"w": torch.ones(3), "a": np.zeros(2), "nested": ({"v": torch.zeros(1)},)}
    snap = snapshot_to_cpu(original)
    original["w"].add_(1)
    original["a"][0] = 5
    original["nested"][0]["v"].add_(1)
    assert torch.equal(snap["w"], torch.ones(3)) and snap["a"][0] == 0 and snap["nested"][0]["v"].item() == 0
    assert_same(dict(state), snapshot_to_cpu(state))


# ---------------------------------------------------------------------------------------------------
# Digests
# ---------------------------------------------------------------------------------------------------


def test_tensor_digests(ckpt: Path, state: dict) -> None:
    digests = tensor_digests(state)
    assert set(digests) == {"model", "ema", "optimizer"}
    assert tensor_digests(make_state()) == digests  # equal states built separately
    assert tensor_digests(load_checkpoint(ckpt)[0]) == digests  # and after a disk round trip
    reordered = dict(state, model=OrderedDict(reversed(list(state["model"].items()))))
    assert tensor_digests(reordered) == digests
    for group in ("model", "ema", "optimizer"):
        changed = snapshot_to_cpu(state)
        first_float_tensor(changed[group]).view(-1)[0] += 1
        assert tensor_digests(changed)[group] != digests[group]
        assert all(tensor_digests(changed)[g] == digests[g] for g in digests if g != group)
    # Pinned value: the digest must be identical across processes, machines and releases.
    fixed = {"model": {"w": torch.arange(4, dtype=torch.float32).reshape(2, 2), "n": torch.tensor(3)}}
    assert tensor_digests(fixed, algorithm="sha256") == {"model": GOLDEN_DIGEST}  # format version 1


GOLDEN_DIGEST = "aaf374a2a40a292d78e3e0d03b302928ba463cb6f63371ed6c4c3c31fbe53c64"


def first_float_tensor(obj):
    if isinstance(obj, torch.Tensor):
        return obj if obj.is_floating_point() and obj.numel() else None
    for item in obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ():
        found = first_float_tensor(item)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------------------------------------------
# Commit protocol
# ---------------------------------------------------------------------------------------------------


def test_never_overwrites(ckpt: Path, state: dict) -> None:
    before = file_digests(ckpt)
    with pytest.raises(CheckpointError, match="already exists"):
        write_checkpoint(ckpt.parent, "ckpt", {"other": 1}, {})
    assert file_digests(ckpt) == before
    verify_checkpoint(ckpt)


@pytest.mark.parametrize("name", ["", ".", "..", "../escape", "a/b", ".tmp-x", ".hidden", "x\n"])
def test_invalid_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CheckpointError, match="invalid checkpoint name"):
        write_checkpoint(tmp_path, name, {}, {})


def _fake_full_disk(monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    """os.write fails with ENOSPC (after a partial write) for `target` inside a temp folder only."""
    real_write = os.write

    def write(fd: int, data) -> int:
        where = os.readlink(f"/proc/self/fd/{fd}")
        if f"/{fmt.TMP_PREFIX}" in where and where.endswith("/" + target):
            if os.fstat(fd).st_size == 0 and len(data) > 1:
                return real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("target", [*DATA_FILES, "manifest.json"])
def test_disk_full_leaves_no_trace(ckpt: Path, monkeypatch: pytest.MonkeyPatch, target: str) -> None:
    before = file_digests(ckpt)
    _fake_full_disk(monkeypatch, target)
    with pytest.raises(CheckpointError) as info:
        write_checkpoint(ckpt.parent, "next", make_small_state(), {"epoch": 4})
    message = str(info.value)
    assert "saving checkpoint next failed: No space left on device (errno 28)" in message
    assert "committed checkpoints are untouched" in message and target in message
    assert info.value.errno == errno.ENOSPC and isinstance(info.value.__cause__, OSError)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["ckpt"]  # no temp folder, no "next"
    assert file_digests(ckpt) == before
    verify_checkpoint(ckpt)


def test_fsync_error_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(CheckpointError, match=r"Input/output error \(errno 5\)") as info:
        write_checkpoint(tmp_path, "c", make_small_state(), {})
    assert info.value.errno == errno.EIO
    assert list(tmp_path.iterdir()) == []


def test_stale_temp_folders_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".tmp-old-{dead_pid}-abcd1234"
    mine = tmp_path / f".tmp-concurrent-{os.getpid()}-abcd1234"  # a concurrent save of this process
    foreign = tmp_path / ".tmp-not-ours"
    for folder in (stale, mine, foreign):
        folder.mkdir()
    assert not is_checkpoint_dir(stale)
    write_checkpoint(tmp_path, "c", make_small_state(), {})
    assert not stale.exists() and mine.exists() and foreign.exists()


def make_small_state() -> dict:
    return {"model": {"w": torch.arange(64.0)}, "step": 1}


# One child interpreter (torch is imported once) forks a writer per scenario: each stage's writer SIGKILLs
# itself via the environment hook; the "fsize" writer runs under a real file size limit (kernel EFBIG).
CHILD = """
import json, os, resource, signal, sys, torch
from pathlib import Path
from yolo_resume.checkpoint.format import KILL_ENV, write_checkpoint
from yolo_resume.errors import CheckpointError

def kill_at(stage, parent):
    os.environ[KILL_ENV] = stage
    write_checkpoint(parent, "ckpt-2", {"model": {"w": torch.arange(4096.0)}, "step": 2}, {"step": 2})

def fsize_limited(parent):
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        write_checkpoint(parent, "big", {"w": torch.zeros(1 << 14)}, {})
    except CheckpointError as err:
        print(json.dumps({"message": str(err), "errno": err.errno}), flush=True)

statuses = {}
for arg in sys.argv[1:]:
    stage, parent = arg.split("=", 1)
    pid = os.fork()
    if pid == 0:
        try:
            (fsize_limited if stage == "fsize" else lambda p: kill_at(stage, p))(Path(parent))
        finally:
            os._exit(0)
    statuses[stage] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(statuses))
"""


@pytest.fixture(scope="module")
def child_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs every crash scenario in a child; each has its own parent folder with one committed checkpoint."""
    parents, digests = {}, {}
    for stage in (*KILL_STAGES, "fsize"):
        parents[stage] = tmp_path_factory.mktemp(f"child-{stage}")
        write_checkpoint(parents[stage], "ckpt-1", make_small_state(), {"step": 1})
        digests[stage] = file_digests(parents[stage] / "ckpt-1")
    args = [f"{stage}={parent}" for stage, parent in parents.items()]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop(KILL_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    *lines, last = proc.stdout.splitlines()
    statuses = json.loads(last)
    return {"parents": parents, "digests": digests, "statuses": statuses, "fsize": json.loads(lines[-1])}


@pytest.mark.parametrize("stage", KILL_STAGES)
def test_sigkill_at_every_stage_never_corrupts(child_runs: dict, stage: str) -> None:
    parent = child_runs["parents"][stage]
    assert child_runs["statuses"][stage] == -signal.SIGKILL
    assert file_digests(parent / "ckpt-1") == child_runs["digests"][stage]
    verify_checkpoint(parent / "ckpt-1")
    temps = [p for p in parent.iterdir() if p.name.startswith(".tmp-")]
    if stage == "after_rename":
        verify_checkpoint(parent / "ckpt-2")  # renamed means complete
        assert temps == []
    else:
        assert not (parent / "ckpt-2").exists() and len(temps) == 1
        assert not is_checkpoint_dir(temps[0])
        refused(temps[0], "unfinished save")
    write_checkpoint(parent, "ckpt-3", make_small_state(), {"step": 3})
    assert not [p for p in parent.iterdir() if p.name.startswith(".tmp-")]  # the dead writer's temp is gone
    verify_checkpoint(parent / "ckpt-3")


def test_file_size_limit_in_a_real_process(child_runs: dict) -> None:
    parent, result = child_runs["parents"]["fsize"], child_runs["fsize"]
    assert child_runs["statuses"]["fsize"] == 0
    assert result["errno"] == errno.EFBIG and "File too large (errno 27)" in result["message"]
    assert sorted(p.name for p in parent.iterdir()) == ["ckpt-1"]
    assert file_digests(parent / "ckpt-1") == child_runs["digests"]["fsize"]


# ---------------------------------------------------------------------------------------------------
# Verification: corruption
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 4, "half", "minus1"])
def test_truncated_tensor_file(ckpt: Path, size) -> None:
    path = ckpt / "tensors.safetensors"
    data = path.read_bytes()
    keep = {"half": len(data) // 2, "minus1": len(data) - 1}.get(size, size)
    path.write_bytes(data[:keep])
    refused(ckpt, "tensors.safetensors", f"is {keep} bytes but the manifest says {len(data)}")
    refused(ckpt, "tensors.safetensors", loader=load_checkpoint)


@pytest.mark.parametrize("size", [0, 7])
def test_truncated_tensor_file_with_consistent_manifest(ckpt: Path, size: int) -> None:
    path = ckpt / "tensors.safetensors"
    path.write_bytes(path.read_bytes()[:size])
    rewrite_manifest(ckpt)
    refused(ckpt, "tensors.safetensors", "too short for a safetensors header")


@pytest.mark.parametrize("name", DATA_FILES)
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_single_bit_flip_in_a_data_file(ckpt: Path, name: str, where: str) -> None:
    path = ckpt / name
    size = path.stat().st_size
    flip_bit(path, {"first": 0, "middle": size // 2, "last": size - 1}[where], bit=3)
    refused(ckpt, name, "XXH3-128 does not match the manifest")
    refused(ckpt, name, loader=load_checkpoint)


def test_every_single_bit_flip_in_the_manifest_is_refused(ckpt: Path) -> None:
    path = ckpt / "manifest.json"
    original = path.read_bytes()
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset, byte in enumerate(original):
            for bit in range(8):
                os.pwrite(fd, bytes([byte ^ (1 << bit)]), offset)
                with pytest.raises(CheckpointError, match="ckpt"):
                    verify_checkpoint(ckpt)
            os.pwrite(fd, bytes([byte]), offset)
    finally:
        os.close(fd)
    verify_checkpoint(ckpt)


@pytest.mark.parametrize("name", DATA_FILES)
def test_missing_file(ckpt: Path, name: str) -> None:
    (ckpt / name).unlink()
    refused(ckpt, name, "is listed in the manifest but missing")


def test_missing_manifest_means_not_a_checkpoint(ckpt: Path) -> None:
    (ckpt / "manifest.json").unlink()
    assert not is_checkpoint_dir(ckpt)
    refused(ckpt, "manifest.json", "is missing")
    refused(ckpt, "manifest.json", loader=read_meta)


def test_extra_file_and_extra_folder(ckpt: Path) -> None:
    (ckpt / "notes.txt").write_text("hi")
    refused(ckpt, "notes.txt", "unexpected file (not in the manifest)")
    rewrite_manifest(ckpt)  # listed and hashed, but still not part of the format
    refused(ckpt, "notes.txt", "not part of format version 1")
    (ckpt / "notes.txt").unlink()
    rewrite_manifest(ckpt)
    (ckpt / "sub").mkdir()
    refused(ckpt, "sub", "not a regular file")


@pytest.mark.parametrize("name", ["../x", "/etc/hostname", "a/b", "..", "", "x\\y", "nul\0"])
def test_unsafe_manifest_names(ckpt: Path, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "x"
    outside.write_bytes(b"secret")
    entry = {"size": 6, "sha256": hashlib.sha256(b"secret").hexdigest()}
    rewrite_manifest(ckpt, **{name: entry})
    refused(ckpt, "manifest.json", "unsafe file name")


def test_symlinked_entry_is_refused(ckpt: Path, tmp_path: Path) -> None:
    copy = tmp_path / "state-copy.json"
    copy.write_bytes((ckpt / "state.json").read_bytes())
    (ckpt / "state.json").unlink()
    (ckpt / "state.json").symlink_to(copy)  # same bytes, so size and hash would match
    refused(ckpt, "state.json", "is a symlink")


def test_manifest_problems(ckpt: Path) -> None:
    path = ckpt / "manifest.json"
    manifest = json.loads(path.read_text())
    cases = [
        (dict(manifest, format_version=3), "format_version 3 is not supported"),
        (dict(manifest, format="pytorch"), "format is 'pytorch'"),
        (dict(manifest, extra=1), "is not a yolo-resume manifest"),
        (
            {**manifest, "files": {**manifest["files"], "state.json": {"size": 1}}},
            "exactly 'size' and 'digest'",
        ),
    ]
    for doc, needle in cases:
        path.write_text(json.dumps(doc))
        refused(path.parent, "manifest.json", needle)
    path.write_bytes(b'{"format": "yolo-resume-checkpoint", "format": "x"}')
    refused(ckpt, "manifest.json", "duplicate key 'format'")
    path.write_bytes(b" " * (fmt.MANIFEST_MAX_BYTES + 1))
    refused(ckpt, "manifest.json", "larger than")
    files = {k: v for k, v in manifest["files"].items() if k != "meta.json"}
    path.write_text(json.dumps(dict(manifest, files=files)))
    refused(ckpt, "meta.json", "unexpected file")


# ---------------------------------------------------------------------------------------------------
# Verification: hostile but self-consistent files
# ---------------------------------------------------------------------------------------------------


def test_oversized_header_length(ckpt: Path) -> None:
    path = ckpt / "tensors.safetensors"
    data = path.read_bytes()
    path.write_bytes((200 << 20).to_bytes(8, "little") + data[8:])
    rewrite_manifest(ckpt)
    refused(ckpt, "tensors.safetensors", "header length 209715200 exceeds")
    path.write_bytes(len(data).to_bytes(8, "little") + data[8:])
    rewrite_manifest(ckpt)
    refused(ckpt, "tensors.safetensors", "runs past the end")
    refused(ckpt, "tensors.safetensors", loader=load_checkpoint)


def _set(key: str, field: str, value):
    def mutate(header: dict) -> None:
        header[key][field] = value

    return mutate


def test_overlapping_offsets(ckpt: Path) -> None:
    header = header_of(ckpt)
    weight = header["model.0.weight"]
    assert header["optimizer.state.0.exp_avg"]["shape"] == weight["shape"]  # same size, so sizes stay valid
    edit_header(ckpt, _set("optimizer.state.0.exp_avg", "data_offsets", weight["data_offsets"]))
    refused(ckpt, "tensors.safetensors", "overlap")
    refused(ckpt, "tensors.safetensors", "overlap", loader=load_checkpoint)
    edit_header(ckpt, _set("tensors.bool", "data_offsets", weight["data_offsets"]))
    refused(ckpt, "tensors.safetensors", "'tensors.bool'", "do not match shape")


def test_out_of_bounds_and_uncovered_offsets(ckpt: Path) -> None:
    header = header_of(ckpt)
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    edit_header(ckpt, _set(last, "data_offsets", [begin + 1000, end + 1000]))
    refused(ckpt, "tensors.safetensors", "out of bounds")
    edit_header(ckpt, _set(last, "data_offsets", [begin, end]))
    verify_checkpoint(ckpt)
    with open(ckpt / "tensors.safetensors", "ab") as file:
        file.write(b"\0" * 16)  # trailing bytes no tensor accounts for
    rewrite_manifest(ckpt)
    refused(ckpt, "tensors.safetensors", "data section is")


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("dtype", "F128", "unsupported dtype"),
        ("dtype", "O", "unsupported dtype"),
        ("shape", [-1, 2], "malformed shape"),
        ("shape", [True], "malformed shape"),
        ("shape", [1.0], "malformed shape"),
        ("data_offsets", [5, 1], "out of order"),
        ("data_offsets", [0], "malformed data_offsets"),
    ],
)
def test_malformed_header_entries(ckpt: Path, field: str, value, needle: str) -> None:
    edit_header(ckpt, _set("model.0.weight", field, value))
    refused(ckpt, "tensors.safetensors", "model.0.weight", needle)


def test_header_json_must_be_strict(ckpt: Path) -> None:
    path = ckpt / "tensors.safetensors"
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + length]
    extra = b'"rng.torch":{"dtype":"U8","shape":[0],"data_offsets":[0,0]},'
    dup = header.replace(b'"rng.torch":', extra + b'"rng.torch":', 1)
    for bad, needle in [(dup, "duplicate key 'rng.torch'"), (b"[]", "not a JSON object")]:
        path.write_bytes(len(bad).to_bytes(8, "little") + bad + raw[8 + length :])
        rewrite_manifest(ckpt)
        refused(ckpt, "tensors.safetensors", needle)
    path.write_bytes(raw)
    edit_header(ckpt, lambda h: h.update(__metadata__={"a": 1}))
    refused(ckpt, "__metadata__")


def test_state_references_must_match_the_tensor_file(ckpt: Path) -> None:
    path = ckpt / "state.json"
    text = path.read_text()
    path.write_text(text.replace('"model.0.weight"', '"model.9.weight"', 1))
    rewrite_manifest(ckpt)
    refused(ckpt, "state.json", "'model.9.weight', which is not in tensors.safetensors")
    path.write_text(text.replace('"__tensor__":"model.0.weight"', '"__tensor__":"model.0.bias"', 1))
    rewrite_manifest(ckpt)
    refused(ckpt, "state.json", "referenced twice")
    path.write_text(text.replace('"shape":[2,3]', '"shape":[3,3]', 1))
    rewrite_manifest(ckpt)
    refused(ckpt, "state.json", "byte size of numpy array")
    path.write_text(text.replace('{"__tuple__"', '{"__code__"', 1))
    rewrite_manifest(ckpt)
    refused(ckpt, "state.json", "unknown tag '__code__'")


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [
        ("state.json", b'{"a": NaN}', "non-standard JSON constant NaN"),
        ("meta.json", b'{"a": Infinity}', "non-standard JSON constant Infinity"),
        ("meta.json", b'{"a": -Infinity}', "non-standard JSON constant -Infinity"),
        ("meta.json", b'{"a": 1e999}', "overflows to infinity"),
        ("meta.json", b'{"a": "\xff"}', "not valid UTF-8"),
        ("meta.json", b'\xef\xbb\xbf{"a": 1}', "is not strict JSON"),
        ("meta.json", b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        ("meta.json", b"[1, 2]", "top level is not a JSON object"),
        ("state.json", b"[" * 100000, "is not strict JSON"),
    ],
)
def test_json_must_be_strict(ckpt: Path, name: str, content: bytes, needle: str) -> None:
    (ckpt / name).write_bytes(content)
    rewrite_manifest(ckpt)
    refused(ckpt, name, needle)
    if name == "meta.json":
        refused(ckpt, name, needle, loader=read_meta)


# ---------------------------------------------------------------------------------------------------
# Pickles are never opened
# ---------------------------------------------------------------------------------------------------


class Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    for target, name in [(torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(target, name, forbidden)


def test_hostile_pickle_is_never_unpickled(ckpt: Path, tmp_path: Path, no_unpickling: None) -> None:
    control = tmp_path / "CONTROL"
    real_loads = pickle._loads  # the pure-Python unpickler, untouched by the fixture
    real_loads(pickle.dumps(Evil(f"touch {control}")))
    assert control.exists()  # the payload really is live

    sentinel = tmp_path / "SENTINEL"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Evil(f"touch {sentinel}")))
    for loader in (verify_checkpoint, load_checkpoint, read_meta):
        with pytest.raises(CheckpointError, match=r"is a pickle \(\.pt\); yolo-resume never unpickles checkpoints"):
            loader(evil)
    assert not is_checkpoint_dir(evil)

    (ckpt / "evil.pt").write_bytes(evil.read_bytes())
    for loader in (verify_checkpoint, load_checkpoint, read_meta):
        refused(ckpt, "evil.pt", "pickle", loader=loader)
    rewrite_manifest(ckpt)  # even when listed with a correct hash
    refused(ckpt, "evil.pt", "pickle", loader=load_checkpoint)
    (ckpt / "evil.pt").unlink()
    (ckpt / "model.pkl").write_bytes(b"")
    refused(ckpt, "model.pkl", "never unpickles")
    assert not sentinel.exists()


def test_paths_that_are_not_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        verify_checkpoint(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="is not a folder"):
        load_checkpoint(tmp_path / "file.txt")
    (tmp_path / "empty").mkdir()
    assert not is_checkpoint_dir(tmp_path / "empty") and not is_checkpoint_dir(tmp_path / "file.txt")
    refused(tmp_path / "empty", "manifest.json", "is missing")


def test_read_meta_is_cheap_and_checks_meta(ckpt: Path) -> None:
    flip_bit(ckpt / "tensors.safetensors", 100)
    assert read_meta(ckpt)["epoch"] == 3  # does not hash the tensor file
    refused(ckpt, "tensors.safetensors", "XXH3-128")
    assert is_checkpoint_dir(ckpt)
    flip_bit(ckpt / "meta.json", 5)
    refused(ckpt, "meta.json", "XXH3-128", loader=read_meta)
