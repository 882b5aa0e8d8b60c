"""Detection F1 of a DeNuC point detector on BRCA-M2C (denuc protocol, 3 µm = 6 px at 0.5 µm/px).

The run folder's ``best.safetensors`` was chosen during training by val detection F1 (epoch
and score threshold). This script trains it first if it is missing, reports val again and
scores test ONCE, printing a table and writing JSON to ``benchmarks/results/<name>.json``
(copied to ``benchmarks/reported/`` with ``--report``).

    python benchmarks/detector_brca.py --run runs/det_shf10_mpp05 [--backbone ... --epochs ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from common import write_result

from denuc.core.result import Nuclei
from denuc.data.base import open_dataset
from denuc.data.paths import brca_m2c_dir
from denuc.detect.api import Detector
from denuc.evaluate.api import evaluate


def predict_split(det: Detector, ds, split: str) -> dict[str, Nuclei]:  # type: ignore[no-untyped-def]
    """Class-free detections (class_ids None) of every image of ``split``."""
    out = {}
    for s in ds.stems(split):
        img = ds.read_image(s)
        n = det.detect(img, ds.mpp_of(s), name=s)
        out[s] = Nuclei(n.xy, n.scores, mpp=n.mpp, image_size=n.image_size, name=s)
    return out


def keep_above(pred: dict[str, Nuclei], t: float) -> dict[str, Nuclei]:
    """Detections with score > t (greedy NMS makes this equal to inferring at t)."""
    return {k: v.select(v.scores > t) for k, v in pred.items()}


def init_chain_seconds(init: str) -> tuple[float, list[str]]:
    """CPU training seconds of the runs this one was initialised from (followed back through
    each run's own ``init``), and their checkpoints."""
    from denuc.detect.checkpoint import read_meta

    total, chain = 0.0, []
    while init and Path(init).is_file() and init not in chain:
        chain.append(init)
        log_path = Path(init).parent / "log.jsonl"
        if log_path.is_file():
            total += float(sum(json.loads(x)["train_s"] for x in log_path.read_text().splitlines()))
        init = read_meta(init).get("train", {}).get("init") or ""
    return total, chain


def score(ds, pred: dict[str, Nuclei], split: str, protocol: str, radius_um: float) -> dict:  # type: ignore[no-untyped-def]
    rep = evaluate(ds, pred, protocol=protocol, radius_um=radius_um, split=split, classes=())
    d = rep.detection.to_dict()
    d.update(protocol=protocol, radius_um=radius_um, radius_px=rep.radius_px, split=split)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="training output folder")
    ap.add_argument("--name", default=None, help="result name (default detector_brca_<run folder>)")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    ap.add_argument("--backbone", default="shufflenetv2_1.0x")
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=35)
    ap.add_argument("--matcher", default="cheapest")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--retune", action="store_true",
                    help="re-choose the score threshold on val over a finer grid (0.1-0.7) before scoring test")
    ap.add_argument("--tta", type=int, nargs="+", default=[1], choices=(1, 2, 4, 8),
                    help="test-time augmentation pass counts to evaluate (threshold chosen on val for each); "
                         "the first is the main result")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    root = brca_m2c_dir()
    ckpt = args.run / "best.safetensors"
    if not ckpt.is_file():
        from denuc.train.detector import TrainConfig, train

        train(TrainConfig.from_preset("quick", datasets=[str(root)], out=str(args.run), backbone=args.backbone,
                                      mpp=args.mpp, epochs=args.epochs, matcher=args.matcher, threads=args.threads,
                                      resume=True))
    det = Detector.load(ckpt, device="cpu")
    meta = det.config
    base_threshold = det.threshold
    log = [json.loads(x) for x in (args.run / "log.jsonl").read_text().splitlines()]
    train_s = float(sum(r["train_s"] for r in log))
    init = meta["train"].get("init") or ""
    init_s, chain = init_chain_seconds(init)
    ds = open_dataset(root)
    by_tta = {}
    for n_tta in args.tta:
        t0 = time.time()
        d = Detector.load(ckpt, device="cpu", tta=n_tta)
        grid = [round(0.1 + 0.025 * i, 3) for i in range(25)] if args.retune else [base_threshold]
        d.threshold = min(grid) - 1e-6  # filtering afterwards equals inferring at each threshold
        val_all = predict_split(d, ds, "val")
        val_f1 = {t: score(ds, keep_above(val_all, t), "val", "denuc", 3.0)["f1"] for t in grid}
        thr = max(grid, key=lambda t: val_f1[t])
        val_pred = keep_above(val_all, thr)
        test_pred = keep_above(predict_split(d, ds, "test"), thr)
        by_tta[n_tta] = {"score_threshold": thr, "cpu_infer_val_test_s": round(time.time() - t0, 1), "f1": {
            "val": score(ds, val_pred, "val", "denuc", 3.0),
            "test": score(ds, test_pred, "test", "denuc", 3.0),
            "test_mcspatnet_6px": score(ds, test_pred, "test", "mcspatnet", 3.0),
            "test_hungarian_6px": score(ds, test_pred, "test", "hungarian", 3.0),
        }}
    main_tta = args.tta[0]
    thr, rows, infer_s = (by_tta[main_tta][k] for k in ("score_threshold", "f1", "cpu_infer_val_test_s"))
    n_params = sum(p.numel() for p in det.model.parameters())
    cfg = meta["config"]
    result = {
        "name": args.name or f"detector_brca_{args.run.name}",
        "checkpoint": str(ckpt), "backbone": cfg["backbone"], "neck_width": cfg["neck_width"],
        "params": n_params, "head_activation": cfg["head_activation"], "matcher": cfg["matcher"],
        "train_mpp": meta["mpp"], "epochs": meta["train"]["epochs"], "best_epoch": meta["epoch"],
        "score_threshold": thr, "checkpoint_threshold": cfg["score_threshold"],
        "threshold_retuned_on_val": bool(args.retune), "nms_radius_um": meta["nms_radius_um"],
        "pretrained": meta["train"]["pretrained"],
        "cpu_train_s": round(train_s, 1), "init_from": init or None, "init_chain": chain,
        "tta": main_tta, "tta_results": {str(k): v for k, v in by_tta.items() if k != main_tta},
        "cpu_train_s_including_init_run": round(train_s + init_s, 1), "cpu_infer_val_test_s": round(infer_s, 1),
        "cpu": f"{platform.machine()}, shared 2-core CPU, {args.threads} torch thread(s)",
        "f1": rows,
        "reference": {"mcspatnet_test_f1": 0.854, "paper_denuc_f1": 0.8752},
        "command": f"python benchmarks/detector_brca.py --run {args.run}" + (" --retune" if args.retune else "")
                   + (f" --tta {' '.join(map(str, args.tta))}" if args.tta != [1] else "")
                   + (f" --name {args.name}" if args.name else ""),
    }
    print(f"{result['name']}: {cfg['backbone']} @ {meta['mpp']} µm/px, matcher {cfg['matcher']}, "
          f"epoch {meta['epoch']}/{meta['train']['epochs']}, threshold {thr}, "
          f"train {train_s / 60:.1f} min CPU")
    print(f"{'split / protocol':24} {'prec':>6} {'recall':>6} {'F1':>6} {'#pred':>6} {'#GT':>6}")
    for n_tta, res in by_tta.items():
        tag = f" tta x{n_tta} @ {res['score_threshold']}" if len(by_tta) > 1 else ""
        for k, r in res["f1"].items():
            print(f"{k + tag:24} {r['precision']:6.3f} {r['recall']:6.3f} {r['f1']:6.3f} {r['n_pred']:6d} "
                  f"{r['n_gt']:6d}")
    write_result(result['name'], result, args.report)


if __name__ == "__main__":
    main()
