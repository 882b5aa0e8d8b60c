"""Head recipes for ``finetune`` scored by folds of train+val on two datasets (test never touched).

Datasets: CoNSeP (colon, 27 tiles of train+val, ``k`` folds by tile) and BRCA-M2C (breast, 90
images of train+val, leave-one-tissue-site-out, plus the official train -> val). Each candidate
(:data:`denuc.train.head_presets.HEAD_PRESETS` and variations of class balance and stain
handling) trains a linear head on cached EfficientNet-Lite0 point features (s8+s16+s32 at
0.25 µm/px) of the training folds' ground-truth points and is scored on the held-out fold:

- ``gt``: macro-F1 at the held-out fold's ground-truth points (classification alone);
- ``det``: mean class F1 at the points the shipped detector finds in the held-out fold
  (what ``denuc predict`` would give; unmatched detections count as errors).

The recipe ranking uses the mean of the two datasets' fold means. Features are extracted once
into the feature cache (``DENUC_CACHE``): per dataset a Macenko-normalised pass, a plain pass
and 2 stain-jittered passes (H&E space, strength 0.4) at the GT points, and the shipped
detector's points of every image (both normalisations).

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/finetune_recipe_cv.py [--datasets consep brca-m2c]

Prints a table, writes ``benchmarks/results/finetune_recipe_cv.json`` (``--report`` also copies
it to ``benchmarks/reported/``). ``--features-only`` fills the cache and stops.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from common import run_info, write_result

from denuc.data import open_dataset
from denuc.data.base import PointDataset
from denuc.data.paths import brca_m2c_dir, shared_data_dir
from denuc.encode import build_encoder
from denuc.evaluate.api import evaluate
from denuc.query import PointFeaturizer
from denuc.train.features import PointFeatures, augmented_gt_features, cached_features, concat_features
from denuc.train.head import HeadTrainConfig, detected_nuclei, fit_head, macro_f1, predict_probs
from denuc.train.head_presets import HEAD_PRESETS
from denuc.train.head_run import load_detector
from denuc.train.site_cv import merge_features, tcga_site

REPO = Path(__file__).resolve().parents[1]
STAIN = ("hed", 0.4, 2)  # the shipped recipe's jitter: space, strength, passes


@dataclass
class Recipe:
    """A candidate head recipe: optimisation settings plus feature options."""

    name: str
    cfg: HeadTrainConfig
    norm: str = "macenko"  # stain normaliser of the plain pass ("none" or "macenko")
    aug: int = 2  # stain-jittered passes added to training (0 = none)


def preset_cfg(name: str, **over: object) -> tuple[HeadTrainConfig, str, int]:
    p = dict(HEAD_PRESETS[name])
    norm, aug = str(p.pop("stain_norm")), int(p.pop("stain_augment"))  # type: ignore[call-overload]
    for k in ("stain_space", "stain_strength"):
        p.pop(k)
    p["select"] = "last"  # no inner val in a fold: the schedule's last epoch
    p.update(over)
    return HeadTrainConfig(**p), norm, aug  # type: ignore[arg-type]


def recipes() -> list[Recipe]:
    out = []
    for preset in HEAD_PRESETS:
        cfg, norm, aug = preset_cfg(preset)
        out.append(Recipe(f"{preset}", cfg, norm, aug))
    cfg, norm, aug = preset_cfg("shipped")
    out += [
        Recipe("shipped, class balance weighted", replace(cfg, class_balance="weighted"), norm, aug),
        Recipe("shipped, class balance sampled", replace(cfg, class_balance="sampled"), norm, aug),
        Recipe("shipped, no stain jitter", cfg, norm, 0),
        Recipe("shipped, no macenko", cfg, "none", aug),
        Recipe("shipped, wd 1e-2", replace(cfg, weight_decay=1e-2), norm, aug),
    ]
    return out


@dataclass
class Data:
    """One dataset's cached features over its train+val images."""

    name: str
    ds: PointDataset
    stems: list[str]
    folds: dict[str, list[str]]  # fold name -> held-out stems
    gt: dict[str, PointFeatures]  # norm -> GT-point features
    det: dict[str, PointFeatures]  # norm -> shipped-detector-point features
    aug: list[PointFeatures]  # stain-jittered GT passes (not normalised)
    gt_points: dict[str, object]  # stem -> Nuclei (ground truth, for det scoring)


def tile_folds(stems: list[str], k: int) -> dict[str, list[str]]:
    """``k`` folds of whole tiles, assigned round-robin in sorted (natural) order."""
    def natural(s: str) -> tuple[str, int]:
        head, _, tail = s.rpartition("_")
        return (head, int(tail)) if tail.isdigit() else (s, 0)

    order = sorted(stems, key=natural)
    return {f"fold{i}": order[i::k] for i in range(k)}


