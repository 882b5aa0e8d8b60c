"""Class balancing of the head on BRCA-M2C val (val only; test is not scored).

Trains the head with the shipped head's recipe (``train-head``'s defaults) once per
``--class-balance`` mode (none, weighted, sampled) and reports val mean class F1 at the points
the shipped detector finds, val macro-F1 and per-class recall at the ground-truth points, and
the calibration. Features are cached, so after the first mode each run takes seconds.

    python benchmarks/head_class_balance.py [--report]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import run_info, write_result

from denuc.data.paths import brca_m2c_dir
from denuc.train.head import HEAD_PRESETS, HeadTrainConfig
from denuc.train.head_run import train_head

MODES = ("none", "weighted", "sampled")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="efficientnet-lite0", help="(default: %(default)s)")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    args = ap.parse_args()
    r = dict(HEAD_PRESETS["shipped"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            cfg = HeadTrainConfig(epochs=r["epochs"], lr=r["lr"], weight_decay=r["weight_decay"], select=r["select"],
                                  class_balance=mode)
            t0 = time.perf_counter()
            meta = train_head(brca_m2c_dir(), args.encoder, Path(tmp) / f"{mode}.safetensors", use_detector=True,
                              config=cfg, stain_norm=r["stain_norm"], stain_augment=r["stain_augment"],
                              stain_space=r["stain_space"], stain_strength=r["stain_strength"], log=lambda m: None)
            gt = meta.val_report
            rows.append({"class_balance": mode, "val_mean_class_f1_detected": meta.val_scores["mean_f1"],
                         "val_f1_detected": {c: meta.val_scores[f"f1_{c}"] for c in meta.classes},
                         "val_macro_f1_gt": gt["macro_f1"],
                         "val_recall_gt": {c: v["recall"] for c, v in gt["per_class"].items()},
                         "val_precision_gt": {c: v["precision"] for c, v in gt["per_class"].items()},
                         "temperature": meta.temperature, "ece_before": meta.calibration.get("ece_before"),
                         "ece_after": meta.calibration.get("ece_after"), "seconds": round(time.perf_counter() - t0, 1)})
            print(f"{mode:>9}: val mean class F1 at detected points {meta.val_scores['mean_f1']:.4f}, macro-F1 at GT "
                  f"points {gt['macro_f1']:.4f}, recall {rows[-1]['val_recall_gt']}")
    result = {"name": "head_class_balance", **run_info("head_class_balance.py"), "encoder": args.encoder,
              "recipe": r, "detector": "shipped", "split": "val (test not scored)", "results": rows}
    write_result("head_class_balance", result, args.report)


if __name__ == "__main__":
    main()
