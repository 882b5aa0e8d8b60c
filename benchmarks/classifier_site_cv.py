"""Leave-one-site-out CV of linear-head recipes on BRCA-M2C train+val (test never touched).

Train (80) and val (10) images come from three TCGA tissue-source sites (A7, A8, AC); test
mostly from others, so val (same sites as train) cannot show robustness to a new site's
staining. Each recipe is trained on two sites and scored by macro-F1 at the GT points of the
third (:mod:`denuc.train.site_cv`), and also on the official split (train -> val, GT points).
Features come from the feature cache (efficientnet-lite0, s8+s16+s32, 0.25 µm/px; the
stain-jittered passes, the Macenko-normalised pass and the 0.5 µm/px all-taps features are
extracted on a first run).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/classifier_site_cv.py

Recipes named ``..., <variant>`` run the shipped recipe on another efficientnet-lite0 variant
(feature taps x working mpp, :data:`denuc.encode.specs.LITE0_VARIANTS`), e.g.
``--only "30 ep, wd 1e-1, macenko, stain hed 0.4 x2, s2-s32@0.5"``; their features are extracted
on a first run. ``--only`` runs recipes in the order given; the JSON is rewritten after each.

Prints a table, writes ``benchmarks/results/classifier_site_cv.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from common import run_info, write_json

from denuc.data import open_dataset
from denuc.data.paths import brca_m2c_dir
from denuc.encode import build_encoder
from denuc.encode.encoder import LITE0_DEFAULT_TAPS, LITE0_TAPS, EfficientNetLiteEncoder
from denuc.encode.specs import LITE0_VARIANTS
from denuc.query import PointFeaturizer
from denuc.train.features import (
    PointFeatures,
    augmented_gt_features,
    cached_features,
    concat_features,
    default_cache_dir,
)
from denuc.train.head import HeadTrainConfig, Scorer, fit_head, macro_f1, predict_probs
from denuc.train.site_cv import (
    leave_one_site_out,
    merge_features,
    site_groups,
    summarize,
)

REPO = Path(__file__).resolve().parents[1]
#: the shipped head's recipe (README), as recipe names spell it
SHIPPED_RECIPE = "30 ep, wd 1e-1, macenko, stain hed 0.4 x2"
#: tap order of the all-taps features cached by ``classifier_val_ablations.py`` (reused here).
ALL_TAPS = ("s8", "s16", "s32", "head")


def all_taps_encoder(taps: tuple[str, ...] = ALL_TAPS) -> EfficientNetLiteEncoder:
    """EfficientNet-Lite0 with the given taps (default every tap: ``ALL_TAPS`` concatenated)."""
    from denuc.encode.weights import WeightsSource

    b = build_encoder("efficientnet-lite0")
    return EfficientNetLiteEncoder(b.spec, b.body, WeightsSource(None, b.weights_hash, b.weights_source),
                                   taps=taps)


def default_tap_columns() -> np.ndarray:
    """Columns of the all-taps features that hold the default taps (s8+s16+s32)."""
    bounds = dict(zip(ALL_TAPS, np.cumsum([0] + [LITE0_TAPS[t][1] for t in ALL_TAPS])[:-1]))
    return np.concatenate([bounds[t] + np.arange(LITE0_TAPS[t][1]) for t in LITE0_DEFAULT_TAPS])


@dataclass
class Recipe:
    """One candidate: head settings plus feature options."""

    name: str
    cfg: HeadTrainConfig
    stop_epoch: int = 0  # >0: keep this epoch of the cosine run (what val selection picked for the shipped head)
    aug: tuple[str, float, int] = ("od", 0.0, 0)  # (space, strength, passes)
    multiscale: bool = False  # concatenate s8+s16+s32 features at 0.25 and 0.5 µm/px
    norm: str = "none"  # stain normaliser before encoding; the stain-jittered passes skip it (as train-head does)
    tta: int = 1  # features averaged over this many dihedral passes of each image (train-head --feature-tta)
    taps: tuple[str, ...] = ()  # efficientnet-lite0 taps other than the default s8+s16+s32
    input_stats: str = "imagenet"  # encoder input mean/std: imagenet (the spec) or lite0 (0.5/0.5, as trained)
    scales: tuple[float, ...] = ()  # extra training passes with the image magnified by each factor (nuclei look s x larger)
    variant: str = ""  # efficientnet-lite0 variant (taps + working mpp, LITE0_VARIANTS) instead of the default
    notes: dict[str, object] = field(default_factory=dict)


def recipes() -> list[Recipe]:
    base = HeadTrainConfig()
    e30 = replace(base, epochs=30)
    return [
        Recipe("shipped: 100 ep, val-picked epoch 7", base, stop_epoch=7),
        Recipe("fixed 10 ep", replace(base, epochs=10)),
        Recipe("fixed 30 ep", e30),
        Recipe("fixed 100 ep", base),
        Recipe("30 ep, wd 5e-3", replace(e30, weight_decay=5e-3)),
        Recipe("30 ep, wd 5e-2", replace(e30, weight_decay=5e-2)),
        Recipe("30 ep, lr 1e-3", replace(e30, lr=1e-3)),
        Recipe("30 ep, class-balanced", replace(e30, class_weights="auto")),
        Recipe("30 ep, wd 1e-1", replace(e30, weight_decay=1e-1)),
        Recipe("30 ep, wd 2e-1", replace(e30, weight_decay=2e-1)),
        Recipe("30 ep, stain od 0.1 x1", e30, aug=("od", 0.1, 1)),
        Recipe("30 ep, stain hed 0.2 x1", e30, aug=("hed", 0.2, 1)),
        Recipe("30 ep, wd 5e-2, stain hed 0.2 x1", replace(e30, weight_decay=5e-2), aug=("hed", 0.2, 1)),
        Recipe("30 ep, wd 5e-2, stain hed 0.2 x2", replace(e30, weight_decay=5e-2), aug=("hed", 0.2, 2)),
        Recipe("30 ep, wd 1e-1, stain hed 0.2 x2", replace(e30, weight_decay=1e-1), aug=("hed", 0.2, 2)),
        Recipe("10 ep, wd 5e-2, stain hed 0.2 x2", replace(base, epochs=10, weight_decay=5e-2), aug=("hed", 0.2, 2)),
        Recipe("30 ep, wd 5e-2, stain od 0.1 x2", replace(e30, weight_decay=5e-2), aug=("od", 0.1, 2)),
        Recipe("30 ep, wd 5e-2, stain hed 0.4 x1", replace(e30, weight_decay=5e-2), aug=("hed", 0.4, 1)),
        Recipe("30 ep, wd 5e-2, stain hed 0.4 x2", replace(e30, weight_decay=5e-2), aug=("hed", 0.4, 2)),
        Recipe("30 ep, wd 1e-1, stain hed 0.4 x2", replace(e30, weight_decay=1e-1), aug=("hed", 0.4, 2)),
        Recipe("30 ep, wd 5e-2, stain hed 0.6 x1", replace(e30, weight_decay=5e-2), aug=("hed", 0.6, 1)),
        Recipe("30 ep, multi-scale 0.25+0.5", e30, multiscale=True),
        Recipe("30 ep, wd 1e-1, macenko", replace(e30, weight_decay=1e-1), norm="macenko"),
        Recipe("30 ep, wd 1e-2, macenko", replace(e30, weight_decay=1e-2), norm="macenko"),
        Recipe("30 ep, wd 1e-1, macenko, stain hed 0.4 x2", replace(e30, weight_decay=1e-1), aug=("hed", 0.4, 2),
               norm="macenko"),
        Recipe("30 ep, wd 1e-2, macenko, stain hed 0.4 x2", replace(e30, weight_decay=1e-2), aug=("hed", 0.4, 2),
               norm="macenko"),
        Recipe("30 ep, wd 1e-1, macenko, stain hed 0.6 x2", replace(e30, weight_decay=1e-1), aug=("hed", 0.6, 2),
               norm="macenko"),
        Recipe("30 ep, wd 1e-1, macenko, stain hed 0.4 x4", replace(e30, weight_decay=1e-1), aug=("hed", 0.4, 4),
               norm="macenko"),
        Recipe("30 ep, wd 5e-2, multi-scale 0.25+0.5", replace(e30, weight_decay=5e-2), multiscale=True),
        Recipe("30 ep, wd 1e-1, macenko, rot4 features", replace(e30, weight_decay=1e-1), norm="macenko", tta=4),
        Recipe("30 ep, wd 1e-1, macenko, stain hed 0.4 x2, rot4 features", replace(e30, weight_decay=1e-1),
               aug=("hed", 0.4, 2), norm="macenko", tta=4),
        *[Recipe(f"30 ep, wd 1e-1, macenko, stain hed 0.4 x2, taps {'+'.join(t)}", replace(e30, weight_decay=1e-1),
                 aug=("hed", 0.4, 2), norm="macenko", taps=t)
          for t in (("s16", "s32"), ("s8", "s16", "s32", "head"), ("s16", "s32", "head"))],
        Recipe("30 ep, wd 1e-1, macenko, stain hed 0.4 x2, lite0 input stats", replace(e30, weight_decay=1e-1),
               aug=("hed", 0.4, 2), norm="macenko", input_stats="lite0"),
        Recipe("30 ep, wd 1e-1, macenko, stain hed 0.4 x2, scale 0.8+1.25", replace(e30, weight_decay=1e-1),
               aug=("hed", 0.4, 2), norm="macenko", scales=(0.8, 1.25)),
        Recipe("30 ep, wd 1e-1, macenko, stain hed 0.4 x2, scale 0.9+1.1", replace(e30, weight_decay=1e-1),
               aug=("hed", 0.4, 2), norm="macenko", scales=(0.9, 1.1)),
        Recipe("30 ep, wd 1e-1, macenko, scale 0.8+1.25", replace(e30, weight_decay=1e-1), norm="macenko",
               scales=(0.8, 1.25)),
        # the shipped recipe over taps x working mpp (the variants of efficientnet-lite0)
        *[Recipe(f"{SHIPPED_RECIPE}, {v}", replace(e30, weight_decay=1e-1), aug=("hed", 0.4, 2), norm="macenko",
                 variant=v) for v in LITE0_VARIANTS],
        *[Recipe(f"30 ep, wd {wd:g}, macenko, stain hed 0.4 x2, {v}", replace(e30, weight_decay=wd),
                 aug=("hed", 0.4, 2), norm="macenko", variant=v)
          for v in LITE0_VARIANTS for wd in (0.03, 0.3)],
    ]


def stop_at(epoch: int) -> Scorer:
    """A 'scorer' that selects exactly ``epoch`` (1-based) of the run."""
    seen = {"n": 0}

    def score(head: torch.nn.Module) -> dict[str, float]:
        seen["n"] += 1
        return {"select": 1.0 if seen["n"] == epoch else 0.0}

    return score


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="recipe names to run (default all)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "classifier_site_cv.json")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = open_dataset(brca_m2c_dir())
    k = len(ds.classes)
    train, val = ds.stems("train"), ds.stems("val")
    fz = PointFeaturizer(build_encoder("efficientnet-lite0"))
    plain_cache: dict[str, PointFeatures] = {}

    def plain() -> dict[str, PointFeatures]:
        """Default-encoder features without normalisation (extracted on first use)."""
        if not plain_cache:
            plain_cache.update({sp: cached_features(fz, ds, st)["gt"] for sp, st in (("train", train), ("val", val))})
        return plain_cache

    def features(r: Recipe) -> tuple[dict[str, PointFeatures], dict[str, list[PointFeatures]]]:
        if r.multiscale:
            every, cols = all_taps_encoder(), default_tap_columns()
            out = {}
            for sp, st in (("train", train), ("val", val)):
                a, b = (cached_features(PointFeaturizer(every, mpp=m), ds, st)["gt"] for m in (0.25, 0.5))
                assert np.array_equal(a.labels, b.labels)
                out[sp] = replace(a, feats=np.concatenate([a.feats[:, cols], b.feats[:, cols]], 1))
            return out, {"train": [], "val": []}
        space, strength, n = r.aug
        enc = (build_encoder("efficientnet-lite0", variant=r.variant) if r.variant
               else all_taps_encoder(r.taps) if r.taps else fz.encoder)
        cache = None
        if r.input_stats == "lite0":  # same name and weights, other input normalisation: own cache folder
            from denuc.encode.weights import WeightsSource
            from denuc.models.efficientnet_lite import LITE0_MEAN, LITE0_STD

            enc = EfficientNetLiteEncoder(enc.spec.with_(mean=LITE0_MEAN, std=LITE0_STD), enc.body,
                                          WeightsSource(None, enc.weights_hash, enc.weights_source), taps=enc.taps)
            cache = default_cache_dir() / "lite0-input-stats"
        fr = fz if r.tta == 1 and enc is fz.encoder else PointFeaturizer(enc, feature_tta=r.tta)  # mpp: the spec's
        augs = {sp: augmented_gt_features(fr, ds, st, n, strength=strength, space=space, cache_dir=cache) if n else []
                for sp, st in (("train", train), ("val", val))}
        for m in r.scales:  # same images, resampled to mpp / m before encoding
            sz = PointFeaturizer(fr.encoder, mpp=fr.mpp / m, feature_tta=r.tta, stain_norm=r.norm)
            for sp, st in (("train", train), ("val", val)):
                augs[sp].append(cached_features(sz, ds, st)["gt"])
        if r.norm != "none":
            nz = fr.with_stain_norm(r.norm)
            return {sp: cached_features(nz, ds, st, cache_dir=cache)["gt"] for sp, st in (("train", train), ("val", val))}, augs
        if fr is fz:
            return plain(), augs
        return {sp: cached_features(fr, ds, st, cache_dir=cache)["gt"] for sp, st in (("train", train), ("val", val))}, augs

    rows: list[dict] = []

    def write_rows(rows: list[dict]) -> None:
        """Print the table and write the JSON (after every recipe, so a long run keeps what it has)."""
        print(f"\nleave-one-site-out macro-F1 at GT points (sites: "
              f"{ {s: len(v) for s, v in site_groups(train + val).items()} } images)")
        print(f"{'recipe':36} {'CV mean':>8} {'± std':>7} {'worst':>7} {'val':>7}")
        for row in rows:
            c = row["site_cv"]
            print(f"{row['recipe']:36} {c['mean']:8.4f} {c['std']:7.4f} {c['min']:7.4f} "
                  f"{row['official_val_macro_f1']:7.4f}")
        out = {"benchmark": "classifier_site_cv", "metric": "macro-F1 at GT points of the held-out TCGA site",
               "pool": "train+val (90 images)", "sites": {s: len(v) for s, v in site_groups(train + val).items()},
               "encoder": "efficientnet-lite0", "feature_layers": "+".join(LITE0_DEFAULT_TAPS), "mpp": fz.mpp,
               **run_info("classifier_site_cv.py", one_thread=args.threads == 1), "cpu_threads": args.threads,
               "results": rows}
        write_json(args.out, out)

    by_name = {r.name: r for r in recipes()}
    unknown = [n for n in args.only or [] if n not in by_name]
    if unknown:
        ap.error(f"unknown recipes {unknown}")
    todo = [by_name[n] for n in args.only] if args.only is not None else list(by_name.values())  # in the order given
    for r in todo:
        t0 = time.perf_counter()
        f, augs = features(r)
        pool = merge_features([f["train"], f["val"]])
        pool_aug = [merge_features([a, b]) for a, b in zip(augs["train"], augs["val"])]
        mk = (lambda e=r.stop_epoch: stop_at(e)) if r.stop_epoch else None
        folds = leave_one_site_out(pool, k, r.cfg, aug=pool_aug, make_scorer=mk)
        head, _ = fit_head(concat_features([f["train"], *augs["train"]]), k, r.cfg, mk() if mk else None,
                           log=lambda m: None)
        known = f["val"].labels >= 0
        vpred = predict_probs(head, f["val"].feats[known]).argmax(1)
        vf1, _ = macro_f1(f["val"].labels[known], vpred, k)
        s = summarize(folds)
        rows.append({"recipe": r.name, "train": asdict(r.cfg), "stop_epoch": r.stop_epoch,
                     "stain_augment": {"space": r.aug[0], "strength": r.aug[1], "passes": r.aug[2]},
                     "multiscale": r.multiscale, "stain_norm": r.norm, "feature_tta": r.tta,
                     "input_stats": r.input_stats,
                     "taps": list(LITE0_VARIANTS[r.variant].taps if r.variant else r.taps or LITE0_DEFAULT_TAPS),
                     "variant": r.variant, "mpp": LITE0_VARIANTS[r.variant].mpp if r.variant else 0.25,
                     "scales": list(r.scales), "site_cv": s, "folds": [asdict(x) for x in folds],
                     "official_val_macro_f1": vf1, "seconds": round(time.perf_counter() - t0, 1)})
        write_rows(rows)
        print(f"{r.name:36} [{time.perf_counter() - t0:.0f} s] " + " ".join(f"{x.site}={x.macro_f1:.4f}" for x in folds)
              + f"  mean {s['mean']:.4f} ± {s['std']:.4f}  val {vf1:.4f}", flush=True)
    write_rows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
