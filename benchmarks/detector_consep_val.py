"""Detectors on a val split (CoNSeP: 5 tiles; BRCA-M2C: 10 images): the shipped (breast-trained)
detector against a fine-tuned or jointly trained one, each at its own best score threshold on
val (0.1-0.7, the same scan ``denuc finetune`` uses to choose), denuc protocol, 3 µm.

    OMP_NUM_THREADS=1 python benchmarks/detector_consep_val.py --run runs/finetune_consep/train/detector [--report]
    OMP_NUM_THREADS=1 python benchmarks/detector_consep_val.py --data brca-m2c --run runs/det_joint_2ep --name detector_joint_brca_val

``--run`` is a ``train-detector`` / ``finetune`` detector folder (its ``best.safetensors`` and
``log.jsonl``; an unfinished run is scored at its best epoch so far, and the JSON says how many
epochs it had; with several datasets its ``val_f1`` is pooled over them). Writes
``benchmarks/results/<--name>.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from common import run_info, write_result

from denuc.data import open_dataset
from denuc.data.paths import shared_data_dir
from denuc.detect.api import default_detector_path
from denuc.train.finetune import val_detection


def best(scores: dict[float, dict[str, float]]) -> dict[str, float]:
    t = max(scores, key=lambda k: scores[k]["f1"])
    return {"threshold": t, **scores[t]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="detector run folder (required)")
    ap.add_argument("--data", default="consep", choices=["consep", "brca-m2c"],
                    help="dataset whose val split scores both detectors (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--name", default="detector_consep_val", help="JSON name (default: %(default)s)")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = open_dataset(shared_data_dir() / args.data)
    val = ds.stems("val")
    log = [json.loads(x) for x in (args.run / "log.jsonl").read_text().splitlines()]
    shipped = best(val_detection(default_detector_path(), ds, val, "cpu"))
    tuned = best(val_detection(args.run / "best.safetensors", ds, val, "cpu"))
    result = {**run_info("detector_consep_val.py", one_thread=args.threads == 1), "data": args.data,
              "val_images": len(val),
              "shipped": shipped, "fine_tuned": tuned, "epochs_trained": len(log),
              "best_epoch": max(log, key=lambda r: r.get("val_f1") or 0)["epoch"],
              "epoch_val_f1": [r.get("val_f1") for r in log]}
    print(f"{args.data} val detection F1: shipped {shipped['f1']:.4f} @ {shipped['threshold']}, fine-tuned "
          f"({len(log)} epochs) {tuned['f1']:.4f} @ {tuned['threshold']}")
    write_result(args.name, result, args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
