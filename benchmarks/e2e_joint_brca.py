"""End-to-end joint detector-classifier baseline on BRCA-M2C (the paper's Table 3 baseline):
ONE backbone (EfficientNet-Lite0, ImageNet weights) trained for detection and
classification together = ``PointDetector(num_classes=3)`` via ``train-detector --classes``.

Epoch and score threshold were chosen on val by mean class F1 during training. Scores test
ONCE: detection F1 and per-class / mean class F1 (denuc protocol, 3 µm = 6 px at 0.5 µm/px).
Writes ``benchmarks/results/e2e_joint_brca.json`` (``--report`` copies it to reported/).

    python benchmarks/e2e_joint_brca.py --run runs/e2e_lite0_mpp05 [--epochs 12]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import write_result

from denuc.core.result import Nuclei
from denuc.data.base import open_dataset
from denuc.data.paths import brca_m2c_dir
from denuc.detect.api import Detector
from denuc.evaluate.api import evaluate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    root = brca_m2c_dir()
    ckpt = args.run / "best.safetensors"
    if not ckpt.is_file():
        from denuc.train.detector import TrainConfig, train

        train(TrainConfig(datasets=[str(root)], out=str(args.run), backbone="efficientnet-lite0", mpp=args.mpp,
                          epochs=args.epochs, classes=True, threads=args.threads, resume=True))
    det = Detector.load(ckpt, device="cpu")
    ds = open_dataset(root)
    log = [json.loads(x) for x in (args.run / "log.jsonl").read_text().splitlines()]
    result: dict = {"checkpoint": str(ckpt), "backbone": det.config["config"]["backbone"], "train_mpp": det.mpp,
                    "epochs": det.config["train"]["epochs"], "best_epoch": det.config["epoch"],
                    "score_threshold": det.threshold, "cpu_train_s": round(sum(r["train_s"] for r in log), 1),
                    "classes": list(det.class_names), "command": f"python benchmarks/e2e_joint_brca.py --run {args.run}"}
    print(f"joint {result['backbone']} @ {det.mpp} µm/px, epoch {result['best_epoch']}/{result['epochs']}, "
          f"threshold {det.threshold}")
    for split in ("val", "test"):
        pred: dict[str, Nuclei] = {}
        for s in ds.stems(split):
            pred[s] = det.detect(ds.read_image(s), ds.mpp_of(s), name=s)
        rep = evaluate(ds, pred, protocol="denuc", radius_um=3.0, split=split)
        result[split] = rep.to_dict(per_image=False)
        print(f"[{split}]")
        print(rep.table())
    write_result("e2e_joint_brca", result, args.report)


if __name__ == "__main__":
    main()
