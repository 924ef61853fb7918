"""Accuracy on identical work: `yolo-resume train` vs ultralytics' own trainer, several seeds, two evaluators.

Both tools train the same model YAML (random init) on the same images (the synthetic shapes set written by
`yolo-resume data synth`, exported to the ultralytics YOLO layout, which both read), with the same imgsz,
batch = nbs, AdamW lr0 / lrf / momentum / weight decay / warmup, epochs and augmentation settings, in child
processes with one torch thread each (two children run at a time on two cores; accuracy does not depend on
timing, and both tools are deterministic for a given seed). Each final EMA model is then scored by
ultralytics' validator (`YOLO(pt).val(conf=0.001, iou=0.7)`, our checkpoints exported with
`yolo-resume ckpt export --format ultralytics`) *and* by ours (NMS + pycocotools COCOeval), so the table
shows both tools under both evaluators and how well the evaluators agree on the same weights.

Setups (6 classes, 100 val images, batch = nbs = 16; see SETUPS / FULL_SETUPS):
- quick: short (160 px, 200 train images, 10 epochs, close_mosaic 3) and long (128 px, 200 images,
  25 epochs, close_mosaic 5): about 25 minutes for 4 seeds of both tools;
- --full: the issue's two setups (160 px / 300 images / 12 epochs / close_mosaic 3, and 256 px / 400 images /
  15 epochs / close_mosaic 0) and a long one (160 px, 300 images, 40 epochs, close_mosaic 10).

Ablations: `--ours-set KEY=VALUE` (repeatable) changes our config only, `--ours-repo DIR` trains ours with the
package of another checkout (e.g. a `git worktree` of an older commit), `--tools ours` skips ultralytics,
`--label` names the variant in the output; results append to `--json`.

Usage: python scripts/bench_accuracy.py [--full] [--seeds 4] [--setups short,long] [--tools ours,ultralytics]
       [--ours-set train.schedule=linear ...] [--label NAME] [--parallel 2] [--dir DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import child_env, machine, prepare_dataset, versions  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MODEL = "yolov5n.yaml"
NUM_CLASSES = 6
OPTIM = {"optimizer": "AdamW", "lr0": 0.002, "lrf": 0.05, "momentum": 0.9, "weight_decay": 0.0005, "warmup_epochs": 1.0}
AUGMENT = {"mosaic": 1.0, "scale": 0.5, "translate": 0.1, "fliplr": 0.5, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4}
SETUPS = {  # quick: about 25 minutes for 4 seeds of both tools on 2 cores
    "short": {"imgsz": 160, "num_train": 200, "num_val": 100, "epochs": 10, "close_mosaic": 3, "batch": 16},
    "long": {"imgsz": 128, "num_train": 200, "num_val": 100, "epochs": 25, "close_mosaic": 5, "batch": 16},
}
# Defaults a user gets: our packaged demo config vs `yolo train` with its own defaults, on the demo's images
# (400 train / 100 val, 3 classes, 128 px), yolov5s, 12 epochs, batch 16 (only --setups demo runs it).
DEMO_SETUP = {
    "imgsz": 128,
    "num_train": 400,
    "num_val": 100,
    "epochs": 12,
    "close_mosaic": 0,
    "batch": 16,
    "classes": 3,
    "model": "yolov5s.yaml",
    "defaults": True,
}
FULL_SETUPS = {  # the two setups, and a longer schedule
    "short": {"imgsz": 160, "num_train": 300, "num_val": 100, "epochs": 12, "close_mosaic": 3, "batch": 16},
    "wide": {"imgsz": 256, "num_train": 400, "num_val": 100, "epochs": 15, "close_mosaic": 0, "batch": 16},
    "long": {"imgsz": 160, "num_train": 300, "num_val": 100, "epochs": 40, "close_mosaic": 10, "batch": 16},
}


# -- children ---------------------------------------------------------------------------------------
def _child_ultra(spec: dict) -> None:
    from ultralytics.utils import torch_utils

    torch_utils.NUM_THREADS = 1
    from ultralytics import YOLO

    p, run_dir = spec["setup"], Path(spec["run_dir"])
    # "defaults": ultralytics as `yolo train` comes (optimizer auto, nbs 64, close_mosaic 10, ...).
    aligned = {} if p.get("defaults") else {"nbs": p["batch"], "close_mosaic": p["close_mosaic"], **OPTIM, **AUGMENT}
    YOLO(p.get("model", MODEL)).train(
        data=spec["data"],
        epochs=p["epochs"],
        imgsz=p["imgsz"],
        batch=p["batch"],
        workers=0,
        device="cpu",
        seed=spec["seed"],
        deterministic=True,
        pretrained=False,
        amp=False,
        plots=False,
        val=False,
        cache=False,
        project=str(run_dir.parent),
        name=run_dir.name,
        exist_ok=True,
        verbose=False,
        **aligned,
    )
    Path(spec["out"]).write_text(json.dumps({"weights": str(run_dir / "weights" / "last.pt")}))


def _child_score(spec: dict) -> None:
    """Both evaluators on one weights file: ultralytics' validator, then our NMS + COCOeval."""
    import torch

    torch.set_num_threads(1)
    from torch.utils.data import DataLoader
    from ultralytics import YOLO

    from yolo_resume.config import AugmentConfig, DataConfig, EvalConfig
    from yolo_resume.data import build_datasets, collate_fn
    from yolo_resume.evaluate import evaluate

    imgsz, weights = spec["imgsz"], spec["weights"]
    res = YOLO(weights).val(
        data=spec["data"], imgsz=imgsz, batch=16, conf=0.001, iou=0.7, device="cpu", plots=False, verbose=False
    )
    out = {"ultra_map": float(res.box.map), "ultra_map50": float(res.box.map50)}
    model = torch.load(weights, map_location="cpu", weights_only=False)["model"].float().eval()
    _, val_ds = build_datasets(DataConfig(format="yolo", root=spec["data"]), AugmentConfig(), imgsz, 0, 1)
    loader = DataLoader(val_ds, batch_size=32, shuffle=False, collate_fn=collate_fn)
    ours = evaluate(model, loader, val_ds, torch.device("cpu"), EvalConfig())
    out |= {"ours_map": ours["map"], "ours_map50": ours["map50"]}
    out |= {"ours_ulstyle_map": ours["ultralytics_map"], "ours_ulstyle_map50": ours["ultralytics_map50"]}
    Path(spec["out"]).write_text(json.dumps(out))


