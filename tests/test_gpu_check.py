"""scripts/gpu_check.py: its pure helpers (fast) and its whole --cpu-smoke run (slow), so the prepared GPU
check cannot rot while no GPU machine is at hand."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def test_crop_label_line_maps_boxes_into_the_centre_crop():
    # 640x640 -> 640x480 drops 80 rows at the top: a box at y 160..320 lands at 80..240 of 480.
    line = gpu_check.crop_label_line("2 0.5 0.375 0.1 0.25", 640, 480)
    c, cx, cy, w, h = line.split()
    assert (c, cx, w) == ("2", "0.5", "0.1")
    assert float(cy) == pytest.approx(160 / 480) and float(h) == pytest.approx(160 / 480)
    # Half of a box at y 40..120 is cut away (rows 0..80): it keeps 40 of 80 rows, under 60%: dropped.
    assert gpu_check.crop_label_line("0 0.5 0.125 0.1 0.125", 640, 480) is None
    # A box at y 60..140 keeps 60 of its 80 rows and is clipped to the crop's top edge.
    kept = gpu_check.crop_label_line("0 0.5 0.15625 0.1 0.125", 640, 480).split()
    assert float(kept[2]) == pytest.approx(30 / 480) and float(kept[4]) == pytest.approx(60 / 480)


def test_wheels_to_install_skips_what_is_there_and_never_replaces_torch():
    wheels = [
        Path("ultralytics-8.4.190-py3-none-any.whl"),
        Path("polars_runtime_32-2.1.0-cp311-abi3-manylinux_2_17_x86_64.whl"),
        Path("pycocotools-2.0.11-cp312-abi3-manylinux2014_x86_64.whl"),
        Path("torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl"),
        Path("nvidia_cudnn_cu13-9.1.0-py3-none-manylinux_2_27_x86_64.whl"),
    ]
    installed = {"ultralytics": "8.3.0", "polars-runtime-32": "2.1.0", "pycocotools": None, "torch": "2.11.0"}
    todo, refused = gpu_check.wheels_to_install(wheels, installed)
    assert [w.name.split("-")[0] for w in todo] == ["ultralytics", "pycocotools"]  # other version; missing
    assert len(refused) == 2 and all(r.startswith(("torch-", "nvidia_")) for r in refused)


def test_compare_steps_reports_where_and_by_how_much_runs_differ():
    a = [["1", "0", "1", "0.01", "1.5", "2.0", "1.1"], ["2", "0", "2", "0.01", "1.4", "1.9", "1.0"]]
    assert gpu_check.compare_steps(a, [list(r) for r in a])["equal"]
    b = [a[0], ["2", "0", "2", "0.01", "1.4", "1.75", "1.0"]]
    out = gpu_check.compare_steps(a, b)
    assert not out["equal"] and out["rows_differing"] == 1 and out["first_differing_step"] == 2
    assert out["max_abs_diff"]["cls_loss"] == pytest.approx(0.15) and out["max_abs_diff"]["box_loss"] == 0


def test_gpu_samples_are_averaged_over_the_timed_epochs_only():
    samples = [(0.5, 10.0, 1), (1.0, 90.0, 2), (1.5, 70.0, 3), (2.5, 0.0, 4)]
    assert gpu_check.GpuSampler.window(samples, 1.0, 2.0) == {"util_mean_pct": 80.0, "samples": 2}
    assert gpu_check.GpuSampler.window(samples, 3.0, 4.0)["util_mean_pct"] is None


def test_loader_workers_share_the_spare_cores_and_fit_dev_shm(monkeypatch):
    monkeypatch.setattr(gpu_check, "spare_cores", lambda: 15)
    monkeypatch.setattr(gpu_check, "shm_free", lambda: None)
    assert gpu_check.loader_workers(64, 640) == 15 and gpu_check.loader_workers(16, 640, processes=4) == 3
    batch_bytes = 64 * 3 * 640**2
    monkeypatch.setattr(gpu_check, "shm_free", lambda: 10 * 2 * batch_bytes * 1.25)
    assert gpu_check.loader_workers(64, 640) == 10


def test_only_adds_the_stages_a_rerun_needs():
    assert gpu_check.selected_stages(None) == {name for name, _ in gpu_check.STAGES}
    assert gpu_check.selected_stages("environment") == {"environment"}
    assert gpu_check.selected_stages("memory") == {"install", "data", "throughput", "memory"}
    with pytest.raises(ValueError, match="unknown stage"):
        gpu_check.selected_stages("resume,speed")


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_and_resume_is_exact(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-smoke", "--out", str(out)]
    cmd += ["--work", str(tmp_path / "work"), "--wheels", str(tmp_path / "no-wheels")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert [s["name"] for s in report["stages"]] == [name for name, _ in gpu_check.STAGES]
    assert {n: s["status"] for n, s in stages.items()} == dict.fromkeys(stages, "ok"), result.stderr[-4000:]
    assert result.returncode == 0

    det, nondet = stages["resume"]["result"]["deterministic"], stages["resume"]["result"]["nondeterministic"]
    assert det["equal"] == {"model": True, "ema": True, "optimizer": True}
    assert det["digests_straight"] == det["digests_resumed"] and len(det["digests_straight"]) == 3
    assert det["steps_csv"]["equal"] and det["steps_csv"]["rows"] == [det["total_steps"]] * 2
    assert len(det["kills"]) == 2 and all(k["last_logged_step"] < det["total_steps"] for k in det["kills"])
    assert all(e.startswith("killed") for e in det["lineage"])
    assert nondet["deterministic"] is False and set(nondet["equal"]) == {"model", "ema", "optimizer"}
    assert len(nondet["kills"]) == gpu_check.SMOKE["resume"]["kills"]["nondeterministic"]

    for batch in stages["throughput"]["result"]["config"]["batches"]:
        runs = stages["throughput"]["result"]["runs"]
        assert runs[f"ours-{batch}"]["img_per_s"] > 0 and runs[f"ultra-{batch}"]["img_per_s"] > 0
        assert 0 <= runs[f"ours-{batch}"]["loader_wait_frac"] < 1
    ckpt = stages["checkpoint"]["result"]
    assert ckpt["device_to_host"]["bytes"] > 0 and ckpt["device_to_host"]["pageable_snapshot_median_s"] > 0
    assert ckpt["stall_per_save_vs_ultralytics"]["ultralytics_save_model_s"] > 0
    assert ckpt["step_overhead"]["saves"] >= 3
    memory = stages["memory"]["result"]["by_batch"]
    assert all(row["peak_tree_rss"]["ratio"] > 0 for row in memory.values())

    markdown = (out / "report.md").read_text()
    assert all(f"## {title}: ok" in markdown for _, title in gpu_check.STAGES)
