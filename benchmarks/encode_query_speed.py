"""Encoder + point-query throughput against a bare encoder forward, measured in one run.

The classifier stage of DeNuC is: cut 256 px windows at the encoder's mpp, resize them to the
encoder's input, encode, sample the map at each point (:class:`denuc.query.PointFeaturizer`).
Its cost should be the encoder's: the target is >= 90% of the bare forward's windows/s.
This script times both on the same machine in one run (random weights; speed does not depend
on weight values):

* ``bare``: ``encoder(x)`` on ready-made normalised ``(B, 3, S, S)`` batches already on the device;
* ``query``: ``set_image`` + ``features_at`` on an image of ``--grid`` x ``--grid`` windows
  (non-overlapping, stride = window) with ``--points`` random points per window, from a uint8
  numpy image in host memory, i.e. including the upload, resize, normalisation and sampling.

Both use the featurizer's precision (``auto``: bf16 autocast on CUDA, fp32 on CPU).

    python benchmarks/encode_query_speed.py --encoders efficientnet-lite0 uni2-h [--device cuda] [--report]

Prints a table and writes ``benchmarks/results/encode_query_speed.json``.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from common import run_info, write_result

from denuc.encode import build_encoder
from denuc.query import PointFeaturizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_rate(fz: PointFeaturizer, n_windows: int, reps: int) -> float:
    """Windows per second of ``encoder(x)`` alone (best of ``reps``), in the batches the featurizer
    uses for an image of ``n_windows`` windows."""
    enc, dev, s = fz.encoder, fz.device, fz.encoder.input_size
    batch = min(fz.batch_size, n_windows)
    x = enc.normalize(torch.rand(batch, 3, s, s, device=dev))
    dt = fz.autocast_dtype
    best = float("inf")
    for _ in range(reps):
        sync(dev)
        t0 = time.perf_counter()
        done = 0
        while done < n_windows:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dt or torch.bfloat16, enabled=dt is not None):
                enc(x).float()
            done += batch
        sync(dev)
        best = min(best, (time.perf_counter() - t0) / done)
    return 1.0 / best


def query_rate(fz: PointFeaturizer, grid: int, points: int, reps: int) -> tuple[float, int, dict[str, float]]:
    """Windows per second of set_image + features_at (best of ``reps``), windows per image, and
    milliseconds per image of its parts (best of ``reps``): ``set_image`` (upload, conversion) and
    ``sample`` (a second ``features_at`` on the encoded maps: grouping + sampling only)."""
    side = grid * fz.window
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    xy = rng.uniform(0, side, (grid * grid * points, 2))
    best = float("inf")
    parts = {"set_image_ms": float("inf"), "sample_ms": float("inf")}
    n = 0
    for _ in range(reps):
        sync(fz.device)
        t0 = time.perf_counter()
        fz.set_image(img, fz.mpp)
        fz.features_at(xy)
        sync(fz.device)
        n = fz.windows_encoded
        best = min(best, (time.perf_counter() - t0) / n)
        t0 = time.perf_counter()
        fz.features_at(xy)
        sync(fz.device)
        parts["sample_ms"] = min(parts["sample_ms"], (time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        fz.set_image(img, fz.mpp)
        sync(fz.device)
        parts["set_image_ms"] = min(parts["set_image_ms"], (time.perf_counter() - t0) * 1e3)
    return 1.0 / best, n, {k: round(v, 2) for k, v in parts.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--encoders", nargs="+", default=["efficientnet-lite0", "uni2-h"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grid", type=int, default=4, help="windows per image side (grid x grid windows)")
    ap.add_argument("--points", type=int, default=60, help="query points per window")
    ap.add_argument("--batch", type=int, nargs="+", default=[16], help="windows per encoder call (one row each)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--name", default="encode_query_speed", help="result name")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for name, batch in [(e, b) for e in args.encoders for b in args.batch]:
        enc = build_encoder(name, weights="random", device=device)
        fz = PointFeaturizer(enc, stride=enc.spec.window, batch_size=batch)  # non-overlapping windows
        n_win = args.grid * args.grid
        bare_rate(fz, n_win, 1)  # warm-up
        query_rate(fz, 1, args.points, 1)
        bare = bare_rate(fz, n_win, args.reps)
        query, n, parts = query_rate(fz, args.grid, args.points, args.reps)
        mpx = fz.window**2 / 1e6
        row = {"encoder": name, "input_size": enc.input_size, "window": fz.window, "mpp": fz.mpp,
               "precision": str(fz.autocast_dtype or torch.float32).replace("torch.", ""),
               "windows_per_image": n, "points_per_window": args.points, "batch": batch,
               "bare_windows_per_s": round(bare, 3), "query_windows_per_s": round(query, 3),
               "query_over_bare": round(query / bare, 4), "query_mpx_per_s_at_mpp": round(query * mpx, 3),
               "bare_ms_per_image": round(n_win / bare * 1e3, 2), **parts}
        rows.append(row)
        del fz, enc
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{'encoder':20} {'batch':>5} {'precision':9} {'bare win/s':>11} {'query win/s':>12} {'ratio':>6} {'Mpx/s':>7} "
          f"{'bare ms':>8} {'set_image ms':>12} {'sample ms':>9}")
    for r in rows:
        print(f"{r['encoder']:20} {r['batch']:5d} {r['precision']:9} {r['bare_windows_per_s']:11.2f} {r['query_windows_per_s']:12.2f} "
              f"{r['query_over_bare']:6.3f} {r['query_mpx_per_s_at_mpp']:7.3f} {r['bare_ms_per_image']:8.1f} "
              f"{r['set_image_ms']:12.1f} {r['sample_ms']:9.1f}")
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    write_result(args.name, {
        "benchmark": "encode_query_speed", "device": dev_name, "threads": torch.get_num_threads(),
        **run_info("encode_query_speed.py"), "results": rows}, args.report)


if __name__ == "__main__":
    main()
