"""Export to the ultralytics ecosystem and initialisation from existing weights (yolo_resume.interop)."""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from conftest import cli

from yolo_resume.checkpoint.format import load_checkpoint
from yolo_resume.config import from_dict
from yolo_resume.errors import CheckpointError, UserError
from yolo_resume.interop import export_checkpoint, load_init_weights
from yolo_resume.model import build_model

ULTRA_ASSETS = Path(importlib.util.find_spec("ultralytics").origin).parent / "assets"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real 1-epoch yolov5n run at imgsz 64; returns (work folder, newest checkpoint)."""
    work = tmp_path_factory.mktemp("interop")
    sets = {
        "data.root": work / "data",
        "data.num_train": 8,
        "data.num_val": 4,
        "data.image_size": 64,
        "model.cfg": "yolov5n.yaml",
        "model.imgsz": 64,
        "train.epochs": 1,
        "train.batch": 4,
        "train.workers": 0,
    }
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    result = cli("train", "--run-dir", "run", "-q", *args, cwd=work, env={"YOLO_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    ckpt = sorted((work / "run" / "checkpoints").glob("ckpt-*"))[-1]
    return work, ckpt


@pytest.fixture(scope="module")
def ckpt_state(trained):
    return load_checkpoint(trained[1])


@pytest.fixture(scope="module")
def exported_pt(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("pt") / "model.pt"
    assert export_checkpoint(trained[1], "ultralytics", out) == out
    return out


def fresh_model(meta, num_classes=None):
    names = meta["names"] if num_classes is None else [f"c{i}" for i in range(num_classes)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        return build_model(meta["config"]["model"]["cfg"], len(names), names, from_dict(meta["config"]).train)


def coco_val_to_yolo(data_root: Path, dest: Path) -> Path:
    """The demo val split in YOLO layout (images/val + labels/val) with a dataset YAML."""
    coco = json.loads((data_root / "annotations" / "instances_val.json").read_text())
    cat_ids = [c["id"] for c in coco["categories"]]
    (dest / "images" / "val").mkdir(parents=True)
    (dest / "labels" / "val").mkdir(parents=True)
    for img in coco["images"]:
        shutil.copy(data_root / "images" / "val" / img["file_name"], dest / "images" / "val" / img["file_name"])
        w, h = img["width"], img["height"]
        lines = []
        for a in coco["annotations"]:
            if a["image_id"] == img["id"]:
                x, y, bw, bh = a["bbox"]
                cls = cat_ids.index(a["category_id"])
                lines.append(f"{cls} {(x + bw / 2) / w:.6f} {(y + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}")
        (dest / "labels" / "val" / f"{Path(img['file_name']).stem}.txt").write_text("\n".join(lines) + "\n")
    names = {i: c["name"] for i, c in enumerate(coco["categories"])}
    spec = {"path": str(dest), "train": "images/val", "val": "images/val", "names": names}
    (dest / "data.yaml").write_text(yaml.safe_dump(spec))
    return dest / "data.yaml"


# -- export ------------------------------------------------------------------------------------------


def test_ultralytics_export_predicts_and_validates(trained, ckpt_state, exported_pt, tmp_path):
    from ultralytics import YOLO

    _, meta = ckpt_state
    names = dict(enumerate(meta["names"]))
    model = YOLO(str(exported_pt))
    assert model.task == "detect"
    assert model.names == names
    results = model.predict(
        [str(ULTRA_ASSETS / "bus.jpg"), str(ULTRA_ASSETS / "zidane.jpg")], imgsz=64, save=False, verbose=False
    )
    assert len(results) == 2
    assert all(r.names == names for r in results)

    data_yaml = coco_val_to_yolo(trained[0] / "data", tmp_path / "yolo")
    metrics = YOLO(str(exported_pt)).val(
        data=str(data_yaml),
        imgsz=64,
        batch=4,
        plots=False,
        save_json=False,
        device="cpu",
        verbose=False,
        project=str(tmp_path / "val"),
    )
    assert 0.0 <= metrics.box.map50 <= 1.0
    assert metrics.names == names


def test_ultralytics_export_holds_the_ema_weights(ckpt_state, exported_pt):
    from ultralytics.nn.tasks import torch_safe_load

    state, meta = ckpt_state
    pt = torch.load(exported_pt, map_location="cpu", weights_only=False)
    assert pt["epoch"] == -1 and pt["ema"] is None and pt["optimizer"] is None
    assert pt["train_args"]["task"] == "detect" and pt["train_args"]["imgsz"] == 64
    assert pt["model"].names == dict(enumerate(meta["names"]))
    exported = pt["model"].state_dict()
    ema = state["ema"]["weights"]
    assert exported.keys() == ema.keys()
    for k, v in ema.items():
        expect = v.half() if v.is_floating_point() else v
        assert exported[k].dtype == expect.dtype, k
        assert torch.equal(exported[k], expect), k
    # Also loadable by ultralytics' restricted (weights_only) loader: only allow-listed types inside.
    ckpt, _ = torch_safe_load(str(exported_pt), safe_only=True)
    assert type(ckpt["model"]).__name__ == "DetectionModel"


def test_safetensors_export_round_trip(trained, ckpt_state, tmp_path):
    state, meta = ckpt_state
    out = export_checkpoint(trained[1], "safetensors", tmp_path)  # a folder: named after the checkpoint
    assert out == tmp_path / f"{trained[1].name}.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary file left behind
    tensors = safetensors.torch.load_file(out)
    ema = state["ema"]["weights"]
    assert tensors.keys() == ema.keys()
    assert all(torch.equal(tensors[k], v) and tensors[k].dtype == v.dtype for k, v in ema.items())
    with safetensors.safe_open(out, "pt") as f:
        header = f.metadata()
    assert json.loads(header["names"]) == meta["names"]
    assert header["model_cfg"] == "yolov5n.yaml" and header["imgsz"] == "64" and header["weights"] == "ema"

    raw = export_checkpoint(trained[1], "safetensors", tmp_path / "raw.safetensors", weights="model")
    tensors = safetensors.torch.load_file(raw)
    assert all(torch.equal(tensors[k], v) for k, v in state["model"].items())

    model = fresh_model(meta)
    transferred, total = load_init_weights(model, out, trust_pickle=False)
    assert transferred == total == len(ema)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())


@pytest.mark.skipif(importlib.util.find_spec("onnx") is not None, reason="onnx is installed")
def test_onnx_export_without_onnx_names_the_extra(trained, tmp_path):
    with pytest.raises(UserError, match=r"pip install 'yolo-resume\[onnx\]'") as err:
        export_checkpoint(trained[1], "onnx", tmp_path / "model.onnx")
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())


def test_export_refuses_bad_arguments(trained, tmp_path):
    with pytest.raises(UserError, match="ultralytics, safetensors, onnx"):
        export_checkpoint(trained[1], "tflite", tmp_path / "m.tflite")
    with pytest.raises(UserError, match=r"\.pt"):
        export_checkpoint(trained[1], "ultralytics", tmp_path / "m.safetensors")
    with pytest.raises(UserError, match="weights"):
        export_checkpoint(trained[1], "safetensors", tmp_path / "m.safetensors", weights="best")
    with pytest.raises(CheckpointError, match="run folder"):
        export_checkpoint(trained[0] / "run", "safetensors", tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError):
        export_checkpoint(tmp_path / "missing", "safetensors", tmp_path / "m.safetensors")


# -- init weights ----------------------------------------------------------------------------------------


def test_init_from_checkpoint_folder(trained, ckpt_state):
    state, meta = ckpt_state
    model = fresh_model(meta)
    transferred, total = load_init_weights(model, trained[1], trust_pickle=False)
    assert transferred == total == len(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["ema"]["weights"].items())


def test_pickle_refused_without_trust(ckpt_state, exported_pt, tmp_path):
    _, meta = ckpt_state
    with pytest.raises(UserError, match="--trust-pickle") as err:
        load_init_weights(fresh_model(meta), exported_pt, trust_pickle=False)
    assert "\n" not in str(err.value)


class _Hostile:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_hostile_pickle_never_runs_without_trust(ckpt_state, tmp_path, suffix):
    _, meta = ckpt_state
    sentinel = tmp_path / "SENTINEL"
    evil = tmp_path / f"evil{suffix}"
    torch.save({"model": _Hostile(sentinel)}, evil)  # what torch.load(weights_only=False) would execute
    with pytest.raises(UserError, match="--trust-pickle"):
        load_init_weights(fresh_model(meta), evil, trust_pickle=False)
    assert not sentinel.exists()
    # The payload is live: trusting the file runs it (what the refusal protects against).
    with pytest.raises(UserError, match="holds no model weights"):
        load_init_weights(fresh_model(meta), evil, trust_pickle=True)
    assert sentinel.exists()


def test_trusted_pt_loads(ckpt_state, exported_pt):
    state, meta = ckpt_state
    model = fresh_model(meta)
    transferred, total = load_init_weights(model, exported_pt, trust_pickle=True)
    assert transferred == total
    for k, v in state["ema"]["weights"].items():
        expect = v.half().float() if v.is_floating_point() else v  # the .pt is FP16, like ultralytics' own
        assert torch.equal(model.state_dict()[k], expect), k


def test_trusted_plain_state_dict_loads(ckpt_state, tmp_path):
    state, meta = ckpt_state
    path = tmp_path / "sd.pth"
    torch.save(state["model"], path)
    model = fresh_model(meta)
    assert load_init_weights(model, path, trust_pickle=True) == (len(state["model"]),) * 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state["model"].items())


def test_other_class_count_transfers_all_but_the_class_outputs(trained, ckpt_state):
    state, meta = ckpt_state
    model = fresh_model(meta, num_classes=len(meta["names"]) + 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    transferred, total = load_init_weights(model, trained[1], trust_pickle=False)
    assert 0 < transferred < total
    ema = state["ema"]["weights"]
    after = model.state_dict()
    for k, v in after.items():
        if ema[k].shape == v.shape:
            assert torch.equal(v, ema[k]), k
        else:
            assert torch.equal(v, before[k]), k  # the mismatched head tensors keep their fresh init
    assert total - transferred == sum(ema[k].shape != v.shape for k, v in after.items())


def test_init_weights_user_errors(ckpt_state, tmp_path):
    _, meta = ckpt_state
    model = fresh_model(meta)
    with pytest.raises(UserError, match="not found"):
        load_init_weights(model, tmp_path / "nope.pt", trust_pickle=True)
    unrelated = tmp_path / "unrelated.safetensors"
    safetensors.torch.save_file({"foo.weight": torch.zeros(3)}, unrelated)
    with pytest.raises(UserError, match="no tensor of .*unrelated.safetensors.* matches model"):
        load_init_weights(model, unrelated, trust_pickle=False)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(UserError, match="safetensors"):
        load_init_weights(model, garbage, trust_pickle=False)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"x")
    with pytest.raises(UserError, match="unsupported weights file"):
        load_init_weights(model, other, trust_pickle=True)
