"""Matcher (cheapest vs hungarian) and head-activation comparison on BRCA-M2C val, from
training runs that differ only in ``--matcher`` / ``--head-activation`` (val only; test is
not touched).

    denuc train-detector <brca-m2c> --out runs/det_matcher_cheapest --matcher cheapest \\
        --preset quick --backbone shufflenetv2_1.0x --work-mpp 0.5 --epochs 10
    (same with --matcher hungarian, and with --head-activation none), then
    python benchmarks/detector_matchers.py runs/det_matcher_cheapest runs/det_matcher_hungarian runs/det_headact_none
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import write_result

from denuc.detect.checkpoint import read_meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    rows = []
    for run in args.runs:
        log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
        meta = read_meta(run / "best.safetensors")
        best = max(log, key=lambda r: r["val_f1"])
        rows.append({"run": str(run), "matcher": meta["config"]["matcher"],
                     "head_activation": meta["config"]["head_activation"], "backbone": meta["config"]["backbone"],
                     "mpp": meta["mpp"], "epochs": meta["train"]["epochs"], "best_epoch": best["epoch"],
                     "best_val_f1": best["val_f1"], "val_threshold": best["val_threshold"],
                     "final_val_f1": log[-1]["val_f1"], "val_f1_per_epoch": [r["val_f1"] for r in log],
                     "cpu_train_s": round(sum(r["train_s"] for r in log), 1)})
    print(f"{'matcher':10} {'head act':10} {'backbone':18} {'mpp':>5} {'epochs':>6} {'best val F1':>11} {'@epoch':>6} {'final':>6}")
    for r in rows:
        print(f"{r['matcher']:10} {r['head_activation']:10} {r['backbone']:18} {r['mpp']:5} {r['epochs']:6d} {r['best_val_f1']:11.4f} "
              f"{r['best_epoch']:6d} {r['final_val_f1']:6.4f}")
    write_result("detector_matchers", {"split": "val", "protocol": "denuc", "radius_um": 3.0, "rows": rows,
                                       "command": "python benchmarks/detector_matchers.py " +
                                       " ".join(str(r) for r in args.runs)}, args.report)


if __name__ == "__main__":
    main()
