"""DeNuC classifier on BRCA-M2C: frozen efficientnet-lite0 + linear head vs full fine-tuning.

Protocol: the shipped detector (or ``--detector``) finds nuclei; heads are trained on
features at GT points of ``train`` and the epoch is chosen on ``val`` at *detected* points
(mean class F1, unmatched detections count as errors). Each reported number scores ``test``
once, through the real pipeline (:class:`denuc.DeNuC` on every test image), with the
``denuc`` protocol at 3 µm (6 px at 0.5 µm/px). Table 3 of the paper is reproduced as far as
this CPU allows: linear probe vs full fine-tune (vs the end-to-end joint model, read from
``benchmarks/reported/e2e_joint_brca.json`` when the detector work has produced it).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/classifier_brca.py [--modes linear full] [--ship]

Prints a table, writes ``benchmarks/results/classifier_brca.json``; ``--ship`` copies the
linear head to ``src/denuc/assets/head-efficientnet-lite0-brca.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import run_info, write_json

from denuc.classify.head import head_taps, load_head, read_meta, save_head
from denuc.core.files import portable_meta
from denuc.core.result import Nuclei
from denuc.data import open_dataset
from denuc.data.paths import brca_m2c_dir
from denuc.evaluate import evaluate
from denuc.train.head import HeadTrainConfig
from denuc.train.head_run import train_head

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "src" / "denuc" / "assets" / "head-efficientnet-lite0-brca.safetensors"


def score_test(head: Path, detector: str | None, data: Path, tta: int = 1) -> dict:
    """Run the pipeline on every test image once and score it (denuc protocol, 3 µm).

    The same encoder pass also classifies the GT points (diagnostic: classification alone,
    macro-F1 over classes at GT points, no detection errors).
    """
    from denuc.pipeline import DeNuC
    from denuc.train.head import macro_f1

    ds = open_dataset(data)
    model = DeNuC.load(detector=detector, head=head, tta=tta)
    preds, t0 = {}, time.perf_counter()
    speed = {"detect": 0.0, "encode": 0.0, "classify": 0.0}
    y_true, y_pred = [], []
    for s in ds.stems("test"):
        smp = ds.load(s)
        t1 = time.perf_counter()
        det = model.detector.detect(smp.image, smp.mpp)
        det = det.select(det.inside(*smp.image.shape[:2]))
        speed["detect"] += (time.perf_counter() - t1) * 1e3
        both = Nuclei(np.concatenate([det.xy, smp.points.xy]),
                      np.concatenate([det.scores, np.ones(len(smp.points), np.float32)]))
        out = model.classify(smp.image, smp.mpp, both)
        for k in ("encode", "classify"):
            speed[k] += out.meta["speed"][k]
        preds[s] = out.select(np.arange(len(det)))
        y_true.append(smp.points.class_ids)
        y_pred.append(out.class_ids[len(det):])
    secs = time.perf_counter() - t0
    rep = evaluate(data, preds, protocol="denuc", split="test")
    mcs = evaluate(data, preds, protocol="mcspatnet", split="test")  # MCSpatNet's rule, for its 0.665
    gt_mf1, gt_f1s = macro_f1(np.concatenate(y_true), np.concatenate(y_pred), len(ds.classes))
    return {"mean_f1": rep.mean_f1, "det_f1": rep.detection.f1,
            "classes": {c: {"f1": v.f1, "precision": v.precision, "recall": v.recall} for c, v in rep.classes.items()},
            "radius_px": rep.radius_px, "test_seconds": round(secs, 1),
            "mcspatnet_protocol": {"mean_f1": mcs.mean_f1, "det_f1": mcs.detection.f1},
            "gt_points_macro_f1": gt_mf1, "gt_points_f1": dict(zip(ds.classes, gt_f1s)),
            "speed_ms_total": {k: round(v, 1) for k, v in speed.items()}, "table": rep.table()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["linear", "full"])
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--encoder-variant", default=None,
                    help="named taps + working mpp of the encoder (default: the encoder's default variant)")
    ap.add_argument("--mpp", type=float, default=None, help="working mpp (default: the encoder variant's)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--class-weights", default="none")
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--select", choices=("val", "last"), default="val",
                    help="keep the best val epoch or the last epoch of the schedule (linear/mlp)")
    ap.add_argument("--stain-space", choices=("od", "hed"), default="od")
    ap.add_argument("--stain-strength", type=float, default=0.1)
    ap.add_argument("--stain-norm", choices=("none", "macenko"), default="none",
                    help="stain normaliser before encoding (stored in the head)")
    ap.add_argument("--recipe-selection", default="epoch chosen on val at detected points",
                    help="how the linear recipe was chosen (recorded in the JSON)")
    ap.add_argument("--ft-epochs", type=int, default=3)
    ap.add_argument("--feature-tta", type=int, choices=(1, 2, 4, 8), default=1,
                    help="features averaged over this many flipped/rotated passes (linear/mlp heads)")
    ap.add_argument("--stain-augment", type=int, default=0, help="extra stain-jittered feature passes (linear/mlp)")
    ap.add_argument("--ft-lr", type=float, default=1e-4)
    ap.add_argument("--detector", default=None, help="detector checkpoint (default: the shipped one)")
    ap.add_argument("--tta", type=int, choices=(1, 2, 4, 8), default=1,
                    help="detector test-time augmentation passes when scoring test (default 1 = off)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "classifier_brca")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "classifier_brca.json")
    ap.add_argument("--ship", action="store_true", help="copy the linear head into src/denuc/assets")
    ap.add_argument("--reuse", nargs="*", default=[], metavar="MODE",
                    help="modes whose head in --work is already trained (e.g. a long CPU fine-tune): only score test")
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = brca_m2c_dir()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in args.modes:
        ckpt = args.work / f"head-{mode}.safetensors"
        t0 = time.perf_counter()
        if mode in args.reuse:
            meta = read_meta(ckpt)
            train_s = float(meta.train.get("feature_seconds", 0)) + float(meta.train.get("train_seconds", 0))
        else:
            meta = train_head(data, args.encoder, ckpt, detector=args.detector, use_detector=True, mode=mode,
                              mpp=args.mpp, variant=args.encoder_variant,
                              config=HeadTrainConfig(epochs=args.epochs, class_weights=args.class_weights,
                                                     weight_decay=args.weight_decay,
                                                     select=args.select if mode in ("linear", "mlp") else "val"),
                              finetune={"epochs": args.ft_epochs, "lr": args.ft_lr},
                              stain_augment=args.stain_augment if mode in ("linear", "mlp") else 0,
                              stain_strength=args.stain_strength, stain_space=args.stain_space,
                              stain_norm=args.stain_norm,
                              feature_tta=args.feature_tta if mode in ("linear", "mlp") else 1)
            train_s = time.perf_counter() - t0
        test = score_test(ckpt, args.detector, data, args.tta)
        print(test.pop("table"))
        layers = "+".join(head_taps(meta)) or "the encoder's map"
        rows.append({"mode": mode, "encoder": meta.encoder, "feature_layers": layers,
                     "encoder_variant": meta.encoder_variant, "mpp": meta.mpp,
                     "stain_norm": meta.stain_norm, "feature_tta": meta.feature_tta, "window": meta.window,
                     "stride": meta.stride, "align": meta.align, "input_size": meta.input_size, "dim": meta.dim,
                     "val": meta.val_scores, "train": meta.train, "train_wall_seconds": round(train_s, 1),
                     "test": test})
        if mode == "linear" and args.ship:
            h, hmeta, enc_t = load_head(ckpt)
            hmeta.train = portable_meta(hmeta.train)  # dataset folder names, not this machine's paths
            save_head(SHIPPED, h, hmeta, enc_t)
            print(f"shipped {SHIPPED}")
    e2e = REPO / "benchmarks" / "reported" / "e2e_joint_brca.json"
    if e2e.is_file():
        rows.append({"mode": "e2e-joint", "reported": json.loads(e2e.read_text())})
    classes = list(rows[0]["test"]["classes"])
    print(f"\nBRCA-M2C test, denuc protocol, 3 µm ({rows[0]['test']['radius_px']} px at 0.5 µm/px)")
    print(f"{'mode':10} " + " ".join(f"{c[:10]:>10}" for c in classes)
          + f" {'mean F1':>8} {'det F1':>7} {'GT-pt mF1':>9} {'train s':>8}")
    for r in rows:
        if "test" in r:
            t = r["test"]
            cells = [t["classes"][c]["f1"] for c in classes] + [t["mean_f1"], t["det_f1"], t["gt_points_macro_f1"]]
            secs = f"{r['train_wall_seconds']:8.0f}"
        else:  # the end-to-end joint model (one backbone for detection + classes), scored by its own script
            t = r["reported"]["test"]
            cells = [t["classes"][c]["f1"] for c in classes] + [t["mean_f1"], t["detection"]["f1"], float("nan")]
            secs = f"{r['reported'].get('cpu_train_s', float('nan')):8.0f}"
            r["mode"] = "e2e-joint"
        print(f"{r['mode']:10} " + " ".join(f"{v:10.4f}" for v in cells[:-3])
              + f" {cells[-3]:8.4f} {cells[-2]:7.4f} {cells[-1]:9.4f} {secs}")
    out = {"benchmark": "classifier_brca", "split": "test", "protocol": "denuc", "radius_um": 3.0,
           **run_info("classifier_brca.py", one_thread=True), "cpu_threads": 1,
           "detector": args.detector or "shipped default", "detector_tta": args.tta,
           "recipe_selection": args.recipe_selection,
           "results": rows}
    write_json(args.out, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
