"""End-to-end: the CLI trains a tiny detector on CPU, checkpoints it, lists and resumes it."""

import csv
import json
import shutil

import pytest
from conftest import cli, tiny_overrides


def sets(data_root, **extra):
    return [arg for item in tiny_overrides(data_root, **extra) for arg in ("--set", item)]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny 2-epoch run shared by the read-only tests below."""
    work = tmp_path_factory.mktemp("train")
    result = cli("train", "--run-dir", "run", "--device", "cpu", *sets(work / "data"), cwd=work)
    assert result.returncode == 0, result.stdout + result.stderr
    return work, result


def test_tiny_training_end_to_end(trained):
    work, result = trained
    rows = read_csv(work / "run" / "results.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for row in rows:
        assert 0.0 <= float(row["map50"]) <= 1.0 and float(row["box_loss"]) > 0
    steps = read_csv(work / "run" / "steps.csv")
    assert [int(r["global_step"]) for r in steps] == list(range(1, 7))  # 12 images / batch 4 = 3 per epoch
    assert "epoch 2" in result.stdout and "training summary" in result.stdout


def test_ckpt_list_json(trained):
    work, _ = trained
    result = cli("ckpt", "list", "run", "--json", cwd=work)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [r["name"] for r in rows] == ["ckpt-000000003", "ckpt-000000006"]
    for key in ("name", "path", "epoch", "global_step", "size_bytes", "metrics", "git_commit", "created"):
        assert all(key in r for r in rows), key
    assert rows[-1]["epoch"] == 2 and rows[-1]["global_step"] == 6 and rows[-1]["valid"]
    assert rows[-1]["size_bytes"] > 1_000_000 and "map50" in rows[-1]["metrics"]


def test_ckpt_list_table_and_show(trained):
    work, _ = trained
    table = cli("ckpt", "list", "run", cwd=work)
    assert table.returncode == 0 and "ckpt-000000006" in table.stdout and "valid" in table.stdout
    show = cli("ckpt", "show", "run/checkpoints/ckpt-000000006", "--json", cwd=work)
    meta = json.loads(show.stdout)
    assert meta["config"]["model"]["cfg"] == "yolov5n.yaml" and meta["finished"] is True
    assert set(meta["digests"]) == {"model", "ema", "optimizer"}
    for key in ("git", "versions", "config_hash", "dataset_fingerprint", "host", "created", "lr"):
        assert key in meta, key
    assert meta["versions"]["torch"] and meta["versions"]["ultralytics"]


def test_resume_finished_run_says_complete(trained):
    work, _ = trained
    result = cli("train", "--resume", "--run-dir", "run", cwd=work)
    assert result.returncode == 0 and "is complete" in result.stdout


def test_resume_without_checkpoint_exits_2(workdir):
    (workdir / "empty").mkdir()
    result = cli("train", "--resume", "--run-dir", "empty", cwd=workdir)
    assert result.returncode == 2
    assert "nothing to resume" in result.stderr and "Traceback" not in result.stderr


def test_fresh_run_refuses_to_reuse_a_run_dir_with_checkpoints(trained):
    work, _ = trained
    before = sorted(p.name for p in (work / "run" / "checkpoints").iterdir())
    result = cli("train", "--run-dir", "run", *sets(work / "data"), cwd=work)
    assert result.returncode == 2 and "already holds checkpoints" in result.stderr
    assert sorted(p.name for p in (work / "run" / "checkpoints").iterdir()) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "train.epoch=3"], "did you mean `train.epochs`?"),
        (["--set", "model.imgsz=abc"], "must be of type int"),
        (["--config", "missing.yaml"], "config file `missing.yaml` not found"),
        (["--set", "data.format=coco", "--set", "data.root=nowhere"], "nowhere"),
        (["--device", "cuda:0"], "CUDA is not available"),
    ],
)
def test_user_errors_are_one_line_exit_2(workdir, args, message):
    result = cli("train", "--run-dir", "x", *args, cwd=workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_default_run_dir_is_numbered_after_a_finished_run(trained):
    from yolo_resume.run_dir import new_run_dir

    work, _ = trained
    (work / "runs").mkdir(exist_ok=True)
    import shutil

    shutil.copytree(work / "run", work / "runs" / "demo", dirs_exist_ok=True)
    chosen, unfinished = new_run_dir("demo", root=work / "runs")
    assert chosen == work / "runs" / "demo2" and unfinished is None


def test_python_dash_m_and_version(workdir):
    result = cli("--version", cwd=workdir)
    assert result.returncode == 0 and result.stdout.strip()


def test_resume_picks_the_most_recently_updated_run_and_continues_at_the_next_epoch(trained, workdir):
    shutil.copytree(trained[0] / "run", workdir / "runs" / "a")  # an older run (copy2 keeps its mtimes)
    first = cli("train", "--run-dir", "runs/b", "--epochs", "1", "-q", *sets(workdir / "data"), cwd=workdir)
    assert first.returncode == 0, first.stderr
    resumed = cli("train", "--resume", "--epochs", "2", cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming run runs/b from ckpt-000000003" in resumed.stdout
    assert "re-planning the LR schedule for 2 epochs" in resumed.stdout
    rows = read_csv(workdir / "runs" / "b" / "results.csv")
    assert [(r["epoch"], r["segment"]) for r in rows] == [("1", "0"), ("2", "1")]
    assert len(read_csv(workdir / "runs" / "a" / "results.csv")) == 2  # untouched


def test_data_synth_command(workdir):
    args = ["data", "synth", "shapes", "--num-train", "6", "--num-val", "2", "--image-size", "64"]
    result = cli(*args, cwd=workdir)
    assert result.returncode == 0, result.stderr
    ann = json.loads((workdir / "shapes" / "annotations" / "instances_train.json").read_text())
    assert len(ann["images"]) == 6 and {c["name"] for c in ann["categories"]} == {"circle", "square", "triangle"}
    assert len(list((workdir / "shapes" / "images" / "val").iterdir())) == 2
