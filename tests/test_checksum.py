"""Checkpoint checksums: new checkpoints use XXH3-128 and say so; version 1 checkpoints (SHA-256) still load.

Everything here is a tiny crafted checkpoint (a few KB): no training, no model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from yolo_resume.checkpoint import format as fmt
from yolo_resume.checkpoint.format import (
    compare_digests,
    digest_algorithm,
    load_checkpoint,
    read_meta,
    tensor_digests,
    verify_checkpoint,
    write_checkpoint,
)
from yolo_resume.errors import CheckpointError

META = {"epoch": 1, "global_step": 7, "name": "ckpt-000000007"}

# SHA-256 of each file of `write_v1(parent, "v1", tiny_state(), META)` as the release before XXH3 wrote it
# (yolo_resume/checkpoint/format.py at commit d8b8497, format version 1, digests from its tensor_digests):
# the crafted checkpoint below is byte for byte a real version 1 checkpoint.
V1_FILE_SHA256 = {
    "manifest.json": "8c5749de30d47f5dee6705ce1685a169e4df0bf4c7e32c6f5a07913d54eed39d",
    "meta.json": "32f1a762d435c6e672b338edad3ccd528bf61b92af84079a1ed4ef13bbe1fe63",
    "state.json": "527b8bfab71d669f246511abdad927a7d1c62317ca77e155ec22894e14295fb0",
    "tensors.safetensors": "fccfb0de36f392892b606118eac899067dc5423c4bb9ef4fec1fe81f10ab15ef",
}
# tensor_digests({"model": {"w": arange(4).reshape(2, 2) float32, "n": tensor(3)}}): pinned across releases.
GOLDEN_XXH3 = "xxh3_128:42f22e710b609c9eeb277adbb2b707ce"
GOLDEN_SHA256 = "aaf374a2a40a292d78e3e0d03b302928ba463cb6f63371ed6c4c3c31fbe53c64"


def tiny_state() -> dict:
    return {
        "model": {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.tensor([1.5, -2.0])},
        "ema": {"weights": {"w": torch.full((2, 3), 0.25)}, "updates": 3},
        "optimizer": {"state": {0: {"step": torch.tensor(4.0)}}, "param_groups": [{"lr": 0.01, "params": [0]}]},
        "rng": {"numpy": np.arange(3, dtype=np.uint32)},
        "train_state": {"epoch": 1, "global_step": 7},
    }


def write_v1(parent: Path, name: str, state: dict, meta: dict) -> Path:
    """A checkpoint of format version 1: the data files the writer still writes (unchanged since), meta.json
    with format_version 1 and bare SHA-256 tensor digests, and the version 1 manifest (SHA-256 per file)."""
    path = write_checkpoint(parent, name, state, {})
    v1_meta = {**meta, "digests": tensor_digests(state, algorithm="sha256"), "format_version": 1}
    (path / fmt.META_FILE).write_bytes(fmt._dumps(fmt._encode_meta(v1_meta, ()), indent=2))
    files = {}
    for file in fmt.DATA_FILES:
        data = (path / file).read_bytes()
        files[file] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": fmt.FORMAT_NAME, "format_version": 1, "files": files}
    (path / fmt.MANIFEST_FILE).write_bytes(fmt._dumps(manifest, indent=2))
    return path


def sha256_of_files(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def refused(path: Path, *needles: str, loader=verify_checkpoint) -> None:
    with pytest.raises(CheckpointError) as info:
        loader(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    for needle in needles:
        assert needle in message, message


def manifest_of(path: Path) -> dict:
    return json.loads((path / fmt.MANIFEST_FILE).read_text())


def assert_same_state(a: dict, b: dict) -> None:
    assert tensor_digests(a) == tensor_digests(b)
    assert np.array_equal(a["rng"]["numpy"], b["rng"]["numpy"]) and a["rng"]["numpy"].dtype == np.uint32
    assert a["train_state"] == b["train_state"]


def test_new_checkpoints_use_and_name_xxh3(tmp_path: Path) -> None:
    state = tiny_state()
    path = write_checkpoint(tmp_path, "v2", state, {**META, "digests": tensor_digests(state)})
    manifest = manifest_of(path)
    assert manifest["format_version"] == fmt.FORMAT_VERSION == 2 and manifest["algorithm"] == "xxh3_128"
    assert set(manifest["files"]) == set(fmt.DATA_FILES)
    for file, entry in manifest["files"].items():
        data = (path / file).read_bytes()
        assert entry == {"size": len(data), "digest": xxhash.xxh3_128_hexdigest(data)}
    meta = read_meta(path)
    assert meta["format_version"] == 2
    assert {digest_algorithm(v) for v in meta["digests"].values()} == {"xxh3_128"}
    loaded, _ = load_checkpoint(path)
    assert_same_state(state, loaded)
    assert tensor_digests(loaded) == meta["digests"]


def test_version_1_checkpoint_still_loads_and_verifies(tmp_path: Path) -> None:
    state = tiny_state()
    path = write_v1(tmp_path, "v1", state, META)
    assert sha256_of_files(path) == V1_FILE_SHA256  # byte for byte what version 1 wrote
    verify_checkpoint(path)
    meta = read_meta(path)
    assert meta["format_version"] == 1 and meta["epoch"] == 1
    loaded, loaded_meta = load_checkpoint(path)
    assert_same_state(state, loaded)
    assert loaded_meta == meta
    # Its SHA-256 tensor digests are recomputed exactly from the loaded state, with the algorithm they name.
    old = meta["digests"]
    assert {digest_algorithm(v) for v in old.values()} == {"sha256"}
    assert tensor_digests(loaded, algorithm=digest_algorithm(old["model"])) == old
    # Beside the same state's XXH3 digests they are neither "equal" nor "different": not comparable.
    new = tensor_digests(loaded)
    assert compare_digests(old, new) == {"ema": None, "model": None, "optimizer": None}
    assert compare_digests(new, tensor_digests(state)) == {"ema": True, "model": True, "optimizer": True}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("file", fmt.DATA_FILES)
def test_a_flipped_byte_is_caught_under_either_algorithm(tmp_path: Path, version: int, file: str) -> None:
    state = tiny_state()
    path = write_v1(tmp_path, "c", state, META) if version == 1 else write_checkpoint(tmp_path, "c", state, META)
    label = "SHA-256" if version == 1 else "XXH3-128"
    flip_byte(path / file, (path / file).stat().st_size // 2)  # same size: only the checksum can tell
    refused(path, file, f"{label} does not match the manifest")
    refused(path, file, label, loader=load_checkpoint)
    if file == fmt.META_FILE:  # the cheap listing check hashes meta.json too
        refused(path, file, label, loader=read_meta)


def rewrite(path: Path, manifest: dict) -> None:
    (path / fmt.MANIFEST_FILE).write_text(json.dumps(manifest))


def test_the_manifest_names_a_known_algorithm_in_its_own_layout(tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path, "c", tiny_state(), META)
    manifest = manifest_of(path)
    cases = [
        (dict(manifest, algorithm="crc32"), "checksum algorithm 'crc32' is not supported"),
        (dict(manifest, algorithm=None), "checksum algorithm None is not supported"),
        ({k: v for k, v in manifest.items() if k != "algorithm"}, "manifest of version 2"),
        (dict(manifest, format_version=1), "manifest of version 1"),  # version 1 has no algorithm
        (dict(manifest, format_version=0), "format_version 0 is not supported"),
    ]
    sha_entries = {
        f: {"size": e["size"], "sha256": hashlib.sha256((path / f).read_bytes()).hexdigest()}
        for f, e in manifest["files"].items()
    }
    cases.append((dict(manifest, files=sha_entries), "exactly 'size' and 'digest'"))
    short = {**manifest["files"], fmt.STATE_FILE: {"size": 1, "digest": "ab" * 8}}  # 64-bit, not 128
    cases.append((dict(manifest, files=short), "malformed size or XXH3-128 digest"))
    v1 = {"format": fmt.FORMAT_NAME, "format_version": 1, "files": manifest["files"]}  # xxh3 entries as v1
    cases.append((v1, "exactly 'size' and 'sha256'"))
    for doc, needle in cases:
        rewrite(path, doc)
        refused(path, fmt.MANIFEST_FILE, needle)
    # A version 2 manifest may name SHA-256: what is named is what is checked.
    sha_digests = {f: {"size": e["size"], "digest": e["sha256"]} for f, e in sha_entries.items()}
    rewrite(path, dict(manifest, algorithm="sha256", files=sha_digests))
    verify_checkpoint(path)
    sha_digests[fmt.STATE_FILE]["digest"] = manifest["files"][fmt.STATE_FILE]["digest"] * 2  # xxh3, not SHA
    rewrite(path, dict(manifest, algorithm="sha256", files=sha_digests))
    refused(path, fmt.STATE_FILE, "SHA-256 does not match the manifest")


def test_tensor_digests_are_pinned_and_name_their_algorithm() -> None:
    fixed = {"model": {"w": torch.arange(4, dtype=torch.float32).reshape(2, 2), "n": torch.tensor(3)}}
    assert tensor_digests(fixed) == {"model": GOLDEN_XXH3}
    assert tensor_digests(fixed, algorithm="sha256") == {"model": GOLDEN_SHA256}
    assert digest_algorithm(GOLDEN_XXH3) == "xxh3_128" and digest_algorithm(GOLDEN_SHA256) == "sha256"
    for junk in (None, 3, "", "xxh3_128:zz", "md5:" + "0" * 32, "xxh3_128:" + "0" * 64, GOLDEN_SHA256[:-1]):
        assert digest_algorithm(junk) is None, junk


def test_compare_digests_compares_like_with_like() -> None:
    a = tensor_digests(tiny_state())
    changed = tiny_state()
    changed["ema"]["weights"]["w"][0, 0] = 9.0
    b = tensor_digests(changed)
    assert compare_digests(a, b) == {"ema": False, "model": True, "optimizer": True}
    old = tensor_digests(changed, algorithm="sha256")
    assert compare_digests(a, {**b, "model": old["model"]}) == {"ema": False, "model": None, "optimizer": True}
    assert compare_digests(a, {"model": a["model"]}) == {"ema": False, "model": True, "optimizer": False}
    assert compare_digests({"model": "garbage"}, {"model": "garbage"}) == {"model": None}
