"""Copy a trained detector checkpoint to ``src/denuc/assets/detector.safetensors`` (the
shipped default), optionally with the score threshold re-chosen on val by
``detector_brca.py --retune`` (read from its result JSON).

    python benchmarks/detector_ship.py runs/X/best.safetensors [--result benchmarks/results/detector_brca_X.json]
        [--tta-result benchmarks/results/detector_brca_X_tta8.json ...]

``--tta-result`` adds the val-chosen thresholds of further ``detector_brca.py`` runs of the same
checkpoint whose main pass count is > 1 (e.g. ``--tta 8``), so ``Detector.load(tta=8)`` uses them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from denuc.core.files import portable_meta
from denuc.detect.api import default_detector_path
from denuc.detect.checkpoint import load_detector, save_detector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--result", type=Path, default=None, help="detector_brca JSON whose val-chosen threshold to use")
    ap.add_argument("--tta-result", type=Path, nargs="*", default=[],
                    help="detector_brca JSONs of the same checkpoint run with --tta N (N > 1) first: their "
                         "val-chosen thresholds are stored for N")
    args = ap.parse_args()
    if args.tta_result and args.result is None:
        raise SystemExit("--tta-result needs --result (the one-pass run whose threshold is the default)")
    model, meta = load_detector(args.checkpoint)
    if args.result is not None:
        res = json.loads(args.result.read_text())
        model.config.score_threshold = float(res["score_threshold"])
        meta["val_threshold"] = float(res["score_threshold"])
        meta["val_f1"] = res["f1"]["val"]["f1"]
        meta["benchmark"] = {k: res[k] for k in ("name", "command", "threshold_retuned_on_val") if k in res}
        if res.get("tta", 1) != 1:
            raise SystemExit(f"{args.result}: its main threshold is for tta x{res['tta']}; ship from a run "
                             "of detector_brca.py whose first --tta is 1")
        tta = {k: float(v["score_threshold"]) for k, v in (res.get("tta_results") or {}).items()}
        for extra in args.tta_result:
            r = json.loads(extra.read_text())
            if r.get("checkpoint") != res.get("checkpoint") or r.get("tta", 1) == 1:
                raise SystemExit(f"{extra}: not a --tta N (N > 1) run of {res.get('checkpoint')}")
            tta[str(r["tta"])] = float(r["score_threshold"])
            tta.update({k: float(v["score_threshold"]) for k, v in (r.get("tta_results") or {}).items() if k != "1"})
        if tta:
            meta["tta_thresholds"] = dict(sorted(tta.items(), key=lambda kv: int(kv[0])))  # val-chosen, per pass count
    meta["source_checkpoint"] = str(args.checkpoint)
    meta = portable_meta({k: v for k, v in meta.items() if k not in ("format", "version", "config")})
    dst = default_detector_path()
    save_detector(dst, model, meta)
    print(f"shipped {args.checkpoint} -> {dst} (threshold {model.config.score_threshold}, "
          f"{dst.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
