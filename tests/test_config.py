import dataclasses

import pytest
from conftest import ROOT

from yolo_resume.config import (
    Config,
    ConfigError,
    all_keys,
    apply_overrides,
    field_docs,
    from_dict,
    load_config,
)


def test_defaults_documented_for_every_key():
    docs = {key: doc for key, _, _, doc in field_docs()}
    assert set(docs) == set(all_keys())
    assert all(doc.strip() for doc in docs.values())
    assert Config().train.epochs == 100 and Config().model.cfg == "yolov5s.yaml"


def test_readme_config_reference_lists_every_key():
    readme = (ROOT / "README.md").read_text()
    missing = [key for key in all_keys() if f"`{key}`" not in readme]
    assert not missing, f"README config reference lacks {missing}"


def test_demo_config_loads_without_path():
    cfg = load_config(None)
    assert cfg.data.format == "synthetic" and cfg.model.cfg == "yolov5s.yaml"


def test_coco_config_targets_standard_layout():
    cfg = load_config(ROOT / "configs" / "coco.yaml")
    assert cfg.data.format == "coco" and cfg.data.root == "datasets/coco"
    assert cfg.data.train.endswith("instances_train2017.json")


def test_overrides_are_yaml_typed():
    cfg = apply_overrides(
        Config(),
        [
            "train.epochs=3",
            "model.imgsz=128",
            "train.amp=false",
            "train.lr0=1e-3",
            "data.names=[a, b]",
            "train.lr0=2",
        ],
    )
    assert cfg.train.epochs == 3 and cfg.model.imgsz == 128 and cfg.train.amp is False
    assert cfg.data.names == ["a", "b"]
    assert cfg.train.lr0 == 2.0 and isinstance(cfg.train.lr0, float)


def test_missing_keys_take_defaults():
    cfg = from_dict({"train": {"epochs": 5}})
    assert cfg.train.epochs == 5 and cfg.train.batch == Config().train.batch


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=3", "unknown config key `train.epoch`; did you mean `train.epochs`?"),
        ("trian.epochs=3", "did you mean `train.epochs`?"),
        ("train.epochs=abc", "`train.epochs` must be of type int"),
        ("train.epochs=2.5", "`train.epochs` must be of type int"),
        ("train.amp=1", "`train.amp` must be of type bool"),
        ("data.names=abc", "`data.names` must be a list of str"),
        ("data.format=voc", "must be one of coco, yolo, synthetic"),
        ("model.imgsz=100", "multiple of 32"),
        ("train.batch=0", "`train.batch` must be > 0"),
        ("train.device=tpu", "`train.device` must be auto, cpu, cuda or cuda:N"),
        ("train.epochs", "--set expects KEY=VALUE"),
        ("train.epochs=[1", "not valid YAML"),
    ],
)
def test_override_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as exc:
        apply_overrides(Config(), [override])
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_unknown_section_and_wrong_shapes(tmp_path):
    with pytest.raises(ConfigError, match="unknown config section `trainer` in config; did you mean `train`"):
        from_dict({"trainer": {"epochs": 1}})
    with pytest.raises(ConfigError, match="section `train` .* must be a mapping"):
        from_dict({"train": 3})
    with pytest.raises(ConfigError, match="must be a mapping of sections"):
        from_dict([1, 2])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError):
        load_config(binary)


def test_hash_changes_with_any_value():
    a, b = Config(), Config()
    assert a.hash() == b.hash()
    b.train.lr0 = 0.02
    assert a.hash() != b.hash()


def test_yaml_round_trip(tmp_path):
    cfg = apply_overrides(Config(), ["train.epochs=7", "data.names=[x]"])
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    again = load_config(path)
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)
