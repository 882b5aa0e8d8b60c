"""Peak memory of the DeNuC pipeline on one large tile, keeping every encoded window map
versus the bounded map cache (``PointFeaturizer(cache_mb=...)``), each in a fresh process.

The tile is the bundled BRCA-M2C sample (0.5 µm/px) repeated to ``--side`` px a side. Each run
reports its peak resident memory (``ru_maxrss``), wall time and a hash of the output CSV, so
the table also shows that the results are identical.

    python benchmarks/pipeline_memory.py [--side 3000] [--cache-mb 1e9 256 1e9 256] [--threads 2] [--report]

Prints a table and writes ``benchmarks/results/pipeline_memory.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import run_info, write_result

CHILD = r"""
import hashlib, json, resource, sys, time
import numpy as np, torch
from denuc.data.image import read_image
from denuc.pipeline import DeNuC, DEFAULT_HEAD
side, cache_mb, threads, out = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(threads)
tile = read_image(DEFAULT_HEAD.parent / "sample" / "brca-m2c-sample.png")
reps = (-(-side // tile.shape[0]), -(-side // tile.shape[1]), 1)
img = np.ascontiguousarray(np.tile(tile, reps)[:side, :side])
model = DeNuC.load(device="cpu")
model.featurizer.cache_mb = cache_mb
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
nuc = model(img, mpp=0.5)
dt = time.perf_counter() - t0
nuc.to_csv(out)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "rss_before_call_mb": base / 1024, "seconds": round(dt, 1), "nuclei": len(nuc),
                  "windows_encoded": nuc.meta["windows_encoded"], "cache_windows": model.featurizer.cache_windows}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=3000, help="tile side in px at 0.5 µm/px")
    ap.add_argument("--cache-mb", type=float, nargs="+", default=[1e9, 256, 1e9, 256],
                    help="map cache budgets to compare (1e9 = keep every map)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mb in args.cache_mb:
            csv = Path(tmp) / f"{mb:g}.csv"
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            r = subprocess.run([sys.executable, "-c", CHILD, str(args.side), str(mb), str(args.threads), str(csv)],
                               capture_output=True, text=True, env=env, check=True)
            row = {"cache_mb": mb, **json.loads(r.stdout.strip().splitlines()[-1]),
                   "csv_sha256": hashlib.sha256(csv.read_bytes()).hexdigest()[:16]}
            rows.append(row)
            print(f"cache {mb:>10g} MiB: peak {row['peak_rss_mb']:8.0f} MiB, {row['seconds']:6.1f} s, "
                  f"{row['nuclei']} nuclei, {row['windows_encoded']} windows, csv {row['csv_sha256']}", flush=True)
    base = rows[0]
    for r in rows:
        r["peak_over_first"] = round(r["peak_rss_mb"] / base["peak_rss_mb"], 3)
        r["time_over_first"] = round(r["seconds"] / base["seconds"], 3)
        r["same_output_as_first"] = r["csv_sha256"] == base["csv_sha256"]
    print(f"\n{'cache MiB':>10} {'peak MiB':>9} {'x first':>8} {'time x':>7} {'same CSV':>9}")
    for r in rows:
        print(f"{r['cache_mb']:>10g} {r['peak_rss_mb']:9.0f} {r['peak_over_first']:8.3f} {r['time_over_first']:7.3f} "
              f"{str(r['same_output_as_first']):>9}")
    write_result("pipeline_memory", {"benchmark": "pipeline_memory", "side_px": args.side, "input_mpp": 0.5,
                                     "device": "cpu", "threads": args.threads, **run_info("pipeline_memory.py"),
                                     "results": rows}, args.report)


if __name__ == "__main__":
    main()
