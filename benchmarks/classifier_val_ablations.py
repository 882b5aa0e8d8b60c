"""Val-only choices of the efficientnet-lite0 classifier on BRCA-M2C (no test data touched).

For each setting a linear head (SGD recipe, ``--epochs``) is trained on features at GT
points of ``train`` and scored by macro-F1 at GT points of ``val`` (best epoch):

* feature layers (taps s8/s16/s32/head and combinations) at 0.25 and 0.5 µm/px,
* point sampling geometry: token centres (``align_corners=False``) vs the authors'
  ``align_corners=True``, at the chosen layers and mpp.

Features are read from (or written to) the feature cache, so a second run is fast.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/classifier_val_ablations.py

Prints a table and writes ``benchmarks/results/classifier_val_ablations.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from common import run_info, write_json

from denuc.data import open_dataset
from denuc.data.paths import brca_m2c_dir
from denuc.encode import build_encoder
from denuc.encode.encoder import LITE0_DEFAULT_TAPS, LITE0_TAPS, EfficientNetLiteEncoder
from denuc.query import PointFeaturizer
from denuc.train.features import PointFeatures, cached_features
from denuc.train.head import HeadTrainConfig, fit_head, gt_scorer

REPO = Path(__file__).resolve().parents[1]
ALL_TAPS = ("s8", "s16", "s32", "head")
COMBOS = (("s8",), ("s16",), ("s32",), ("head",), ("s16", "s32"), ("s8", "s16", "s32"), ("s16", "s32", "head"),
          ALL_TAPS)


def columns(taps: tuple[str, ...]) -> np.ndarray:
    """Columns of the all-taps map (channel order s8, s16, s32, head) holding ``taps``."""
    starts = np.cumsum([0] + [LITE0_TAPS[t][1] for t in ALL_TAPS])
    return np.concatenate([np.arange(starts[ALL_TAPS.index(t)], starts[ALL_TAPS.index(t) + 1]) for t in taps])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "classifier_val_ablations.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ds = open_dataset(brca_m2c_dir())
    base = build_encoder("efficientnet-lite0")
    every = EfficientNetLiteEncoder(base.spec, base.body, _source(base), taps=ALL_TAPS)
    rows = []

    def run(enc: torch.nn.Module, mpp: float, align: str, cols: np.ndarray | None) -> dict:
        fz = PointFeaturizer(enc, mpp=mpp, align=align)  # type: ignore[arg-type]
        tr, va = (cached_features(fz, ds, ds.stems(s), log=lambda m: None)["gt"] for s in ("train", "val"))
        if cols is not None:
            tr, va = (PointFeatures(p.feats[:, cols], p.labels, p.image, p.xy, p.scores, p.stems, p.mpps)
                      for p in (tr, va))
        _, sc = fit_head(tr, len(ds.classes), HeadTrainConfig(epochs=args.epochs), gt_scorer(va, len(ds.classes)),
                         log=lambda m: None)
        return sc

    for mpp in (0.25, 0.5):
        for taps in COMBOS:
            sc = run(every, mpp, "center", columns(taps))
            rows.append({"study": "layers", "mpp": mpp, "layers": "+".join(taps), "align": "center", **sc})
            print(f"layers {'+'.join(taps):20} mpp {mpp:<5} val macro-F1 {sc['macro_f1']:.4f}", flush=True)
    for align in ("center", "corners"):
        sc = run(base, base.spec.mpp, align, None)
        rows.append({"study": "align", "mpp": base.spec.mpp, "layers": "+".join(LITE0_DEFAULT_TAPS), "align": align,
                     **sc})
        print(f"align {align:8} val macro-F1 {sc['macro_f1']:.4f}", flush=True)
    out = {"benchmark": "classifier_val_ablations", "split": "val", "metric": "macro-F1 at GT points",
           **run_info("classifier_val_ablations.py", one_thread=True), "epochs": args.epochs, "results": rows}
    write_json(args.out, out)
    return 0


def _source(enc: torch.nn.Module):  # type: ignore[no-untyped-def]
    from denuc.encode.weights import WeightsSource

    return WeightsSource(None, enc.weights_hash, enc.weights_source)  # type: ignore[arg-type]


if __name__ == "__main__":
    sys.exit(main())