def load_data(name: str, folds_k: int, norms: tuple[str, ...], log: Callable[[str], None],
              train_val_fold: bool = True) -> Data:
    if name == "consep":
        ds = open_dataset(shared_data_dir() / "consep")
    else:
        ds = open_dataset(brca_m2c_dir())
    tr, va = ds.stems("train"), ds.stems("val")
    stems = list(tr) + list(va)
    if name == "consep":
        folds = tile_folds(stems, folds_k)
    else:
        folds = {}
        for s in stems:
            folds.setdefault(f"site {tcga_site(s)}", []).append(s)
        if train_val_fold:
            folds["train->val"] = list(va)
    enc = build_encoder("efficientnet-lite0")
    detect, det_id = load_detector(None)
    gt, det = {}, {}
    for norm in norms:
        fz = PointFeaturizer(enc, stain_norm=norm)
        parts = [cached_features(fz, ds, st, detect=detect, detector_id=det_id, log=log) for st in (tr, va)]
        gt[norm] = merge_features([p["gt"] for p in parts])
        det[norm] = merge_features([p["det"] for p in parts])
    space, strength, n = STAIN
    fz0 = PointFeaturizer(enc, stain_norm="none")
    augs = [augmented_gt_features(fz0, ds, st, n, seed=0, strength=strength, space=space, log=log) for st in (tr, va)]
    aug = [merge_features([augs[0][i], augs[1][i]]) for i in range(n)]
    pts = {}
    for s in stems:
        p = ds.points(s)
        p.mpp = ds.mpp_of(s)
        pts[s] = p
    return Data(name, ds, stems, folds, gt, det, aug, pts)


def score_recipe(d: Data, r: Recipe, log: Callable[[str], None]) -> dict[str, object]:
    k = len(d.ds.classes)
    rows = []
    for fold, held in d.folds.items():
        if fold == "train->val":
            train_stems = list(d.ds.stems("train"))
        else:
            hs = set(held)
            train_stems = [s for s in d.stems if s not in hs]
        tr = concat_features([d.gt[r.norm].subset(train_stems), *[a.subset(train_stems) for a in d.aug[:r.aug]]])
        head, _ = fit_head(tr, k, replace(r.cfg), None, log=lambda m: None, class_names=d.ds.classes)
        te = d.gt[r.norm].subset(held)
        known = te.labels >= 0
        mf1, f1s = macro_f1(te.labels[known], predict_probs(head, te.feats[known]).argmax(1), k)
        dets = detected_nuclei(head, d.det[r.norm].subset(held), d.ds.classes)
        rep = evaluate({s: d.gt_points[s] for s in held}, dets, protocol="denuc")
        rows.append({"fold": fold, "images": len(held), "gt_macro_f1": mf1,
                     "gt_class_f1": dict(zip(d.ds.classes, f1s)), "det_mean_f1": rep.mean_f1,
                     "det_f1": rep.detection.f1, "det_class_f1": {c: v.f1 for c, v in rep.classes.items()}})
        log(f"    {d.name} {r.name} {fold}: gt {mf1:.4f} det {rep.mean_f1:.4f}")
    cv = [x for x in rows if x["fold"] != "train->val"]
    out: dict[str, object] = {
        "folds": rows,
        "cv_gt_mean": float(np.mean([x["gt_macro_f1"] for x in cv])),
        "cv_gt_std": float(np.std([x["gt_macro_f1"] for x in cv])),
        "cv_det_mean": float(np.mean([x["det_mean_f1"] for x in cv])),
        "cv_det_std": float(np.std([x["det_mean_f1"] for x in cv])),
    }
    tv = [x for x in rows if x["fold"] == "train->val"]
    if tv:
        out["val_gt"] = tv[0]["gt_macro_f1"]
        out["val_det"] = tv[0]["det_mean_f1"]
    return out


