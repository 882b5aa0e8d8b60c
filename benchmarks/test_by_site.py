"""BRCA-M2C test scores split by tissue-source site: sites seen in train/val vs new sites.

Train and val come from three TCGA sites (A7, A8, AC); 10 of the 30 test images come from A8
and 20 from nine sites that no training image comes from. This script breaks the already
reported test numbers down by that split. It trains and selects nothing, so no test score is
spent on a choice. Each method's predictions are scored with the ``denuc`` protocol at 3 µm
(6 px at 0.5 µm/px):

- the shipped pipeline (default detector and head, :class:`denuc.DeNuC`, ``--tta`` passes of
  the detector), run on every test image;
- the published MCSpatNet predictions (``reference_predictions_mcspatnet``).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/test_by_site.py [--threads 2] [--report]

Prints a table, writes ``benchmarks/results/test_by_site.json`` (``--report`` also copies it
to ``benchmarks/reported/``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from common import run_info, write_result

from denuc.core.result import Nuclei
from denuc.data import open_dataset
from denuc.data.paths import brca_m2c_dir
from denuc.evaluate import evaluate
from denuc.evaluate.predictions import convert_yxc_predictions
from denuc.train.site_cv import tcga_site

REPO = Path(__file__).resolve().parents[1]


def site_split(stems: list[str], seen: set[str]) -> dict[str, list[str]]:
    """``{"all": ..., "seen sites": ..., "new sites": ...}`` by each stem's TCGA site."""
    return {"all": list(stems), "seen sites": [s for s in stems if tcga_site(s) in seen],
            "new sites": [s for s in stems if tcga_site(s) not in seen]}


def score(gt: Mapping[str, Nuclei], pred: str | Path | Mapping[str, Nuclei], groups: dict[str, list[str]]) -> dict:
    """Detection and class F1 of ``pred`` on each group of images (denuc protocol, 3 µm)."""
    out = {}
    for name, stems in groups.items():
        rep = evaluate({s: gt[s] for s in stems}, pred, protocol="denuc", radius_um=3.0)
        out[name] = {"images": len(stems), "gt_points": rep.detection.n_gt, "det_f1": rep.detection.f1,
                     "det_precision": rep.detection.precision, "det_recall": rep.detection.recall,
                     "class_f1": {c: v.f1 for c, v in rep.classes.items()}, "mean_f1": rep.mean_f1}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tta", type=int, default=1, help="detector test-time augmentation passes of the pipeline")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "test_by_site")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from denuc.pipeline import DeNuC

    data = brca_m2c_dir()
    ds = open_dataset(data)
    seen = {tcga_site(s) for s in ds.stems("train") + ds.stems("val")}
    test = ds.stems("test")
    groups = site_split(test, seen)
    model = DeNuC.load(tta=args.tta)
    t0, preds, gt = time.perf_counter(), {}, {}
    for s in test:
        smp = ds.load(s)
        gt[s] = smp.points
        preds[s] = model(smp.image, smp.mpp, name=s)
    secs = time.perf_counter() - t0
    mcs_dir = args.work / "mcspatnet"
    convert_yxc_predictions(data / "reference_predictions_mcspatnet" / "points", mcs_dir)

    results = {f"DeNuC shipped pipeline (detector --tta {args.tta})": score(gt, preds, groups),
               "MCSpatNet published predictions": score(gt, mcs_dir, groups)}
    classes = list(ds.classes)
    print(f"\nBRCA-M2C test by site (seen in train/val: {sorted(seen)}); denuc protocol, 3 µm")
    print(f"{'method':44} {'images':>14} {'det F1':>7} {'prec':>6} {'rec':>6} "
          + " ".join(f"{c[:10]:>10}" for c in classes) + f" {'mean F1':>8}")
    for meth, res in results.items():
        for g, r in res.items():
            print(f"{meth[:44]:44} {g + ' ' + str(r['images']):>14} {r['det_f1']:7.3f} {r['det_precision']:6.3f} "
                  f"{r['det_recall']:6.3f} " + " ".join(f"{r['class_f1'][c]:10.3f}" for c in classes)
                  + f" {r['mean_f1']:8.3f}")
    out = {"benchmark": "test_by_site", "split": "test", "protocol": "denuc", "radius_um": 3.0,
           "seen_sites": sorted(seen), "groups": {g: len(v) for g, v in groups.items()},
           "new_sites": sorted({tcga_site(s) for s in groups["new sites"]}),
           **run_info("test_by_site.py", one_thread=args.threads == 1), "cpu_threads": args.threads,
           "pipeline_seconds": round(secs, 1), "results": results}
    write_result("test_by_site", out, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
