"""``denuc finetune`` on BRCA-M2C with its defaults: val detection F1 of the fine-tuned detector
against the shipped detector's, and the wall time on this machine.

The shipped detector was trained on BRCA-M2C in five hand-tuned stages; ``finetune`` starts
from it and runs one stage with its defaults (no setting chosen for BRCA-M2C). Both detectors
are scored on the 10 val images at their own val-chosen thresholds (denuc protocol, 3 µm).
With ``--test`` the fine-tuned, the kept (the better on val) and the shipped detector are
scored once on the 30 test images, and so are the finished model and the shipped model with the
same classes (detection F1 and mean class F1, as ``denuc predict`` gives them).

``--from RUN`` starts from a copy of a finished run (its model folder): when only head options
differ (``--head-preset``), ``finetune --overwrite`` keeps its detector stages and trains the
head again, so a new head recipe is compared on the very same detector; ``wall_s`` then times
the head and report stages only.

    python benchmarks/finetune_brca.py [--epochs 10] [--test] [--report]
    python benchmarks/finetune_brca.py --data $DENUC_DATA/consep --name finetune_consep_3ep --epochs 3
    python benchmarks/finetune_brca.py --from runs/finetune_brca_idle --out runs/finetune_brca_auto --test

``--data`` runs it on another dataset (CoNSeP: train -> val; it has no test split here).

``--epochs`` (and the other flags) shorten the run where the CPU is too slow for the default
(the result records the settings used). Data: ``$DENUC_DATA/brca-m2c`` (default
``../shared/data``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from common import run_info, write_result

from denuc.cli import main as denuc_main
from denuc.core.files import portable_meta
from denuc.data.base import open_dataset
from denuc.data.paths import brca_m2c_dir
from denuc.detect.api import Detector, default_detector_path
from denuc.evaluate.api import evaluate
from denuc.train.finetune import FinetuneSettings


def test_f1(det_path: Path, threshold: float, ds, device: str | None) -> dict:  # type: ignore[no-untyped-def]
    """Detection precision/recall/F1 on the test split at ``threshold`` (denuc protocol, 3 µm)."""
    det = Detector.load(det_path, device=device, threshold=threshold)
    pred = {s: det.detect(ds.read_image(s), ds.mpp_of(s), name=s) for s in ds.stems("test")}
    rep = evaluate(ds, pred, protocol="denuc", radius_um=3.0, split="test", classes=())
    return {"threshold": threshold, **rep.detection.to_dict()}


def test_pipeline(model: str, ds, device: str | None) -> dict:  # type: ignore[no-untyped-def]
    """A model folder or shipped model name run on the test split: detection and class F1."""
    from denuc.pipeline import DeNuC

    m = DeNuC.load(model=model, device=device)
    pred = {s: m(ds.read_image(s), ds.mpp_of(s), name=s) for s in ds.stems("test")}
    rep = evaluate(ds, pred, protocol="denuc", radius_um=3.0, split="test")
    return {"model": Path(model).name, "det_f1": rep.detection.f1, "mean_class_f1": rep.mean_f1,
            "class_f1": {c: v.f1 for c, v in rep.classes.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="dataset folder (default: $DENUC_DATA/brca-m2c)")
    ap.add_argument("--out", type=Path, default=Path("runs/finetune_brca"), help="model folder (default: %(default)s)")
    ap.add_argument("--epochs", type=int, default=None, help="detector epochs (default: finetune's own)")
    ap.add_argument("--crops-per-epoch", type=float, default=None, help="(default: finetune's own)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--head-preset", default=None, help="finetune's --head-preset (default: finetune's own)")
    ap.add_argument("--from", dest="from_run", type=Path, default=None,
                    help="start from a copy of this finished run (keeps its detector stages when only head "
                         "options differ) (default: a new run)")
    ap.add_argument("--test", action="store_true", help="also score test once")
    ap.add_argument("--name", default="finetune_brca")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    args = ap.parse_args()

    data = args.data or brca_m2c_dir()
    argv = ["finetune", str(data), "--out", str(args.out), "--threads", str(args.threads), "--no-progress"]
    if args.epochs is not None:
        argv += ["--epochs", str(args.epochs)]
    if args.crops_per_epoch is not None:
        argv += ["--crops-per-epoch", str(args.crops_per_epoch)]
    if args.device:
        argv += ["--device", args.device]
    if args.head_preset:
        argv += ["--head-preset", args.head_preset]
    if args.from_run is not None and not args.out.exists():
        if not (args.from_run / "model.yaml").is_file():
            raise SystemExit(f"--from {args.from_run}: not a finished finetune run")
        src_preset = json.loads((args.from_run / "train" / "finetune.json").read_text())["settings"]["head_preset"]
        if src_preset == (args.head_preset or FinetuneSettings().head_preset):
            raise SystemExit(f"--from {args.from_run}: its head preset is already {src_preset!r}; give another "
                             "--head-preset (--overwrite would start that run again)")
        shutil.copytree(args.from_run, args.out.with_name(args.out.name + ".part"), symlinks=True)
        args.out.with_name(args.out.name + ".part").rename(args.out)
        argv.append("--overwrite")  # only head options differ: the detector stages are kept
    t0 = time.perf_counter()
    rc = denuc_main(argv)
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"denuc finetune failed with exit code {rc}")
    rep = json.loads((args.out / "report" / "report.json").read_text())
    state = json.loads((args.out / "train" / "finetune.json").read_text())
    det = rep["detector"]
    tuned, shipped = det["fine_tuned"], det["start"]
    result = {
        "name": args.name, **run_info("finetune_brca.py", one_thread=args.threads == 1),
        "cpu": f"{platform.machine()}, {os.cpu_count()} cores (shared), {args.threads} torch thread(s)",
        "settings": portable_meta(state["settings"]),
        "wall_s": round(wall, 1), "wall_min": round(wall / 60, 1),
        "stage_seconds": {k: v.get("seconds") for k, v in state["done"].items() if isinstance(v, dict)},
        "val": {"fine_tuned": tuned, "shipped": shipped, "delta_f1": tuned["f1"] - shipped["f1"],
                "kept": det["chosen"]},
        "val_pipeline": rep.get("pipeline"),
        "head": {k: v for k, v in rep.get("head", {}).items() if k in ("preset", "recipe", "candidates")},
        "from_run": str(args.from_run) if args.from_run else None,
        "val_pipeline_shipped_model": rep.get("shipped"),
        "target": "val detection F1 of the fine-tuned detector within 0.01 of the shipped detector's",
        "target_met": tuned["f1"] >= shipped["f1"] - 0.01,
    }
    if args.test:
        ds = open_dataset(data)
        result["test"] = {
            "fine_tuned": test_f1(args.out / "train" / "detector" / "best.safetensors", tuned["threshold"], ds,
                                  args.device),
            "shipped": test_f1(default_detector_path(), shipped["threshold"], ds, args.device),
            "model": test_pipeline(str(args.out), ds, args.device),
            "shipped_model": test_pipeline(rep["shipped"]["model"], ds, args.device),
        }
    print(f"val detection F1: fine-tuned {tuned['f1']:.4f} @ {tuned['threshold']}, shipped {shipped['f1']:.4f} @ "
          f"{shipped['threshold']} (delta {tuned['f1'] - shipped['f1']:+.4f}); kept: {det['chosen']}; "
          f"wall {wall / 60:.1f} min")
    if args.test:
        t = result["test"]
        print(f"test detection F1: fine-tuned {t['fine_tuned']['f1']:.4f}, shipped {t['shipped']['f1']:.4f}")
        for k in ("model", "shipped_model"):
            print(f"test, {k} ({t[k]['model']}): detection F1 {t[k]['det_f1']:.4f}, mean class F1 "
                  f"{t[k]['mean_class_f1']:.4f}")
    write_result(args.name, result, args.report)


if __name__ == "__main__":
    main()
