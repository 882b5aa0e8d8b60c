"""Detector training throughput: how many augmented crops per second ``train-detector`` consumes,
with the crops prepared in the training process or by ``--workers`` loader processes.

Three measurements in one run, all on the same images, model and recipe as ``train-detector``
(:class:`denuc.train.detector.CropSource`, :func:`~denuc.train.detector.crop_batches`,
:func:`~denuc.train.detector.train_step`):

* ``prepare``: crops/s that one process augments (no model), the bound without workers;
* ``step``: crops/s of the optimisation step alone, one prepared batch reused (the device's bound);
* ``train workers=W``: crops/s of the real loop, crops prepared by W processes (0 = in the loop).

    python benchmarks/detector_train_speed.py [--device cuda] [--workers 0 4 8] [--images 16] [--steps 40]

Input: the first ``--images`` images of BRCA-M2C ``--split`` (or ``--data DIR``, any dataset
folder) at ``--mpp``. Prints a table and writes ``benchmarks/results/detector_train_speed.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from common import run_info, write_result

from denuc.data.paths import brca_m2c_dir
from denuc.detect.model import DetectorConfig, build_detector
from denuc.train.augment import AugmentConfig
from denuc.train.detector import CropSource, crop_batches, load_items, param_groups, train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="dataset folder (default: BRCA-M2C under $DENUC_DATA)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--images", type=int, default=16, help="first N images of the split")
    ap.add_argument("--mpp", type=float, default=0.25, help="training µm/px (the shipped detector's)")
    ap.add_argument("--backbone", default="efficientnet-lite0")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--stain-p", type=float, default=0.6, help="H&E stain jitter probability (shipped recipe)")
    ap.add_argument("--steps", type=int, default=40, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (worker start-up, kernels)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 4, 8])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads of the training process (0 = default)")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = args.data or str(brca_m2c_dir())
    t0 = time.perf_counter()
    items, vocab = load_items([data], args.split, args.mpp, keep_classes=False, limit=args.images)
    print(f"{len(items)} images at {args.mpp} µm/px loaded in {time.perf_counter() - t0:.1f} s")
    aug = AugmentConfig(crop=args.crop, p_stain=args.stain_p)
    source = CropSource(items, aug, seed=0)
    n_steps = args.warmup + args.steps
    order = np.random.default_rng(0).integers(0, len(items), n_steps * args.batch)

    model = build_detector(DetectorConfig(backbone=args.backbone, num_classes=1, class_names=vocab)).to(device)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 1e-4), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    n_crops = args.steps * args.batch
    rows = []

    # prepare: augmentation alone in this process
    t0 = time.perf_counter()
    batches = list(crop_batches(source, order[:n_crops], 0, args.batch, args.steps, 0))
    rows.append({"what": "prepare (one process, no model)", "workers": 0,
                 "crops_per_s": round(n_crops / (time.perf_counter() - t0), 2)})

    # step: the optimisation step alone, on one prepared batch
    for _ in range(args.warmup):
        train_step(model, batches[0], opt, scaler, 1e-4, device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step(model, batches[0], opt, scaler, 1e-4, device)
    sync(device)
    rows.append({"what": "step (one batch reused, no preparation)", "workers": None,
                 "crops_per_s": round(n_crops / (time.perf_counter() - t0), 2)})
    del batches

    # the training loop with its crops made by W processes
    for w in args.workers:
        it = crop_batches(source, order, 1, args.batch, n_steps, w)
        for _ in range(args.warmup):
            train_step(model, next(it), opt, scaler, 1e-4, device)
        sync(device)
        t0 = time.perf_counter()
        for batch in it:
            train_step(model, batch, opt, scaler, 1e-4, device)
        sync(device)
        rows.append({"what": "train", "workers": w, "crops_per_s": round(n_crops / (time.perf_counter() - t0), 2)})
        del it

    print(f"{'what':42} {'workers':>7} {'crops/s':>9}")
    for r in rows:
        print(f"{r['what']:42} {'' if r['workers'] is None else r['workers']:>7} {r['crops_per_s']:9.2f}")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    write_result(f"detector_train_speed_{device.type}", {
        "benchmark": "detector_train_speed", "device": dev_name, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), **run_info("detector_train_speed.py"),
        "data": data, "split": args.split, "images": len(items), "mpp": args.mpp, "backbone": args.backbone,
        "batch": args.batch, "crop": args.crop, "stain_p": args.stain_p, "steps": args.steps, "rows": rows},
        args.report)


if __name__ == "__main__":
    main()
