"""A detector trained on several datasets at once against the shipped one, on each dataset's val split.

The joint detector is trained with ``denuc train-detector DATASET... --out RUN`` (every dataset at
its own mpp, resampled to the working mpp; the best epoch and its score threshold chosen on the
datasets' val splits together). This script scores ``RUN/best.safetensors`` and the shipped
detector on the val split of each dataset separately (denuc protocol, 3 µm): detection
precision / recall / F1 at each detector's own threshold (the one stored in its checkpoint: for
the joint run, chosen on the combined val), and, for reference, at the threshold best for that
dataset alone. No test split is read.

``--interpolate A [A ...]`` also scores detectors whose weights are interpolated between the
shipped (A = 0) and the joint one (A = 1): every float tensor (weights and batch-norm
statistics) is ``(1 - A) * shipped + A * joint`` (``RUN/interpolated-A.safetensors``). Such a
detector gets one score threshold for all datasets, chosen like the joint run's: the best
detection F1 over the datasets' val splits pooled (matches summed over the images of all).

    python benchmarks/detector_joint.py --run runs/joint --data brca-m2c consep [--interpolate 0.5] [--report]

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


def interpolate(a: Path, b: Path, alpha: float, out: Path) -> Path:
    """Write the detector ``(1 - alpha) * a + alpha * b`` (float tensors; others from ``b``) to ``out``."""
    from denuc.detect.checkpoint import save_detector

    ma, _ = load_detector(a)
    mb, meta = load_detector(b)
    sa, sb = ma.state_dict(), mb.state_dict()
    if sa.keys() != sb.keys() or any(sa[k].shape != sb[k].shape for k in sa):
        raise SystemExit(f"{a} and {b} are not the same architecture: they cannot be interpolated")
    mb.load_state_dict({k: (1 - alpha) * sa[k] + alpha * v if v.is_floating_point() else v for k, v in sb.items()})
    meta = {k: v for k, v in meta.items() if k not in ("config", "format", "version")}
    save_detector(out, mb, {**meta, "interpolated": {"alpha": alpha, "a": a.name, "b": str(b)}})
    return out


def pooled_threshold(per_dataset: list[dict[float, dict[str, float]]]) -> float:
    """The threshold with the best detection F1 over all datasets' matches pooled."""
    def f1(t: float) -> float:
        tp = sum(d[t]["tp"] for d in per_dataset)
        return 2 * tp / max(1, sum(d[t]["n_pred"] + d[t]["n_gt"] for d in per_dataset))
    return max(per_dataset[0], key=lambda t: (f1(t), -abs(t - 0.4)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="the joint training run (RUN/best.safetensors)")
    ap.add_argument("--data", nargs="+", default=["brca-m2c", "consep"],
                    help="dataset folders, or names under $DENUC_DATA (default: brca-m2c consep)")
    ap.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    ap.add_argument("--name", default="detector_joint", help="result name (default: detector_joint)")
    ap.add_argument("--interpolate", type=float, nargs="*", default=[],
                    help="also score the shipped and joint weights interpolated at these shares of the joint one "
                         "(default: none)")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    args = ap.parse_args()

    detectors = {"shipped": default_detector_path(), "joint": args.run / "best.safetensors"}
    thresholds = {k: float(load_detector(p)[0].config.score_threshold) for k, p in detectors.items()}
    for a in args.interpolate:
        if not 0 < a < 1:
            raise SystemExit(f"--interpolate {a}: give shares strictly between 0 and 1")
        detectors[f"interpolated {a:g}"] = interpolate(detectors["shipped"], detectors["joint"], a,
                                                       args.run / f"interpolated-{a:g}.safetensors")
    log = [json.loads(line) for line in (args.run / "log.jsonl").read_text().splitlines() if line.strip()] \
        if (args.run / "log.jsonl").is_file() else []
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    scores: dict[tuple[str, str], tuple[int, dict[float, dict[str, float]]]] = {}
    for name in args.data:
        folder = Path(name) if Path(name).is_dir() else shared_data_dir() / name
        ds = open_dataset(folder)
        stems = ds.stems("val")
        for det, path in detectors.items():
            scores[folder.name, det] = len(stems), val_detection(path, ds, stems, args.device)
    names = list(dict.fromkeys(d for d, _ in scores))
    for det in detectors:
        if det not in thresholds:
            thresholds[det] = pooled_threshold([scores[n, det][1] for n in names])
    for (dname, det), (n_val, sc) in scores.items():
        best = max(sc, key=lambda t: sc[t]["f1"])
        rows.append({"dataset": dname, "val_images": n_val, "detector": det,
                     "own_threshold": _at(sc, thresholds[det]),
                     "best_threshold_for_dataset": {"threshold": best, **sc[best]},
                     "f1_by_threshold": {str(t): round(v["f1"], 4) for t, v in sc.items()}})
    print(f"{'dataset':<10} {'detector':<18} {'thr':>5} {'P':>6} {'R':>6} {'F1':>6}   best-for-dataset F1 @ thr")
    for r in rows:
        o, b = r["own_threshold"], r["best_threshold_for_dataset"]
        print(f"{r['dataset']:<10} {r['detector']:<18} {o['threshold']:>5.3f} {o['precision']:>6.4f} {o['recall']:>6.4f} "
              f"{o['f1']:>6.4f}   {b['f1']:.4f} @ {b['threshold']}")
    out = {"benchmark": "detector_joint", **run_info("detector_joint.py"), "run": str(args.run), "datasets": args.data,
           "thresholds_evaluated": list(SELECT_THRESHOLDS), "detector_thresholds": thresholds,
           "training_log": log, "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    write_result(args.name, out, report=args.report)


if __name__ == "__main__":
    main()
