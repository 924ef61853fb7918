import numpy as np
import pytest
import torch

from yolo_resume.config import TrainConfig, from_dict, from_stored
from yolo_resume.errors import ConfigError
from yolo_resume.model import build_model, compute_loss
from yolo_resume.optim import LRSchedule, accumulate_steps, build_optimizer, resolve_optimizer


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
    cfg = TrainConfig(batch=16, nbs=64, optimizer="SGD")
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
    assert s.lr_at(99) == pytest.approx(0.01 * (0.1 + 0.9 * 0.1))  # the last epoch: lf(9)
    assert s.momentum_at(0) == pytest.approx(0.8) and s.momentum_at(50) == pytest.approx(0.937)
    lrs = [s.lr_at(i) for i in range(20, 101)]
    assert lrs == sorted(lrs, reverse=True)  # decays monotonically after warmup
    cos = LRSchedule(lr0=0.01, lrf=0.1, epochs=10, batches_per_epoch=10, warmup_epochs=0, schedule="cosine")
    assert cos.lr_at(0) == pytest.approx(0.01) and cos.lr_at(100) == pytest.approx(0.001)
    smooth = LRSchedule(lr0=0.01, lrf=0.1, epochs=10, batches_per_epoch=10, warmup_epochs=0, per_epoch=False)
    assert smooth.lr_at(100) == pytest.approx(0.001) and smooth.lr_at(5) < smooth.lr_at(4)
    # Re-planning: a longer run decays more slowly from the same step.
    longer = LRSchedule(lr0=0.01, lrf=0.1, epochs=20, batches_per_epoch=10, warmup_epochs=2)
    assert longer.lr_at(50) > s.lr_at(50)


