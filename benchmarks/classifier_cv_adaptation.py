"""Leave-one-site-out CV of two unsupervised test-time adaptations of the shipped head recipe.

The shipped linear-head recipe (Macenko normalisation + HED stain jitter 0.4 x2, wd 0.1,
30 epochs; ``classifier_site_cv_norm.json``) over-predicts lymphocytes on new sites, so two
label-free corrections were tried on the held-out site of each fold (train+val only; test
never touched):

* ``centre``: subtract each image's mean point feature (and, ``centre+scale``, divide by its
  std) before training and prediction, to remove per-image stain/scanner offsets;
* ``EM prior``: re-estimate the class priors of the held-out site (or of each image) by EM
  (Saerens et al. 2002) and re-weight the probabilities.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/classifier_cv_adaptation.py [--report]

Prints macro-F1 at GT points per fold, writes ``benchmarks/results/classifier_cv_adaptation.json``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch
from common import run_info, write_result

from denuc.data import open_dataset
from denuc.data.paths import brca_m2c_dir
from denuc.encode import build_encoder
from denuc.query import PointFeaturizer
from denuc.train.features import PointFeatures, augmented_gt_features, cached_features, concat_features
from denuc.train.head import HeadTrainConfig, fit_head, macro_f1, predict_probs
from denuc.train.site_cv import merge_features, site_groups


def centre(f: PointFeatures, scale: bool = False) -> PointFeatures:
    """Per-image standardised features (mean over that image's points removed)."""
    x = f.feats.astype(np.float32).copy()
    for i in np.unique(f.image):
        m = f.image == i
        x[m] -= x[m].mean(0)
        if scale:
            x[m] /= x[m].std(0) + 1e-3
    return replace(f, feats=x)


def em_prior(p: np.ndarray, prior: np.ndarray, iters: int = 50) -> np.ndarray:
    """Posteriors ``(N, K)`` re-weighted to the priors EM estimates for this set of points."""
    q, w = prior.copy(), p
    for _ in range(iters):
        w = p * (q / prior)
        w /= w.sum(1, keepdims=True)
        q = w.mean(0)
    return w


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    args = ap.parse_args()
    torch.set_num_threads(1)
    quiet = {"log": lambda m: None}
    ds = open_dataset(brca_m2c_dir())
    tr, va = ds.stems("train"), ds.stems("val")
    raw = PointFeaturizer(build_encoder("efficientnet-lite0"))
    fz = raw.with_stain_norm("macenko")
    pool = merge_features([cached_features(fz, ds, tr, **quiet)["gt"], cached_features(fz, ds, va, **quiet)["gt"]])
    augs = [merge_features([a, b]) for a, b in zip(
        augmented_gt_features(raw, ds, tr, 2, strength=0.4, space="hed", **quiet),
        augmented_gt_features(raw, ds, va, 2, strength=0.4, space="hed", **quiet), strict=True)]
    cfg = replace(HeadTrainConfig(), epochs=30, weight_decay=0.1)
    k = len(ds.classes)
    variants = {"none": lambda f: f, "centre": centre, "centre+scale": lambda f: centre(f, True)}
    rows = []
    for name, tf in variants.items():
        p_all, a_all = tf(pool), [tf(a) for a in augs]
        scores: dict[str, dict[str, float]] = {"plain": {}, "EM prior per site": {}, "EM prior per image": {}}
        for site, held in site_groups(p_all.stems).items():
            keep = [s for s in p_all.stems if s not in held]
            trf = concat_features([p_all.subset(keep), *[a.subset(keep) for a in a_all]])
            head, _ = fit_head(trf, k, cfg, None, **quiet)
            te = p_all.subset(held)
            known = te.labels >= 0
            p, y = predict_probs(head, te.feats[known]), te.labels[known]
            lab = trf.labels[trf.labels >= 0]
            prior = np.bincount(lab, minlength=k) / len(lab)
            per_image = np.zeros(len(y), np.int64)
            imgs = te.image[known]
            for i in np.unique(imgs):
                m = imgs == i
                per_image[m] = em_prior(p[m], prior, 20).argmax(1)
            scores["plain"][site] = macro_f1(y, p.argmax(1), k)[0]
            scores["EM prior per site"][site] = macro_f1(y, em_prior(p, prior).argmax(1), k)[0]
            scores["EM prior per image"][site] = macro_f1(y, per_image, k)[0]
        for how, folds in scores.items():
            mean = float(np.mean(list(folds.values())))
            rows.append({"features": name, "prediction": how, "folds": folds, "mean": mean})
            print(f"{name:13} {how:19} " + " ".join(f"{s}={v:.4f}" for s, v in folds.items()) + f"  mean {mean:.4f}",
                  flush=True)
    write_result("classifier_cv_adaptation", {
        "benchmark": "classifier_cv_adaptation", "metric": "macro-F1 at GT points of the held-out TCGA site",
        "recipe": "Macenko + HED stain jitter 0.4 x2 (raw), wd 0.1, 30 epochs, linear",
        **run_info("classifier_cv_adaptation.py", one_thread=True), "results": rows}, args.report)


if __name__ == "__main__":
    main()
