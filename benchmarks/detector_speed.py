"""Detection throughput of a detector (default: the shipped one) on this machine's CPU (or a GPU with
``--device cuda``).

Input: BRCA-M2C test images (0.5 µm/px, the input mpp) or, without the data, synthetic
noise images of the same size. Throughput = input megapixels per second at the input mpp
(the model resamples to its own mpp; at 0.25 µm/px training that is 4x the pixels).
Prints a table and writes ``benchmarks/results/detector_speed.json``.

    python benchmarks/detector_speed.py [--detector CKPT] [--threads 1 2] [--tta 1 4] [--reps 2] [--device cuda]

Rows for several ``--tta`` pass counts are measured in the same run, so their ratio holds
even on this shared, noisy machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from common import write_result
from pipeline_speed import load_images

from denuc.detect.api import Detector


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--detector", type=Path, default=None)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--split", default="test", help="BRCA-M2C split to take the images from")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tta", type=int, nargs="+", default=[1], choices=(1, 2, 4, 8),
                    help="test-time augmentation pass counts to time")
    ap.add_argument("--batch", type=int, nargs="+", default=[0],
                    help="windows per forward pass to time (0 = the Detector's default for the device)")
    ap.add_argument("--window", type=int, nargs="+", default=[0],
                    help="inference window sizes to time (0 = the checkpoint's)")
    ap.add_argument("--mpp", type=float, default=0.5, help="input µm/px of the images")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (on cuda --threads only sets the host threads)")
    ap.add_argument("--name", default=None,
                    help="result name (default detector_speed, or detector_speed_<device> off the CPU)")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    det = Detector.load(args.detector, device=args.device)
    imgs, source = load_images(args.images, args.split)
    mpx = sum(im.shape[0] * im.shape[1] for im in imgs) / 1e6
    rows = []
    for th in args.threads:
        torch.set_num_threads(th)
        for n_tta in args.tta:
            for bs, win in [(b, w) for w in args.window for b in args.batch]:
                d = Detector.load(args.detector, device=args.device, tta=n_tta, batch_size=bs or None,
                                  window=win or None)
                d.detect_many(imgs[:2], [args.mpp] * 2)  # warm-up
                best = float("inf")
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    n = sum(len(x) for x in d.detect_many(imgs, [args.mpp] * len(imgs)))
                    best = min(best, time.perf_counter() - t0)
                rows.append({"threads": th, "tta": n_tta, "window": d.window, "batch": d.batch_size,
                             "seconds": round(best, 3),
                             "mpx_per_s": round(mpx / best, 3), "images_per_s": round(len(imgs) / best, 2),
                             "nuclei": n})
    cfg = det.config["config"]
    result = {
        "detector": str(args.detector or "shipped default"), "backbone": cfg["backbone"],
        "model_mpp": det.mpp, "input_mpp": args.mpp, "images": len(imgs), "source": source,
        "input_megapixels": round(mpx, 3), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else None,
        "cpu": f"{platform.machine()} {platform.processor() or ''}".strip() + f" ({os.cpu_count()} logical cores)",
        "rows": rows, "command": "python benchmarks/detector_speed.py " + " ".join(sys.argv[1:]),
    }
    print(f"{cfg['backbone']} (model {det.mpp} µm/px) on {len(imgs)} {source} images at {args.mpp} µm/px "
          f"({mpx:.2f} Mpx)")
    print(f"{'threads':>7} {'tta':>4} {'window':>6} {'batch':>5} {'s':>8} {'Mpx/s':>8} {'img/s':>7} {'nuclei':>7}")
    for r in rows:
        print(f"{r['threads']:7d} {r['tta']:4d} {r['window']:6d} {r['batch']:5d} {r['seconds']:8.2f} {r['mpx_per_s']:8.3f} "
              f"{r['images_per_s']:7.2f} {r['nuclei']:7d}")
    name = args.name or ("detector_speed" if args.device == "cpu" else f"detector_speed_{args.device.split(':')[0]}")
    write_result(name, result, args.report)


if __name__ == "__main__":
    main()
