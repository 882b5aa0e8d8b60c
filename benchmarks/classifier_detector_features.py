"""Do the detector's own features help the classifier? A val-only probe on BRCA-M2C.

The shipped detector (class-agnostic, trained on BRCA-M2C train) has a PAN neck whose
stride-8/16/32 maps describe every nucleus it finds. This script samples those maps at the
ground-truth points (bilinear, token-centre geometry), and trains the linear head (SGD,
weight decay 0.1, 30 epochs, epoch chosen on val) on the encoder's features, the detector's,
and both concatenated; it prints val macro F1 at GT points for each. The train and val
images come from three tissue-source sites and the test images mostly from others, and
leave-one-site-out CV cannot judge the detector's features fairly (the detector was trained
on the images of every training site). ``--test`` therefore also scores each variant once on
test the way the shipped head is scored: epoch chosen by mean class F1 at the shipped
detector's val detections, mean class F1 at its test detections (denuc protocol, 3 µm).

    python benchmarks/classifier_detector_features.py [--threads 2] [--test] [--report]

Writes ``benchmarks/results/classifier_detector_features.json``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import run_info, write_result

from denuc.data.base import open_dataset
from denuc.data.paths import brca_m2c_dir
from denuc.data.resample import resample, resample_factor
from denuc.detect.api import Detector
from denuc.detect.model import normalise
from denuc.encode import build_encoder
from denuc.query import PointFeaturizer
from denuc.train.features import PointFeatures, cached_features
from denuc.train.head import HeadTrainConfig, det_scorer, detected_nuclei, fit_head, gt_scorer


def detector_features(det: Detector, ds, pf: PointFeatures) -> np.ndarray:  # type: ignore[no-untyped-def]
    """``(N, C)`` neck features of ``det`` at the points of ``pf`` (all three strides concatenated;
    each image encoded whole at the detector's mpp, padded to a multiple of 32)."""
    m = det.model
    out: np.ndarray | None = None
    for i, stem in enumerate(pf.stems):
        sel = np.flatnonzero(pf.image == i)
        f = resample_factor(pf.mpps[i], det.mpp)
        x = normalise(resample(ds.read_image(stem), f), m.config.mean, m.config.std)
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % 32, 0, (-h) % 32))
        with torch.inference_mode():
            maps = m.neck(m.backbone(x))
        xy = torch.from_numpy(pf.xy[sel] * f).float()
        ph, pw = x.shape[-2:]  # every map covers the padded image exactly: one normalisation for all
        g = torch.stack([2 * xy[:, 0] / pw - 1, 2 * xy[:, 1] / ph - 1], 1).view(1, 1, -1, 2)
        v = torch.cat([F.grid_sample(q, g, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T
                       for q in maps], 1).numpy()
        if out is None:
            out = np.zeros((len(pf), v.shape[1]), np.float32)
        out[sel] = v
    assert out is not None
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--stain-norm", default="macenko")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--test", action="store_true", help="also select at val detections and score test detections once")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = open_dataset(brca_m2c_dir())
    fz = PointFeaturizer(build_encoder(args.encoder), stain_norm=args.stain_norm)
    t0 = time.perf_counter()
    tr = cached_features(fz, ds, ds.stems("train"), log=lambda m: None)["gt"]
    va = cached_features(fz, ds, ds.stems("val"), log=lambda m: None)["gt"]
    det = Detector.load(device="cpu")
    dtr, dva = detector_features(det, ds, tr), detector_features(det, ds, va)
    print(f"features: encoder {tr.feats.shape[1]}, detector {dtr.shape[1]} ({time.perf_counter() - t0:.0f} s)")
    cfg = HeadTrainConfig(epochs=args.epochs, weight_decay=args.weight_decay)
    n = len(ds.classes)
    enc_tr, enc_va = tr.feats.astype(np.float32), va.feats.astype(np.float32)
    def pf(src: PointFeatures, feats: np.ndarray) -> PointFeatures:
        return PointFeatures(feats.astype(np.float16), src.labels, src.image, src.xy, src.scores, src.stems, src.mpps)

    def variants(enc_f: np.ndarray, det_f: np.ndarray) -> dict[str, np.ndarray]:
        return {"encoder": enc_f, "detector": det_f, "encoder + detector": np.hstack([enc_f, det_f])}

    if args.test:  # the shipped detector's val and test detections, with both kinds of features
        from denuc.evaluate.api import evaluate
        from denuc.train.head_run import load_detector

        detect, ident = load_detector(None, "cpu")
        dets = {sp: cached_features(fz, ds, ds.stems(sp), gt=False, detect=detect, detector_id=ident,
                                    log=lambda m: None)["det"] for sp in ("val", "test")}
        dfeat = {sp: detector_features(det, ds, d) for sp, d in dets.items()}
        gt_val = {s: ds.load(s).points for s in ds.stems("val")}
    rows = []
    for name, a in variants(enc_tr, dtr).items():
        b = variants(enc_va, dva)[name]
        _, met = fit_head(pf(tr, a), n, cfg, gt_scorer(pf(va, b), n), log=lambda m: None)
        row = {"features": name, "dim": int(a.shape[1]), "val_macro_f1_gt": round(met["macro_f1"], 4),
               "val_accuracy_gt": round(met["accuracy"], 4), "epoch": met["epoch"]}
        if args.test:
            v = {sp: pf(dets[sp], variants(dets[sp].feats.astype(np.float32), dfeat[sp])[name]) for sp in dets}
            head, met = fit_head(pf(tr, a), n, cfg, det_scorer(v["val"], gt_val, ds.classes), log=lambda m: None)
            rep = evaluate(ds, detected_nuclei(head, v["test"], ds.classes), split="test", protocol="denuc",
                           radius_um=3.0)
            row.update(val_mean_class_f1_det=round(met["mean_f1"], 4), epoch_det=met["epoch"],
                       test_mean_class_f1=round(rep.mean_f1, 4),
                       test_class_f1={c: round(r.f1, 4) for c, r in rep.classes.items()})
        rows.append(row)
    print(f"{'features':20} {'dim':>5} {'val macro F1 (GT points)':>25} {'accuracy':>9}"
          + (f" {'val mean class F1 (det)':>24} {'test mean class F1':>19}" if args.test else ""))
    for r in rows:
        print(f"{r['features']:20} {r['dim']:5d} {r['val_macro_f1_gt']:25.4f} {r['val_accuracy_gt']:9.4f}"
              + (f" {r['val_mean_class_f1_det']:24.4f} {r['test_mean_class_f1']:19.4f}" if args.test else ""))
    write_result("classifier_detector_features", {
        "benchmark": "classifier_detector_features", **run_info("classifier_detector_features.py"),
        "encoder": args.encoder, "stain_norm": args.stain_norm, "detector": "shipped",
        "head": {"epochs": args.epochs, "weight_decay": args.weight_decay},
        "splits": ["val", "test"] if args.test else ["val"], "rows": rows},
        args.report)


if __name__ == "__main__":
    main()
