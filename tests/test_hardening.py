"""Issue 12: nothing trusted from a checkpoint, run-folder files crash-safe. Crafted files, in process
where the claim is about a library function; the plan of a `train` command is built without training."""

import json
import shutil
from pathlib import Path

import pytest
from conftest import final_ckpt

from yolo_resume.checkpoint.format import load_checkpoint, read_meta, write_checkpoint
from yolo_resume.distributed import Distributed
from yolo_resume.errors import UserError
from yolo_resume.session import Session, TrainRequest


def plan_of(**request):
    """What `train` would do (run folder, config, checkpoint), decided as rank 0 does, lease released."""
    session = Session(TrainRequest(**request), Distributed(), lambda *a, **k: None, lambda *a: None)
    try:
        return session.plan()
    finally:
        session.release()


def craft(straight: Path, dest: Path, step: int = 4, **meta_changes) -> Path:
    """A copy of a reference checkpoint at `dest/ckpt-N` whose meta.json says what `meta_changes` say."""
    source = final_ckpt(straight / "run", step)
    state, _ = load_checkpoint(source)
    meta = json.loads(json.dumps(read_meta(source)))
    for key, value in meta_changes.items():
        target, *path = key.split("__")
        node = meta
        for part in [target, *path][:-1]:
            node = node[part]
        node[[target, *path][-1]] = value
    write_checkpoint(dest, source.name, state, meta)
    return dest / source.name


# -- item 2: where a resumed run writes -------------------------------------------------------------
@pytest.fixture
def victim(straight, tmp_path):
    """Another run on this machine, which a crafted checkpoint names as its run folder and ckpt.dir."""
    run = tmp_path / "victim"
    shutil.copytree(final_ckpt(straight / "run", 8), final_ckpt(run, 8))
    return run


def test_a_checkpoint_copied_elsewhere_never_names_where_the_run_writes(straight, tmp_path, victim):
    hostile = {"run_dir": str(victim), "config__ckpt__dir": str(victim / "checkpoints"), "config__ckpt__keep_last": 1}
    loose = craft(straight, tmp_path / "downloads", **hostile)
    with pytest.raises(UserError, match="pass --run-dir: .* is not inside a run folder"):
        plan_of(resume=True, resume_from=str(loose))
    into = plan_of(resume=True, resume_from=str(loose), run_dir=tmp_path / "b")
    assert into.run_dir == tmp_path / "b" and into.config["ckpt"]["dir"] == ""  # b's own checkpoints folder
    in_place = craft(straight, tmp_path / "c" / "checkpoints", **hostile)
    plan = plan_of(resume=True, resume_from=str(in_place))
    assert plan.run_dir == tmp_path / "c" and plan.config["ckpt"]["dir"] == ""
    assert sorted(p.name for p in (victim / "checkpoints").iterdir()) == ["ckpt-000000008"]


# -- item 3: a crafted checkpoint costs its own use, never the run ----------------------------------
def remanifest(ckpt: Path, digests: dict | None = None) -> None:
    """Rewrite a checkpoint's manifest over its current files, as a forger would."""
    import hashlib

    files = {}
    for name in ("tensors.safetensors", "state.json", "meta.json"):
        path = ckpt / name
        digest = (digests or {}).get(name) or hashlib.sha256(path.read_bytes()).hexdigest()
        files[name] = {"size": path.stat().st_size, "sha256": digest}
    doc = {"format": "yolo-resume-checkpoint", "format_version": 1, "files": files}
    (ckpt / "manifest.json").write_text(json.dumps(doc))


def test_deeply_nested_meta_is_skipped_with_its_reason(straight, tmp_path):
    from yolo_resume.checkpoint.manager import CheckpointManager
    from yolo_resume.checkpoint.ref import resolve

    run = tmp_path / "run"
    shutil.copytree(final_ckpt(straight / "run", 4), final_ckpt(run, 4))
    bad = final_ckpt(run, 5)
    shutil.copytree(final_ckpt(straight / "run", 5), bad)
    (bad / "meta.json").write_text('{"global_step": 5, "x": ' + "[" * 900 + "]" * 900 + "}")
    remanifest(bad)
    infos = resolve(str(run)).infos(deep=True)  # ckpt list / ckpt verify
    assert [i.valid for i in infos] == [True, False] and "nested deeper than 64 levels" in infos[1].error
    skipped = []
    newest = CheckpointManager(run / "checkpoints").latest_valid(on_invalid=skipped.append)  # --resume
    assert newest.name == "ckpt-000000004" and [s.name for s in skipped] == ["ckpt-000000005"]


def test_sparse_tensor_file_is_refused_before_it_is_hashed(straight, tmp_path):
    import struct
    import time

    from yolo_resume.checkpoint.format import verify_checkpoint
    from yolo_resume.errors import CheckpointError

    ckpt = tmp_path / "checkpoints" / "ckpt-000000004"
    shutil.copytree(final_ckpt(straight / "run", 4), ckpt)
    size = 1 << 40  # 1 TiB of holes, described by a header that covers it exactly
    header = json.dumps({"t": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    with open(ckpt / "tensors.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)
    (ckpt / "state.json").write_text('{"t": {"__tensor__": "t"}}')
    remanifest(ckpt, {"tensors.safetensors": "0" * 64})
    started = time.monotonic()
    with pytest.raises(CheckpointError, match="is a sparse file"):
        verify_checkpoint(ckpt)
    assert time.monotonic() - started < 5
