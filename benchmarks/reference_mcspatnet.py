"""Score the published MCSpatNet predictions on the BRCA-M2C test split (a check of the metric code).

Converts ``reference_predictions_mcspatnet/points/<stem>_pred_class_coords.txt`` (``y x class``)
into a ``<stem>.csv`` prediction folder (``runs/reference_mcspatnet/preds``), then runs
:func:`denuc.evaluate.evaluate` on it with the ``mcspatnet`` (GT-driven greedy, strict) and
``hungarian`` (optimal, inclusive) protocols at several radii (px at 0.5 µm/px).

    .venv/bin/python benchmarks/reference_mcspatnet.py [--radii 3 4 5 6 8]

Prints a table and writes ``benchmarks/results/reference_mcspatnet.json``. Compare with the
values in ``reference_predictions_mcspatnet/README.md``.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

from common import write_json

from denuc.data.paths import brca_m2c_dir
from denuc.evaluate import evaluate
from denuc.evaluate.predictions import convert_yxc_predictions

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--radii", type=float, nargs="+", default=[3, 4, 5, 6, 8])
    ap.add_argument("--protocols", nargs="+", default=["mcspatnet", "hungarian"])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "reference_mcspatnet.json")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "reference_mcspatnet" / "preds")
    args = ap.parse_args()

    data = brca_m2c_dir()
    src = data / "reference_predictions_mcspatnet" / "points"
    written = convert_yxc_predictions(src, args.work)
    print(f"converted {len(written)} prediction files -> {args.work}")

    rows = []
    t0 = time.perf_counter()
    for proto in args.protocols:
        for r in args.radii:
            rep = evaluate(data, args.work, protocol=proto, radius_px=r, split="test")
            d = rep.to_dict(per_image=False)
            rows.append(d)
    elapsed = time.perf_counter() - t0

    classes = list(rows[0]["classes"])
    head = f"{'protocol':10} {'r px':>5} {'det F1':>7} " + " ".join(f"{c[:9]:>9}" for c in classes) + f" {'mean F1':>8}"
    print(head)
    for d in rows:
        print(f"{d['protocol']:10} {d['radius_px']:5g} {d['detection']['f1']:7.3f} "
              + " ".join(f"{d['classes'][c]['f1']:9.3f}" for c in classes) + f" {d['mean_f1']:8.3f}")
    print(f"n_pred {rows[0]['detection']['n_pred']}, n_gt {rows[0]['detection']['n_gt']}, "
          f"{len(rows)} evaluations in {elapsed:.2f} s")
    out = {"benchmark": "reference_mcspatnet", "split": "test", "data": str(src),
           "command": "python benchmarks/reference_mcspatnet.py", "python": platform.python_version(),
           "seconds": elapsed, "results": rows}
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
