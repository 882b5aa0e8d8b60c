"""Inference window size of the detector: detection F1 and time per window size, in one run.

The detector is fully convolutional: it was trained on 256 px crops, but inference can cover an
image with larger windows (neighbours overlap by twice the 32 px margin, whose points are
dropped). Larger windows compute fewer overlapping pixels and make fewer forward passes, but
give the model more context than it was trained with. This script measures both effects on
BRCA-M2C with the shipped detector (or ``--detector``) at its val-chosen threshold:

    python benchmarks/detector_window.py --windows 256 512 1024 [--split val] [--threads 2] [--device cpu]

F1 is the denuc protocol at 3 µm; seconds are the best of ``--reps`` passes over the split.
Choose on ``--split val``; score ``--split test`` once for the choice. Prints a table and writes
``benchmarks/results/detector_window_<split>.json``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from common import run_info, write_result
from detector_brca import predict_split, score

from denuc.data.base import open_dataset
from denuc.data.paths import brca_m2c_dir
from denuc.detect.api import Detector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", type=Path, default=None)
    ap.add_argument("--windows", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--split", default="val")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = open_dataset(brca_m2c_dir())
    rows = []
    for w in args.windows:
        det = Detector.load(args.detector, device=args.device, window=w)
        predict_split(det, ds, args.split)  # warm-up, and the predictions scored below
        best = float("inf")
        for _ in range(args.reps):
            t0 = time.perf_counter()
            pred = predict_split(det, ds, args.split)
            best = min(best, time.perf_counter() - t0)
        s = score(ds, pred, args.split, "denuc", 3.0)
        rows.append({"window": w, "stride": det.stride, "batch": det.batch_size, "seconds": round(best, 3),
                     "f1": round(s["f1"], 4), "precision": round(s["precision"], 4), "recall": round(s["recall"], 4)})
    base = rows[0]["seconds"]
    print(f"{'window':>6} {'stride':>6} {'F1':>7} {'prec':>7} {'recall':>7} {'s':>7} {'speed-up':>8}")
    for r in rows:
        r["speedup_vs_first"] = round(base / r["seconds"], 3)
        print(f"{r['window']:6d} {r['stride']:6d} {r['f1']:7.4f} {r['precision']:7.4f} {r['recall']:7.4f} "
              f"{r['seconds']:7.2f} {r['speedup_vs_first']:8.2f}")
    write_result(f"detector_window_{args.split}", {
        "benchmark": "detector_window", **run_info("detector_window.py"), "device": args.device,
        "threads": torch.get_num_threads(), "detector": str(args.detector or "shipped default"),
        "split": args.split, "images": len(ds.stems(args.split)), "protocol": "denuc", "radius_um": 3.0,
        "rows": rows}, args.report)


if __name__ == "__main__":
    main()
