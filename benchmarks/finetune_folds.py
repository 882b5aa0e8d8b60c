"""Whole ``denuc finetune`` recipes (detector and head) scored by folds of CoNSeP train + val.

The recipe search of ``finetune_recipe_cv.py`` trains heads only, on the shipped detector's
points. This script runs the whole command as a user would, once per fold and recipe, and
scores the finished model on tiles it never saw:

- CoNSeP train + val (27 tiles) are cut into ``--folds`` folds of whole tiles (round-robin in
  natural order, as in ``finetune_recipe_cv.py``); the official test tiles are never read.
- Per fold, a dataset folder is written under ``runs/finetune_folds/`` (``dataset.yaml`` and
  symbolic links to the images and point files, nothing copied): its ``train`` split is the
  other folds' tiles of the official train split, its ``val`` split the other folds' tiles of
  the official val split (what ``finetune`` chooses epochs and thresholds on); the held-out
  fold is not in it.
- Each recipe is one ``denuc finetune DATA --out MODEL --threads N [recipe options]`` process,
  then one ``denuc predict <held-out tiles> --mpp 0.5 --model MODEL --format csv`` process;
  the CSVs are scored with :func:`denuc.evaluate` (denuc protocol, 3 µm): detection F1 and
  mean class F1 at the detected points.
- For reference the shipped ``consep`` model is run on the same held-out tiles (its detector
  never saw colon; its head was trained on all 27 tiles, so its class F1 here is optimistic).

Recipes (``--recipes``):

- ``default``: ``finetune``'s defaults (detector 10 epochs at lr 3e-4, best epoch on val; head
  recipe ``auto``: the shipped and the paper recipe both trained, the better on the fold's val
  split kept);
- ``shipped-head``: the defaults with ``--head-preset shipped`` (the shipped head's recipe
  alone: ``finetune``'s default before ``auto``);
- ``paper-head``: the defaults with ``--head-preset paper`` (the paper's linear probe alone,
  the previous release's ``train-head`` default);
- ``hand-detector``: the hand recipe's detector schedule (12 epochs at lr 5e-4 from the shipped
  detector at 0.25 µm/px, through the same command, so epoch and threshold are chosen on the
  fold's val split as well) with the shipped head recipe;
- ``hand``: the whole hand recipe: that detector schedule with the previous release's default
  head (``--head-preset paper``).

A recipe that differs from another only in head options (``REUSE``) starts from a copy of that
recipe's finished run: ``denuc finetune --overwrite`` then keeps its detector stages (same
settings) and trains only the head, which saves the 3-5 min detector per fold and gives both
recipes the very same detector. Its ``finetune_wall_s`` then times the head and report stages
only (``detector_from`` in its row says so).

Finished runs are kept (``runs/finetune_folds/<fold>/<recipe>``, with their scores in
``score.json``), so rerunning the command resumes where it stopped; ``--rescore`` scores the
finished runs again with today's ``denuc predict`` (so rows made at different times are scored
by the same code).

    python benchmarks/finetune_folds.py [--folds 3] [--recipes ...] [--threads 2] [--report]

Prints a table, writes ``benchmarks/results/<name>.json`` (default ``finetune_folds``);
``--report`` also copies it to ``benchmarks/reported/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import run_info, write_result
from finetune_recipe_cv import tile_folds

from denuc.core.result import Nuclei
from denuc.data.base import open_dataset
from denuc.data.paths import shared_data_dir
from denuc.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "finetune_folds"
CLI = "import sys; from denuc.cli import main; sys.exit(main(sys.argv[1:]))"
RECIPES: dict[str, list[str]] = {
    "shipped-head": ["--head-preset", "shipped"],
    "hand-detector": ["--epochs", "12", "--lr", "5e-4", "--head-preset", "shipped"],
    "paper-head": ["--head-preset", "paper"],
    "default": [],
    "hand": ["--epochs", "12", "--lr", "5e-4", "--head-preset", "paper"],
}
#: recipe -> the recipe whose finished run (same detector settings) it starts from
REUSE = {"paper-head": "shipped-head", "default": "shipped-head", "hand": "hand-detector"}


def head_preset(recipe: str) -> str:
    """The ``--head-preset`` of a recipe (``auto`` when it does not give one)."""
    opts = RECIPES[recipe]
    return opts[opts.index("--head-preset") + 1] if "--head-preset" in opts else "auto"


def fold_dataset(src: Path, ds: Any, train: list[str], val: list[str], dest: Path) -> Path:
    """A generic-layout dataset at ``dest``: links to ``src``'s images and point files."""
    for sub in ("images", "points"):
        (dest / sub).mkdir(parents=True, exist_ok=True)
    for s in [*train, *val]:
        img = ds.image_path(s)
        pts = next((src / "points").glob(f"{s}.*"))
        for f, sub in ((img, "images"), (pts, "points")):
            link = dest / sub / f.name
            if not link.is_symlink():
                link.symlink_to(f.resolve())
    classes = ", ".join(ds.classes)
    (dest / "dataset.yaml").write_text(
        f"mpp: {ds.mpp_of(train[0])}\nclasses: [{classes}]\nsplits:\n  train: [{', '.join(train)}]\n  val: [{', '.join(val)}]\n")
    return dest