def ship_head(d: Data, r: Recipe, out: Path, cv: dict[str, object], log: Callable[[str], None]) -> None:
    """Train ``r`` on every image of ``d`` (train+val) and write the head to ``out``.

    Its temperature is the median of the temperatures fitted on each held-out fold (the head of
    that fold's training images; :func:`~denuc.train.calibration.calibrate_head`), since no
    image is left to fit it on. The featurizer settings are the shipped BRCA-M2C head's (same
    encoder, taps, mpp, window, Macenko normalisation), so its metadata is copied and the
    data-specific fields replaced.
    """
    from denuc.classify.head import load_head, save_head
    from denuc.pipeline import DEFAULT_HEAD
    from denuc.train.calibration import calibrate_head

    k = len(d.ds.classes)
    temps = []
    for fold, held in d.folds.items():
        if fold == "train->val":
            continue
        hs = set(held)
        train_stems = [s for s in d.stems if s not in hs]
        tr = concat_features([d.gt[r.norm].subset(train_stems), *[a.subset(train_stems) for a in d.aug[:r.aug]]])
        head, _ = fit_head(tr, k, replace(r.cfg), None, log=lambda m: None, class_names=d.ds.classes)
        te = d.gt[r.norm].subset(held)
        t, _, _ = calibrate_head(head, te.feats, te.labels, d.ds.classes)
        temps.append(float(t))
    tr = concat_features([d.gt[r.norm], *d.aug[:r.aug]])
    head, _ = fit_head(tr, k, replace(r.cfg), None, log=log, class_names=d.ds.classes)
    head.temperature = float(np.median(temps))
    _, meta, _ = load_head(DEFAULT_HEAD)
    assert r.norm == meta.stain_norm, "the shipped head's featurizer settings are copied: same stain norm needed"
    meta.classes = list(d.ds.classes)
    meta.colors = [list(c) for c in d.ds.colors] or [[255, 0, 0], [0, 200, 0], [0, 90, 220]][:k]
    meta.val_scores = {"selection": "last epoch of a fixed schedule (not selected); scores: folds by tile of "
                                    "train+val (benchmarks/reported/finetune_recipe_cv.json)",
                       "cv_gt_macro_f1": cv["cv_gt_mean"], "cv_det_mean_f1": cv["cv_det_mean"]}
    meta.train = {**asdict(r.cfg), "dataset": d.name, "train_images": len(d.stems), "val_images": 0,
                  "stems": "train+val", "train_points": int((tr.labels >= 0).sum()), "stain_augment": r.aug,
                  "stain_strength": STAIN[1], "stain_space": STAIN[0], "recipe": r.name,
                  "class_points": {c: int((tr.labels == i).sum()) for i, c in enumerate(d.ds.classes)}}
    meta.temperature = head.temperature
    meta.calibration = {"temperature": head.temperature, "fold_temperatures": temps,
                        "source": "median of the temperatures fitted on each held-out fold's ground-truth points"}
    meta.val_report = {}
    meta.untrained_classes = []
    save_head(out, head, meta, {})
    log(f"wrote {out}: {k} classes, temperature {head.temperature:.3f} (folds {[round(t, 3) for t in temps]})")