# -- the parent -------------------------------------------------------------------------------------
def our_config(path: Path, data_yaml: Path, p: dict, seed: int, sets: list[str]) -> Path:
    cfg = {
        "data": {"format": "yolo", "root": str(data_yaml)},
        "model": {"cfg": p.get("model", MODEL), "imgsz": p["imgsz"]},
        "train": {"epochs": p["epochs"], "batch": p["batch"], "nbs": p["batch"], "seed": seed, "device": "cpu"} | OPTIM,
        "augment": AUGMENT | {"close_mosaic": p["close_mosaic"]},
        "eval": {"every_epochs": 0},
        "ckpt": {"every_epochs": p["epochs"], "keep_last": 1},
    }
    if p.get("defaults"):  # the packaged demo config as it comes, on the same images
        demo = yaml.safe_load((REPO / "yolo_resume" / "configs" / "demo.yaml").read_text())
        cfg["train"] = demo["train"] | {"seed": seed, "device": "cpu", "workers": 0}
        cfg["augment"] = demo["augment"]
        cfg["model"]["cfg"] = demo["model"]["cfg"]
    for item in sets:
        key, value = item.split("=", 1)
        section, name = key.split(".", 1)
        cfg[section][name] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _run(cmd: list[str], env: dict, log: Path, timeout: float = 7200) -> None:
    # Run in the work folder: `python -m` puts the working directory first on sys.path, which would
    # shadow the checkout named by --ours-repo.
    with log.open("w") as fh:
        proc = subprocess.run(cmd, env=env, cwd=log.parent, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"{cmd[:4]} failed ({proc.returncode}); see {log}")


