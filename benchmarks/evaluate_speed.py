"""Speed of the point matchers: 1,000 synthetic images of 1,000 GT points each, every protocol.

Each image: 1,000 GT points uniform in a square of side 1000 px ("brca-like": ~1 point per
1,000 px², BRCA-M2C at 0.5 µm/px has ~1.2) or 500 px ("dense": 4x that, many contested
pairs); predictions = 90% of the GT jittered by N(0, 2 px)
plus 150 uniform false positives, random scores in [0, 1). Radius 6 px. Only the matcher
call is timed (data generation is not); one process, one thread, this machine's CPU.

    .venv/bin/python benchmarks/evaluate_speed.py [--images 1000 --points 1000]

Prints a table and writes ``benchmarks/results/evaluate_speed.json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
from common import write_json

from denuc.evaluate.matching import PROTOCOLS

REPO = Path(__file__).resolve().parents[1]


def make_images(n_images: int, n_points: int, side: float, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``(pred_xy (P,2), pred_scores (P,), gt_xy (G,2))`` per image, (x, y) px."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_images):
        gt = rng.uniform(0, side, (n_points, 2))
        keep = rng.random(n_points) < 0.9
        tp = gt[keep] + rng.normal(0, 2.0, (int(keep.sum()), 2))
        fp = rng.uniform(0, side, (int(0.15 * n_points), 2))
        pred = np.concatenate([tp, fp])
        perm = rng.permutation(len(pred))
        out.append((pred[perm], rng.random(len(pred)).astype(np.float32), gt))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--points", type=int, default=1000)
    ap.add_argument("--radius", type=float, default=6.0)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "evaluate_speed.json")
    args = ap.parse_args()

    rows = []
    for scenario, side in (("brca-like", 1000.0), ("dense", 500.0)):
        data = make_images(args.images, args.points, side)
        n_gt = sum(len(g) for _, _, g in data)
        n_pred = sum(len(p) for p, _, _ in data)
        for name in PROTOCOLS.names():
            fn = PROTOCOLS.get(name).match
            t0 = time.perf_counter()
            tp = 0
            for p, s, g in data:
                tp += len(fn(p, s, g, args.radius)[0])
            dt = time.perf_counter() - t0
            rows.append({"scenario": scenario, "side_px": side, "protocol": name, "n_pred": n_pred, "n_gt": n_gt,
                         "seconds": dt, "ms_per_image": 1e3 * dt / args.images,
                         "us_per_gt_point": 1e6 * dt / n_gt, "tp": tp, "f1": 2 * tp / (n_pred + n_gt)})

    print(f"{args.images} images x {args.points} GT points (+ ~{int(0.15 * args.points)} false positives), "
          f"r = {args.radius:g} px, CPU: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} logical cores (shared)")
    print(f"{'scenario':10} {'protocol':10} {'total s':>8} {'ms/image':>9} {'us/GT pt':>9} {'TP':>9} {'F1':>6}")
    for r in rows:
        print(f"{r['scenario']:10} {r['protocol']:10} {r['seconds']:8.2f} {r['ms_per_image']:9.2f} "
              f"{r['us_per_gt_point']:9.2f} {r['tp']:9d} {r['f1']:6.3f}")
    out = {"benchmark": "evaluate_speed", "images": args.images, "gt_points_per_image": args.points,
           "radius_px": args.radius,
           "command": "python benchmarks/evaluate_speed.py", "machine": platform.machine(),
           "cpu_count": os.cpu_count(), "python": platform.python_version(), "results": rows,
           "note": "matcher calls only, single process; the CPU was shared with other jobs"}
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