def _ultralytics_lr(ni: int, nb: int, nw: int, lf, lr0: float, start: float) -> float:
    """What ultralytics' BaseTrainer sets for batch `ni` (LambdaLR stepped once per epoch, warmup by np.interp up
    to and including ni == nw towards that epoch's lr0 * lf(epoch)), written out from engine/trainer.py."""
    target = lr0 * lf(ni // nb)
    return float(np.interp(ni, [0, nw], [start, target])) if nw and ni <= nw else target


@pytest.mark.parametrize("optimizer", ["SGD", "AdamW"])
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("warmup_epochs", [1.0, 2.5])
def test_schedule_matches_ultralytics_trainer(optimizer, schedule, warmup_epochs):
    from ultralytics.utils.torch_utils import one_cycle

    epochs, nb, lr0, lrf = 12, 19, 0.002, 0.05
    cfg = TrainConfig(
        optimizer=optimizer,
        lr0=lr0,
        lrf=lrf,
        epochs=epochs,
        warmup_epochs=warmup_epochs,
        momentum=0.9,
        schedule=schedule,
    )
    lf = one_cycle(1, lrf, epochs) if schedule == "cosine" else (lambda x: max(1 - x / epochs, 0) * (1.0 - lrf) + lrf)
    s = LRSchedule.from_config(cfg, nb)
    nw = round(warmup_epochs * nb)
    for ni in range(epochs * nb):
        for group, start in (("decay", 0.0), ("no_decay", 0.0), ("bias", 0.1)):
            assert s.lr_at(ni, group) == pytest.approx(_ultralytics_lr(ni, nb, nw, lf, lr0, start), abs=1e-12)
    # ultralytics ramps SGD's momentum in warmup but leaves Adam's beta1 alone (its groups have no "momentum")
    assert s.momentum_at(0) == pytest.approx(0.8 if optimizer == "SGD" else 0.9)


def test_adam_beta1_warmup_is_opt_in():
    model = build_model("yolov5n.yaml", 2, ["a", "b"], TrainConfig())
    cfg = TrainConfig(optimizer="AdamW", momentum=0.9, warmup_momentum=0.8, warmup_beta1=True)
    opt = build_optimizer(model, cfg)
    LRSchedule.from_config(cfg, 10).apply(opt, 0)
    assert all(g["betas"][0] == pytest.approx(0.8) for g in opt.param_groups)
    plain = TrainConfig(optimizer="AdamW", momentum=0.9, warmup_momentum=0.8)
    LRSchedule.from_config(plain, 10).apply(opt, 0)
    assert all(g["betas"][0] == pytest.approx(0.9) for g in opt.param_groups)
    assert {g["name"]: g["lr"] for g in opt.param_groups}["bias"] == pytest.approx(0.1)


def test_config_stored_by_an_older_version_keeps_its_schedule():
    """A checkpoint written before `lr_decay_every` existed resumes with the recipe it was trained with."""
    stored = from_dict({"train": {"optimizer": "AdamW", "lr0": 0.002}}).to_dict()
    for key in ("lr_decay_every", "warmup_beta1", "accumulate_ramp", "ema_tau"):
        del stored["train"][key]
    old = from_stored(stored, "test").train
    assert (old.lr_decay_every, old.warmup_beta1, old.warmup_bias_lr) == ("batch", True, 0.0)
    assert (old.accumulate_ramp, old.ema_tau) == (False, 2000.0)  # ModelEMA's default tau, as before
    s = LRSchedule.from_config(old, 10)
    assert s.lr_at(0, "bias") == 0.0 and s.momentum_at(0) == pytest.approx(old.warmup_momentum)
    # Bit for bit the formula of 0.1.0 (optim.LRSchedule.factor): progress = step / (epochs * batches).
    total = old.epochs * 10
    for step in range(total + 1):
        assert s.factor(step) == (1 - min(step / total, 1.0)) * (1 - old.lrf) + old.lrf
    sgd = dict(stored, train=dict(stored["train"], optimizer="SGD"))
    assert from_stored(sgd, "test").train.warmup_bias_lr == pytest.approx(0.1)  # SGD always warmed biases
    current = from_dict({"train": {"optimizer": "AdamW"}}).to_dict()
    assert from_stored(current, "test").train == from_dict(current).train  # a complete config is read as is


def test_optimizer_auto_chooses_as_ultralytics():
    short = resolve_optimizer(TrainConfig(optimizer="auto", epochs=12, batch=16, nbs=16), 6, 300)
    assert (short.optimizer, short.lr0, short.momentum, short.warmup_bias_lr) == ("AdamW", 0.001, 0.9, 0.0)
    long = resolve_optimizer(TrainConfig(optimizer="auto", epochs=300, nbs=64, momentum=0.937), 80, 118287)
    # SGD keeps the configured momentum: ultralytics' warmup ramps momentum to args.momentum
    assert (long.optimizer, long.lr0, long.momentum, long.warmup_bias_lr) == ("SGD", 0.01, 0.937, 0.0)
    explicit = TrainConfig(optimizer="SGD")
    assert resolve_optimizer(explicit, 3, 100) is explicit


def test_resuming_an_old_run_with_its_config_file_keeps_its_recipe(tmp_path):
    from yolo_resume.config import load_config
    from yolo_resume.session import _keep_stored_recipe

    stored = from_dict({"train": {"optimizer": "AdamW"}}).to_dict()
    for key in ("lr_decay_every", "warmup_beta1", "accumulate_ramp", "ema_tau"):
        del stored["train"][key]
    config = tmp_path / "old.yaml"
    config.write_text("train:\n  optimizer: AdamW\n  lr_decay_every: epoch\n")
    cfg = load_config(config)
    _keep_stored_recipe(cfg, config, stored)
    assert cfg.train.lr_decay_every == "epoch"  # named in the file: the user's choice wins
    assert (cfg.train.warmup_beta1, cfg.train.accumulate_ramp, cfg.train.warmup_bias_lr) == (True, False, 0.0)
    current = from_dict({"train": {"optimizer": "AdamW"}}).to_dict()
    fresh = load_config(config)
    _keep_stored_recipe(fresh, config, current)  # a run of this version: nothing to keep
    assert fresh == load_config(config)


def test_a_run_saved_before_windowed_partners_resumes_with_partners_from_the_whole_split(tmp_path):
    from yolo_resume.config import load_config
    from yolo_resume.session import _keep_stored_recipe

    stored = from_dict({}).to_dict()
    assert stored["augment"]["mosaic_window"] == 128  # today's default
    del stored["augment"]["mosaic_window"]
    assert from_stored(stored, "test").augment.mosaic_window == 0
    config = tmp_path / "old.yaml"
    config.write_text("augment:\n  fliplr: 0.5\n")
    cfg = load_config(config)
    _keep_stored_recipe(cfg, config, stored)
    assert cfg.augment.mosaic_window == 0  # not named in the file: the run's own rule
    config.write_text("augment:\n  mosaic_window: 64\n")
    named = load_config(config)
    _keep_stored_recipe(named, config, stored)
    assert named.augment.mosaic_window == 64  # named in the file: the user's choice wins