def train_and_score(job: dict, work: Path, env: dict) -> dict:
    tag = f"{job['setup_name']}-{job['tool']}-{job['label']}-s{job['seed']}"
    run_dir, out = work / "runs" / tag, work / f"{tag}.json"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    if job["tool"] == "ours":
        cfg = our_config(work / f"{tag}.yaml", job["data"], job["setup"], job["seed"], job["sets"])
        ours_env = env | {"PYTHONPATH": str(Path(job["repo"]).resolve())} if job.get("repo") else env
        _run(
            [sys.executable, "-m", "yolo_resume", "train", "--config", str(cfg), "--run-dir", str(run_dir), "-q"],
            ours_env,
            work / f"{tag}.log",
        )
        weights = run_dir / "final.pt"
        ckpt = max((run_dir / "checkpoints").glob("ckpt-*"), key=lambda p: p.stat().st_mtime)
        _run(
            [
                sys.executable,
                "-m",
                "yolo_resume",
                "ckpt",
                "export",
                str(ckpt),
                "--format",
                "ultralytics",
                "-o",
                str(weights),
            ],
            env,
            work / f"{tag}.export.log",
        )
    else:
        spec = {
            "data": str(job["data"]),
            "setup": job["setup"],
            "seed": job["seed"],
            "run_dir": str(run_dir),
            "out": str(out),
        }
        _run([sys.executable, __file__, "--child-ultra", json.dumps(spec)], env, work / f"{tag}.log")
        weights = Path(json.loads(out.read_text())["weights"])
    train_s = time.perf_counter() - t0
    spec = {"data": str(job["data"]), "imgsz": job["setup"]["imgsz"], "weights": str(weights), "out": str(out)}
    _run([sys.executable, __file__, "--child-score", json.dumps(spec)], env, work / f"{tag}.score.log")
    scores = json.loads(out.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # keep the work folder small
    return {k: job[k] for k in ("setup_name", "tool", "label", "seed")} | scores | {"train_s": round(train_s, 1)}


def summarize(rows: list[dict]) -> list[dict]:
    """Per (setup, tool, label): mean, min, max and stdev of each metric over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setup_name"], r["tool"], r["label"]), []).append(r)
    out = []
    for (setup, tool, label), rs in groups.items():
        row = {"setup": setup, "tool": tool, "label": label, "seeds": len(rs)}
        for key in ("ultra_map", "ultra_map50", "ours_map", "ours_map50"):
            vals = [r[key] for r in rs]
            row[key] = {
                "mean": statistics.fmean(vals),
                "min": min(vals),
                "max": max(vals),
                "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            }
        out.append(row)
    return out


def table(summary: list[dict]) -> str:
    lines = [
        "| setup | tool | variant | seeds | mAP50-95 (ultralytics val) mean [min-max] sd | ratio vs ultralytics "
        "| mAP50-95 (our COCOeval) mean | mAP50 (ultralytics val) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {s["setup"]: s for s in summary if s["tool"] == "ultralytics"}
    for s in summary:
        u = s["ultra_map"]
        ref = base.get(s["setup"])
        ratio = f"{u['mean'] / ref['ultra_map']['mean']:.3f}" if ref else "-"
        lines.append(
            f"| {s['setup']} | {s['tool']} | {s['label']} | {s['seeds']} "
            f"| {u['mean']:.3f} [{u['min']:.3f}-{u['max']:.3f}] {u['sd']:.3f} | {ratio} "
            f"| {s['ours_map']['mean']:.3f} | {s['ultra_map50']['mean']:.3f} |"
        )
    return "\n".join(lines)


def evaluator_agreement(rows: list[dict]) -> str:
    """How far our two figures are from ultralytics' val on the same weights."""
    lines = []
    for key, what in (("ours_map", "our COCOeval"), ("ours_ulstyle_map", "our ultralytics-style figure")):
        diffs = [r[key] - r["ultra_map"] for r in rows if key in r]
        if diffs:
            lines.append(
                f"{what} minus ultralytics val, mAP50-95, same weights, {len(diffs)} models: median "
                f"{statistics.median(diffs):+.4f}, range {min(diffs):+.4f} .. {max(diffs):+.4f}"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child-ultra")
    ap.add_argument("--child-score")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--setups", default="short,long")
    ap.add_argument("--tools", default="ours,ultralytics")
    ap.add_argument("--ours-set", action="append", default=[])
    ap.add_argument("--ours-repo", help="train ours with the yolo_resume package of this checkout")
    ap.add_argument("--label", default="default")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--dir")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.child_ultra:
        return _child_ultra(json.loads(args.child_ultra))
    if args.child_score:
        return _child_score(json.loads(args.child_score))

    setups = (FULL_SETUPS if args.full else SETUPS) | {"demo": DEMO_SETUP}
    work = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(work) | {"OMP_NUM_THREADS": "1"}
    jobs = []
    for name in args.setups.split(","):
        p = setups[name]
        data = prepare_dataset(
            work, env, p["num_train"], p["num_val"], p["imgsz"], num_classes=p.get("classes", NUM_CLASSES)
        )
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            for tool in args.tools.split(","):  # interleaved: each seed's runs of both tools run side by side
                label = args.label if tool == "ours" else "default"
                jobs.append(
                    {
                        "setup_name": name,
                        "setup": p,
                        "tool": tool,
                        "seed": seed,
                        "data": data,
                        "sets": args.ours_set,
                        "label": label,
                        "repo": args.ours_repo,
                    }
                )
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda j: train_and_score(j, work, env), jobs))
    for r in rows:
        print(json.dumps(r))
    summary = summarize(rows)
    result = {
        "machine": machine(),
        "versions": versions(env),
        "setups": {n: setups[n] for n in args.setups.split(",")},
        "ours_set": args.ours_set,
        "label": args.label,
        "rows": rows,
        "summary": summary,
        "minutes": round((time.perf_counter() - t0) / 60, 1),
        "argv": sys.argv[1:],
    }
    print(table(summary))
    print(evaluator_agreement(rows))
    print(f"{result['minutes']} min")
    if args.json:
        path = Path(args.json)
        old = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(old + [result], indent=1))
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
