"""A detector trained on several datasets at once against the shipped one, on each dataset's val split.

The joint detector is trained with ``denuc train-detector DATASET... --out RUN`` (every dataset at
its own mpp, resampled to the working mpp; the best epoch and its score threshold chosen on the
datasets' val splits together). This script scores ``RUN/best.safetensors`` and the shipped
detector on the val split of each dataset separately (denuc protocol, 3 µm): detection
precision / recall / F1 at each detector's own threshold (the one stored in its checkpoint: for
the joint run, chosen on the combined val), and, for reference, at the threshold best for that
dataset alone. No test split is read.

    python benchmarks/detector_joint.py --run runs/joint --data brca-m2c consep [--report]

Prints a table and writes ``benchmarks/results/<name>.json`` (default ``detector_joint``);
``--report`` also copies it to ``benchmarks/reported/``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common import run_info, write_result

from denuc.data.base import open_dataset
from denuc.data.paths import shared_data_dir
from denuc.detect.api import default_detector_path
from denuc.detect.checkpoint import load_detector
from denuc.train.finetune import SELECT_THRESHOLDS, val_detection


def _at(scores: dict[float, dict[str, float]], thr: float) -> dict[str, Any]:
    """Scores at the evaluated threshold nearest ``thr``."""
    t = min(scores, key=lambda k: abs(k - thr))
    return {"threshold": t, **scores[t]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the joint training run (RUN/best.safetensors)")
    ap.add_argument("--data", nargs="+", default=["brca-m2c", "consep"],
                    help="dataset folders, or names under $DENUC_DATA (default: brca-m2c consep)")
    ap.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ap.add_argument("--name", default="detector_joint", help="result name (default: detector_joint)")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    args = ap.parse_args()

    detectors = {"shipped": default_detector_path(), "joint": args.run / "best.safetensors"}
    thresholds = {k: float(load_detector(p)[0].config.score_threshold) for k, p in detectors.items()}
    log = [json.loads(line) for line in (args.run / "log.jsonl").read_text().splitlines() if line.strip()] \
        if (args.run / "log.jsonl").is_file() else []
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for name in args.data:
        folder = Path(name) if Path(name).is_dir() else shared_data_dir() / name
        ds = open_dataset(folder)
        stems = ds.stems("val")
        for det, path in detectors.items():
            sc = val_detection(path, ds, stems, args.device)
            best = max(sc, key=lambda t: sc[t]["f1"])
            rows.append({"dataset": folder.name, "val_images": len(stems), "detector": det,
                         "own_threshold": _at(sc, thresholds[det]), "best_threshold_for_dataset": {"threshold": best, **sc[best]},
                         "f1_by_threshold": {str(t): round(v["f1"], 4) for t, v in sc.items()}})
    print(f"{'dataset':<10} {'detector':<8} {'thr':>5} {'P':>6} {'R':>6} {'F1':>6}   best-for-dataset F1 @ thr")
    for r in rows:
        o, b = r["own_threshold"], r["best_threshold_for_dataset"]
        print(f"{r['dataset']:<10} {r['detector']:<8} {o['threshold']:>5.3f} {o['precision']:>6.4f} {o['recall']:>6.4f} "
              f"{o['f1']:>6.4f}   {b['f1']:.4f} @ {b['threshold']}")
    out = {"benchmark": "detector_joint", **run_info("detector_joint.py"), "run": str(args.run), "datasets": args.data,
           "thresholds_evaluated": list(SELECT_THRESHOLDS), "detector_thresholds": thresholds,
           "training_log": log, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    write_result(args.name, out, report=args.report)


if __name__ == "__main__":
    main()