def run(argv: list[str], threads: int) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", CLI, *argv], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"denuc {' '.join(argv[:2])} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def score(ds: Any, stems: list[str], model: str, out: Path, threads: int) -> dict[str, Any]:
    """``denuc predict`` the held-out tiles with ``model``; det F1 and mean class F1."""
    out.mkdir(parents=True, exist_ok=True)
    mpp = ds.mpp_of(stems[0])
    wall = run(["predict", *[str(ds.image_path(s)) for s in stems], "--mpp", str(mpp), "--model", model,
                "--format", "csv", "--out", str(out), "--overwrite"], threads)
    gt = {s: ds.load(s).points for s in stems}
    pred = {s: Nuclei.read_csv(out / f"{s}.csv", mpp=mpp) for s in stems}
    rep = evaluate(gt, pred, protocol="denuc", radius_um=3.0)
    return {"det_f1": round(rep.detection.f1, 4), "mean_class_f1": round(rep.mean_f1, 4),
            "class_f1": {c: round(v.f1, 4) for c, v in rep.classes.items()}, "predict_wall_s": round(wall, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="consep", help="dataset folder or name under $DENUC_DATA (default: %(default)s)")
    ap.add_argument("--folds", type=int, default=3, help="folds of whole tiles (default: %(default)s)")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                    help="recipes to run (default: %(default)s)")
    ap.add_argument("--only-folds", nargs="*", default=None, help="run only these folds (default: all)")
    ap.add_argument("--rescore", action="store_true",
                    help="score finished runs and the shipped model again with today's `denuc predict` (the runs "
                         "are kept) (default: reuse their scores)")
    ap.add_argument("--threads", type=int, default=2, help="threads of each process (default: %(default)s)")
    ap.add_argument("--name", default="finetune_folds", help="result name (default: %(default)s)")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    args = ap.parse_args()

    src = Path(args.data) if Path(args.data).is_dir() else shared_data_dir() / args.data
    ds = open_dataset(src)
    train, val = ds.stems("train"), ds.stems("val")
    folds = tile_folds([*train, *val], args.folds)
    rows: list[dict[str, Any]] = []
    for fold, held in folds.items():
        if args.only_folds is not None and fold not in args.only_folds:
            continue
        fdir = WORK / src.name / f"k{args.folds}" / fold
        data = fold_dataset(src, ds, [s for s in train if s not in held], [s for s in val if s not in held], fdir / "data")
        shipped_file = fdir / "shipped-consep.json"
        if not shipped_file.is_file() or args.rescore:
            shipped_file.write_text(json.dumps(score(ds, held, "consep", fdir / "pred-shipped", args.threads)))
        rows.append({"fold": fold, "held_out": held, "recipe": "shipped consep model (head saw these tiles)",
                     **json.loads(shipped_file.read_text())})
        for name in args.recipes:
            rdir = fdir / name
            done = rdir / "score.json"
            if not done.is_file():
                src_run = fdir / REUSE.get(name, name) / "model"
                reuse = name in REUSE and (src_run / "model.yaml").is_file()
                if reuse and not (rdir / "model").exists():
                    shutil.copytree(src_run, rdir / "model.part", symlinks=True)
                    (rdir / "model.part").rename(rdir / "model")
                # --overwrite only while the copy still holds the source recipe's head (a rerun after an
                # interruption later on must not start the run again)
                st_file = rdir / "model" / "train" / "finetune.json"
                copied = reuse and json.loads(st_file.read_text())["settings"]["head_preset"] != head_preset(name)
                t = run(["finetune", str(data), "--out", str(rdir / "model"), "--threads", str(args.threads),
                         "--no-progress", *RECIPES[name], *(["--overwrite"] if copied else [])], args.threads)
                sc = score(ds, held, str(rdir / "model"), rdir / "pred", args.threads)
                sc["finetune_wall_s"] = round(t, 1)
                if reuse:
                    sc["detector_from"] = REUSE[name]
                state = json.loads((rdir / "model" / "train" / "finetune.json").read_text())
                sc["finetune_state"] = state
                done.write_text(json.dumps(sc))
            elif args.rescore:
                old = json.loads(done.read_text())
                keep = {k: v for k, v in old.items() if k in ("finetune_wall_s", "finetune_state", "detector_from")}
                done.write_text(json.dumps({**score(ds, held, str(rdir / "model"), rdir / "pred", args.threads), **keep}))
            sc = json.loads(done.read_text())
            rows.append({"fold": fold, "held_out": held, "recipe": name, "options": RECIPES[name], **sc})
            print(f"{fold} {name:14} det F1 {sc['det_f1']:.4f}  mean class F1 {sc['mean_class_f1']:.4f}  "
                  f"finetune {sc['finetune_wall_s'] / 60:.1f} min", flush=True)
    means: dict[str, dict[str, float]] = {}
    for r in rows:
        m = means.setdefault(r["recipe"], {"det_f1": [], "mean_class_f1": []})  # type: ignore[dict-item]
        m["det_f1"].append(r["det_f1"])  # type: ignore[attr-defined]
        m["mean_class_f1"].append(r["mean_class_f1"])  # type: ignore[attr-defined]
    summary = {k: {f: round(float(np.mean(v[f])), 4) for f in v} | {"folds": len(v["det_f1"])} for k, v in means.items()}
    print(f"\n{'recipe':48} {'folds':>5} {'det F1':>7} {'class F1':>8}")
    for k, v in summary.items():
        print(f"{k:48} {v['folds']:>5} {v['det_f1']:7.4f} {v['mean_class_f1']:8.4f}")
    write_result(args.name, {"benchmark": "finetune_folds", **run_info("finetune_folds.py"), "data": str(src),
                             "folds": {k: v for k, v in folds.items()}, "recipes": RECIPES, "rows": rows,
                             "fold_means": summary, "protocol": "denuc", "radius_um": 3.0}, report=args.report)


if __name__ == "__main__":
    main()
