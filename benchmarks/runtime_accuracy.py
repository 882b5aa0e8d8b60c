"""Accuracy of the runtimes that run the networks (``--runtime torch|onnx|onnx-int8``), as a user runs them.

For each dataset (with the shipped model of its tissue) and each runtime (``auto`` is the default:
the detector on ``onnx``, the encoder on ``onnx-int8``), one ``denuc predict``
process over the split's images (``--mpp`` of the dataset, CSV output, the runtime given by
``--runtime``, everything else default) writes its points; they are scored with
:func:`denuc.evaluate` (denuc protocol, 3 µm): detection F1 and mean class F1. Every runtime's
points are also compared with the first runtime's (the reference, default ``torch``): the share
of reference points with a point within 1 px (mutual nearest neighbours), the share of those
with the same class, and points only one side has. Each runtime gets its own ONNX cache
(``runs/runtime_accuracy/cache``, shared between runs of this script), so the int8 files are
quantized as a new user's first run quantizes them.

    python benchmarks/runtime_accuracy.py [--data brca-m2c:brca-m2c consep:consep] [--split val]
        [--runtimes torch onnx auto onnx-int8] [--name runtime_accuracy] [--report]

Prints a table and writes ``benchmarks/results/<name>.json``; ``--report`` also copies it to
``benchmarks/reported/``. Wall times are printed for orientation only (``benchmarks/cli_speed.py``
times the command).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import run_info, write_result

from denuc.core.result import Nuclei
from denuc.data.base import open_dataset
from denuc.data.paths import shared_data_dir
from denuc.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "runtime_accuracy"
CLI = "import sys; from denuc.cli import main; sys.exit(main(sys.argv[1:]))"


def agreement(ref: dict[str, Nuclei], got: dict[str, Nuclei], tol_px: float = 1.0) -> dict[str, Any]:
    """Mutual-nearest-neighbour agreement of two runs' points (input pixels) within ``tol_px``."""
    from scipy.spatial import cKDTree

    n_ref = n_got = matched = same = 0
    for s, a in ref.items():
        b = got[s]
        n_ref, n_got = n_ref + len(a), n_got + len(b)
        if not len(a) or not len(b):
            continue
        da, ia = cKDTree(b.xy).query(a.xy)
        _, ib = cKDTree(a.xy).query(b.xy)
        mutual = (da <= tol_px) & (ib[ia] == np.arange(len(a)))
        matched += int(mutual.sum())
        ca = np.asarray(a.class_names)[a.class_ids[mutual]]
        cb = np.asarray(b.class_names)[b.class_ids[ia[mutual]]]
        same += int((ca == cb).sum())
    return {"reference_points": n_ref, "points": n_got, "matched_within_px": tol_px,
            "matched_share_of_reference": round(matched / max(n_ref, 1), 4),
            "same_class_share_of_matched": round(same / max(matched, 1), 4),
            "only_reference": n_ref - matched, "only_this": n_got - matched}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["brca-m2c:brca-m2c", "consep:consep"], metavar="DATASET:MODEL",
                    help="dataset folder (or name under $DENUC_DATA) and the shipped model to run on it "
                         "(default: %(default)s)")
    ap.add_argument("--split", default="val", help="split scored (default: %(default)s; never test when choosing)")
    ap.add_argument("--runtimes", nargs="+", default=["torch", "onnx", "auto", "onnx-int8"],
                    help="runtimes; the first is the reference for agreement (default: %(default)s)")
    ap.add_argument("--name", default="runtime_accuracy", help="result name (default: %(default)s)")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    args = ap.parse_args()

    rows: list[dict[str, Any]] = []
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), DENUC_CACHE=str(WORK / "cache"))
    for spec in args.data:
        name, _, model = spec.partition(":")
        folder = Path(name) if Path(name).is_dir() else shared_data_dir() / name
        ds = open_dataset(folder)
        stems = ds.stems(args.split)
        mpps = {ds.mpp_of(s) for s in stems}
        if len(mpps) != 1:
            sys.exit(f"{folder}: images of several mpp {sorted(mpps)}; run them separately")
        mpp = mpps.pop()
        gt = {s: ds.load(s).points for s in stems}
        preds: dict[str, dict[str, Nuclei]] = {}
        for rt in args.runtimes:
            out = WORK / "out" / folder.name / rt
            shutil.rmtree(out, ignore_errors=True)
            argv = ["predict", *[str(ds.image_path(s)) for s in stems], "--mpp", str(mpp), "--format", "csv",
                    "--out", str(out), "--runtime", rt, *(["--model", model] if model else [])]
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", CLI, *argv], env=env, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                sys.exit(f"denuc predict --runtime {rt} failed ({p.returncode}):\n{p.stderr[-3000:]}")
            preds[rt] = {s: Nuclei.read_csv(out / f"{s}.csv", mpp=mpp) for s in stems}
            rep = evaluate(gt, preds[rt], protocol="denuc", radius_um=3.0)
            row = {"dataset": folder.name, "model": model, "split": args.split, "images": len(stems), "runtime": rt,
                   "det_f1": round(rep.detection.f1, 4), "mean_class_f1": round(rep.mean_f1, 4),
                   "class_f1": {c: round(v.f1, 4) for c, v in rep.classes.items()}, "wall_s_incl_first_export": round(wall, 1),
                   "agreement_with_" + args.runtimes[0]: agreement(preds[args.runtimes[0]], preds[rt])}
            rows.append(row)
            print(f"{folder.name:10} {rt:10} det F1 {row['det_f1']:.4f}  mean class F1 {row['mean_class_f1']:.4f}  "
                  f"{wall:6.1f} s", flush=True)
    ref = args.runtimes[0]
    print(f"\n{'dataset':10} {'runtime':10} {'det F1':>7} {'cls F1':>7} {'d det':>7} {'d cls':>7} "
          f"{'matched':>8} {'same cls':>8}")
    for r in rows:
        base = next(b for b in rows if b["dataset"] == r["dataset"] and b["runtime"] == ref)
        a = r["agreement_with_" + ref]
        r["delta_vs_" + ref] = {"det_f1": round(r["det_f1"] - base["det_f1"], 4),
                                "mean_class_f1": round(r["mean_class_f1"] - base["mean_class_f1"], 4)}
        d = r["delta_vs_" + ref]
        print(f"{r['dataset']:10} {r['runtime']:10} {r['det_f1']:7.4f} {r['mean_class_f1']:7.4f} {d['det_f1']:+7.4f} "
              f"{d['mean_class_f1']:+7.4f} {a['matched_share_of_reference']:8.4f} {a['same_class_share_of_matched']:8.4f}")
    write_result(args.name, {"benchmark": "runtime_accuracy", **run_info("runtime_accuracy.py"), "split": args.split,
                             "reference": ref, "protocol": "denuc", "radius_um": 3.0, "rows": rows}, report=args.report)


if __name__ == "__main__":
    main()