def merge(paths: list[Path], name: str, report: bool) -> int:
    """Combine per-dataset results (JSONs of runs with one ``--datasets`` each) into one table
    and choose the recipe by the mean over the datasets of the held-out-fold mean class F1 at
    detected points (``cv_det_mean``)."""
    import json

    parts = [json.loads(p.read_text()) for p in paths]
    names = [n for n in parts[0]["recipes"]]
    rows: dict[str, dict[str, object]] = {}
    for n in names:
        row: dict[str, object] = {}
        for part in parts:
            for ds_name, v in part["recipes"].get(n, {}).items():
                if isinstance(v, dict) and "cv_det_mean" in v:
                    row[ds_name] = {k: v[k] for k in ("cv_gt_mean", "cv_gt_std", "cv_det_mean", "cv_det_std",
                                                      "val_gt", "val_det") if k in v}
        ds_names = [d for part in parts for d in part["datasets"]]
        for key in ("cv_gt_mean", "cv_det_mean"):
            row[f"both_{key}"] = (float(np.mean([row[d][key] for d in ds_names]))  # type: ignore[index]
                                  if all(d in row for d in ds_names) else None)
        rows[n] = row
    scored = [n for n in rows if rows[n]["both_cv_det_mean"] is not None]
    best = max(scored, key=lambda n: rows[n]["both_cv_det_mean"])  # type: ignore[arg-type,return-value]
    ds_names = [d for part in parts for d in part["datasets"]]

    def f(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "—"

    print(f"{'recipe':36s} " + " ".join(f"{d + ' gt':>14s} {d + ' det':>14s}" for d in ds_names)
          + "  both gt  both det")
    for n, row in rows.items():
        cells = " ".join(f"{f(row.get(d, {}).get('cv_gt_mean')):>14s} "  # type: ignore[union-attr]
                         f"{f(row.get(d, {}).get('cv_det_mean')):>14s}" for d in ds_names)  # type: ignore[union-attr]
        print(f"{n:36s} {cells}  {f(row['both_cv_gt_mean']):>7s}  {f(row['both_cv_det_mean']):>8s}"
              + ("  <- best" if n == best else ""))
    payload = {**run_info("finetune_recipe_cv.py"), "sources": [p.name for p in paths],
               "source_commands": [part["command"] for part in parts], "datasets": ds_names,
               "choice": "highest mean over the datasets of cv_det_mean (held-out folds, mean class F1 at the "
                         "shipped detector's points)", "best": best, "recipes": rows}
    write_result(name, payload, report)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["consep", "brca-m2c"], choices=["consep", "brca-m2c"],
                    help="datasets to score on (default: %(default)s)")
    ap.add_argument("--folds", type=int, default=5, help="folds by tile for CoNSeP (default: %(default)s)")
    ap.add_argument("--plain", nargs="*", default=["consep"],
                    help="datasets that also get the plain (not normalised) features, for the 'no macenko' "
                         "recipes; the others skip those recipes (default: %(default)s)")
    ap.add_argument("--no-train-val", action="store_true",
                    help="BRCA-M2C: leave-one-site-out folds only, not the extra train -> val fold (default: off)")
    ap.add_argument("--only", nargs="*", default=None, help="recipe names to run (default: all)")
    ap.add_argument("--features-only", action="store_true", help="fill the feature cache and stop")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--name", default="finetune_recipe_cv", help="JSON name (default: %(default)s)")
    ap.add_argument("--ship-head", default=None, metavar="FILE",
                    help="also train the chosen recipe (--ship-recipe) on all of the first dataset's train+val and "
                         "write the head to FILE (default: none)")
    ap.add_argument("--ship-recipe", default="shipped", help="recipe for --ship-head (default: %(default)s)")
    ap.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                    help="combine the JSONs of per-dataset runs into --name and choose there (default: off)")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.name, args.report)
    torch.set_num_threads(args.threads)
    log = print
    t0 = time.perf_counter()
    data = [load_data(n, args.folds, ("macenko", "none") if n in args.plain else ("macenko",), log,
                      train_val_fold=not args.no_train_val) for n in args.datasets]
    feat_s = time.perf_counter() - t0
    log(f"features ready in {feat_s:.0f} s")
    if args.features_only:
        return 0
    rs = [r for r in recipes() if args.only is None or r.name in args.only]
    results: dict[str, object] = {}
    for r in rs:
        res = {d.name: score_recipe(d, r, log) for d in data if r.norm in d.gt}
        res["recipe"] = {**asdict(r.cfg), "stain_norm": r.norm, "stain_augment": r.aug,
                         "stain_space": STAIN[0], "stain_strength": STAIN[1]}
        for key in ("cv_gt_mean", "cv_det_mean"):  # None where a dataset lacks the recipe's features
            res[f"both_{key}"] = (float(np.mean([res[d.name][key] for d in data]))  # type: ignore[index]
                                  if all(d.name in res for d in data) else None)
        results[r.name] = res
    scored = [n for n in results if results[n]["both_cv_det_mean"] is not None]  # type: ignore[index]
    best = max(scored, key=lambda n: results[n]["both_cv_det_mean"])  # type: ignore[index]
    print(f"\n{'recipe':44s} " + " ".join(f"{d.name + ' gt':>13s} {d.name + ' det':>13s}" for d in data)
          + "   both gt  both det")
    def f(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else "   —  "

    for n, res in results.items():
        cells = " ".join(f"{f(res.get(d.name, {}).get('cv_gt_mean')):>13s} "  # type: ignore[union-attr]
                         f"{f(res.get(d.name, {}).get('cv_det_mean')):>13s}" for d in data)  # type: ignore[union-attr]
        print(f"{n:44s} {cells}   {f(res['both_cv_gt_mean'])}   {f(res['both_cv_det_mean'])}"
              + ("  <- best" if n == best else ""))
    payload = {
        **run_info("finetune_recipe_cv.py", one_thread=True),
        "protocol": "linear head on cached efficientnet-lite0 GT-point features of the training folds; scored on "
                    "held-out folds at GT points (macro-F1) and at the shipped detector's points (mean class F1, "
                    "denuc matcher 3 µm); consep: folds by tile of train+val; brca-m2c: leave-one-site-out of "
                    "train+val (cv_*) and train->val (val_*)",
        "datasets": {d.name: {"images": len(d.stems), "folds": d.folds, "classes": list(d.ds.classes)} for d in data},
        "feature_seconds": round(feat_s, 1),
        "best_by_both_cv_det_mean": best,
        "recipes": results,
    }
    write_result(args.name, payload, args.report)
    if args.ship_head:
        r = next(x for x in rs if x.name == args.ship_recipe)
        ship_head(data[0], r, Path(args.ship_head), results[r.name][data[0].name], log)  # type: ignore[index]
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
