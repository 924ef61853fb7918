import pytest
import torch

from yolo_resume.config import TrainConfig
from yolo_resume.errors import ConfigError
from yolo_resume.model import build_model, compute_loss
from yolo_resume.optim import LRSchedule, accumulate_steps, build_optimizer


def test_yolov5s_builds_from_yaml_with_dataset_classes():
    torch.manual_seed(0)
    model = build_model("yolov5s.yaml", 3, ["a", "b", "c"], TrainConfig())
    params = sum(p.numel() for p in model.parameters())
    assert 8e6 < params < 10e6  # ultralytics YOLOv5s (anchor-free head): ~9.1M parameters
    assert model.model[-1].nc == 3 and model.names == {0: "a", 1: "b", 2: "c"}


def test_build_is_seeded():
    torch.manual_seed(1)
    a = build_model("yolov5n.yaml", 2, ["a", "b"], TrainConfig())
    torch.manual_seed(1)
    b = build_model("yolov5n.yaml", 2, ["a", "b"], TrainConfig())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_unknown_model_is_config_error():
    with pytest.raises(ConfigError, match="model config `yolov9000q.yaml` not found"):
        build_model("yolov9000q.yaml", 2, ["a", "b"], TrainConfig())


def test_loss_on_ultralytics_batch_format():
    torch.manual_seed(0)
    model = build_model("yolov5n.yaml", 2, ["a", "b"], TrainConfig())
    batch = {
        "img": torch.rand(2, 3, 64, 64),
        "batch_idx": torch.tensor([0.0, 1.0]),
        "cls": torch.tensor([[0.0], [1.0]]),
        "bboxes": torch.tensor([[0.5, 0.5, 0.3, 0.3], [0.4, 0.4, 0.2, 0.5]]),
    }
    loss, items = compute_loss(model, batch)
    assert loss.ndim == 0 and torch.isfinite(loss) and items.shape == (3,)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_optimizer_groups_exclude_norms_and_biases_from_decay():
    model = build_model("yolov5n.yaml", 2, ["a", "b"], TrainConfig())
    cfg = TrainConfig(batch=16, nbs=64)
    opt = build_optimizer(model, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["bias"]["weight_decay"] == 0 and groups["no_decay"]["weight_decay"] == 0
    assert groups["decay"]["weight_decay"] == pytest.approx(cfg.weight_decay)
    total = sum(len(g["params"]) for g in opt.param_groups)
    assert total == len(list(model.parameters()))
    assert all(p.ndim == 1 for p in groups["no_decay"]["params"])
    assert accumulate_steps(cfg) == 4


def test_lr_schedule_is_a_pure_function_of_step():
    s = LRSchedule(lr0=0.01, lrf=0.1, epochs=10, batches_per_epoch=10, warmup_epochs=2, warmup_bias_lr=0.1)
    assert s.warmup_steps == 20
    assert s.lr_at(0) == 0.0 and s.lr_at(0, "bias") == pytest.approx(0.1)
    assert s.lr_at(20) == pytest.approx(0.01 * s.factor(20))
    assert s.lr_at(100) == pytest.approx(0.001)
    assert s.momentum_at(0) == pytest.approx(0.8) and s.momentum_at(50) == pytest.approx(0.937)
    lrs = [s.lr_at(i) for i in range(20, 101)]
    assert lrs == sorted(lrs, reverse=True)  # decays monotonically after warmup
    cos = LRSchedule(lr0=0.01, lrf=0.1, epochs=10, batches_per_epoch=10, warmup_epochs=0, schedule="cosine")
    assert cos.lr_at(0) == pytest.approx(0.01) and cos.lr_at(100) == pytest.approx(0.001)
    # Re-planning: a longer run decays more slowly from the same step.
    longer = LRSchedule(lr0=0.01, lrf=0.1, epochs=20, batches_per_epoch=10, warmup_epochs=2)
    assert longer.lr_at(50) > s.lr_at(50)
