"""Issue 12 item 1 and issue 11: a model definition never runs code, and what we do not train is refused
in one line before training starts."""

import shutil

import pytest
from conftest import cli, final_ckpt

from yolo_resume.config import TrainConfig
from yolo_resume.errors import ConfigError
from yolo_resume.interop import export_checkpoint
from yolo_resume.model import MODEL_CFG_DIR, build_model, load_model_definition

SHIPPED = MODEL_CFG_DIR / "v5" / "yolov5.yaml"


def _crafted(tmp_path, old: str, new: str):
    text = SHIPPED.read_text()
    assert old in text
    path = tmp_path / "yolov5n-crafted.yaml"
    path.write_text(text.replace(old, new, 1))
    return path


def test_activation_that_runs_code_is_refused_and_never_evaluated(tmp_path):
    marker = tmp_path / "PWNED"
    path = _crafted(tmp_path, "nc: 80", f"nc: 80\nactivation: __import__('pathlib').Path({str(marker)!r}).touch()")
    with pytest.raises(ConfigError, match="activation .* is not a torch.nn class"):
        build_model(str(path), 2, ["a", "b"], TrainConfig())
    assert not marker.exists()


def test_layer_naming_a_function_is_refused(tmp_path):
    path = _crafted(tmp_path, "[-1, 1, Conv, [64, 6, 2, 2]]", "[-1, 1, torch_safe_load, ['/etc/passwd']]")
    with pytest.raises(ConfigError, match="module 'torch_safe_load' is not a layer"):
        load_model_definition(str(path))


def test_a_literal_activation_is_allowed(tmp_path):
    path = _crafted(tmp_path, "nc: 80", "nc: 80\nactivation: nn.LeakyReLU(0.1)")
    assert load_model_definition(str(path))["activation"] == "nn.LeakyReLU(0.1)"


@pytest.mark.parametrize(
    ("name", "task"),
    [
        ("rtdetr-l.yaml", "RT-DETR"),
        ("yolov8n-seg.yaml", "segmentation"),
        ("yolov8n-pose.yaml", "pose"),
        ("yolov8n-obb.yaml", "oriented-box"),
        ("yolov8n-cls.yaml", "classification"),
    ],
)
def test_other_tasks_are_not_detection_models(name, task):
    with pytest.raises(ConfigError) as err:
        load_model_definition(name)
    message = str(err.value)
    assert "not a detection model" in message and task in message and "yolov8n.yaml" in message
    assert "not found" not in message and "\n" not in message


def test_weights_file_points_to_init_weights():
    with pytest.raises(
        ConfigError, match=r"weights file.*model\.cfg to a model YAML \(e\.g\. yolov8n\.yaml\).*--init-weights"
    ):
        load_model_definition("yolov8n.pt")


def test_resume_from_a_checkpoint_naming_a_crafted_yaml_runs_no_code(straight, tmp_path):
    """The attack of item 1: a checkpoint whose stored model.cfg names a crafted YAML at a known path."""
    import json

    from yolo_resume.checkpoint.format import read_meta, write_checkpoint

    marker = tmp_path / "PWNED"
    evil = _crafted(tmp_path, "nc: 80", f"nc: 80\nactivation: __import__('pathlib').Path({str(marker)!r}).touch()")
    source = final_ckpt(straight / "run", 4)
    meta = read_meta(source)
    meta["config"]["model"]["cfg"] = str(evil)
    from yolo_resume.checkpoint.format import load_checkpoint

    state, _ = load_checkpoint(source)
    write_checkpoint(tmp_path / "copy" / "checkpoints", "ckpt-000000004", state, json.loads(json.dumps(meta)))
    copied = tmp_path / "copy" / "checkpoints" / "ckpt-000000004"
    result = cli("train", "--resume-from", str(copied), "--run-dir", "b", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "activation" in result.stderr and "refusing to build it" in result.stderr
    assert "\n" not in result.stderr.strip()
    with pytest.raises(ConfigError, match="refusing to build it"):  # `ckpt export` builds the same way
        export_checkpoint(copied, "ultralytics", tmp_path / "x.pt")
    assert not marker.exists()
    shutil.rmtree(tmp_path / "copy")
