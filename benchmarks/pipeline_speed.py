"""End-to-end throughput of the DeNuC pipeline (detect -> encode + query -> classify), against the
detector alone, measured in one run on one device.

Input: BRCA-M2C images of ``--split`` (0.5 µm/px) or, without the data, synthetic noise
images of the same size. Throughput = input megapixels (at the input mpp) per second, plus
images/s and nuclei/s; the per-stage milliseconds come from each result's ``meta["speed"]``.
The shipped detector and head are used; ``--random-encoder`` builds the head's encoder with
random weights instead of its own (speed does not depend on weight values; for machines where
the weights file is absent).

    python benchmarks/pipeline_speed.py [--device cuda] [--images 10] [--reps 2] [--tta 1 4] [--profile 25]

Prints a table and writes ``benchmarks/results/pipeline_speed[_cuda].json``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch
from common import run_info, write_result

from denuc.data.paths import brca_m2c_dir
from denuc.pipeline import DeNuC


def load_images(n: int, split: str) -> tuple[list[np.ndarray], str]:
    root = brca_m2c_dir()
    if (root / f"brca_ds_{split}.txt").is_file():
        from denuc.data.base import open_dataset

        ds = open_dataset(root)
        stems = [s for s in ds.stems(split) if ds.image_path(s).is_file()][:n]
        if stems:
            return [ds.read_image(s) for s in stems], f"BRCA-M2C {split}"
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (491, 491, 3), dtype=np.uint8) for _ in range(n)], "synthetic 491x491 noise"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(device: str, tta: int, random_encoder: bool) -> DeNuC:
    if not random_encoder:
        return DeNuC.load(device=device, tta=tta)
    from denuc.classify.head import load_head
    from denuc.detect.api import Detector
    from denuc.encode import build_encoder
    from denuc.pipeline import DEFAULT_HEAD

    head, meta, _ = load_head(DEFAULT_HEAD)
    enc = build_encoder(meta.encoder, "random", device=device)
    return DeNuC(Detector.load(None, device=device, tta=tta), enc, head, meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--split", default="test")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--tta", type=int, nargs="+", default=[1], choices=(1, 2, 4, 8))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--mpp", type=float, default=0.5, help="input µm/px of the images")
    ap.add_argument("--random-encoder", action="store_true")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="after timing, profile one detect+classify pass over the images (cProfile, host "
                         "side; device waits show up in the calls that synchronise) and print the top N")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    imgs, source = load_images(args.images, args.split)
    mpx = sum(im.shape[0] * im.shape[1] for im in imgs) / 1e6
    rows = []
    for n_tta in args.tta:
        model = build(args.device, n_tta, args.random_encoder)
        model(imgs[0], args.mpp)  # warm-up (kernels, allocator)
        for stage in ("detect", "detect+classify"):
            best, n, stages = float("inf"), 0, {}
            for _ in range(args.reps):
                sync(device)
                t0 = time.perf_counter()
                if stage == "detect":
                    n = sum(len(model.detector.detect(im, args.mpp)) for im in imgs)
                    sync(device)
                else:
                    res = [model(im, args.mpp) for im in imgs]
                    sync(device)
                    n = sum(len(r) for r in res)
                    stages = {k: round(float(np.mean([r.meta["speed"][k] for r in res])), 2)
                              for k in res[0].meta["speed"]}
                best = min(best, time.perf_counter() - t0)
            rows.append({"stage": stage, "tta": n_tta, "window": model.detector.window,
                         "batch": model.detector.batch_size, "seconds": round(best, 3), "mpx_per_s": round(mpx / best, 3),
                         "images_per_s": round(len(imgs) / best, 2), "nuclei_per_s": round(n / best, 1),
                         "nuclei": n, "ms_per_image_by_stage": stages})
    if args.profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        [model(im, args.mpp) for im in imgs]
        sync(device)
        prof.disable()
        print(f"host profile of one detect+classify pass over {len(imgs)} images (tta {args.tta[-1]}), by own time:")
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    result = {
        **run_info("pipeline_speed.py"),
        "device": args.device, "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "cpu": f"{platform.machine()} ({os.cpu_count()} logical cores, torch threads {torch.get_num_threads()})",
        "encoder": model.encoder.name, "encoder_weights": "random" if args.random_encoder else "the head's own",
        "images": len(imgs), "source": source, "input_mpp": args.mpp, "input_megapixels": round(mpx, 3),
        "rows": rows,
    }
    print(f"DeNuC pipeline on {args.device} ({result['gpu'] or result['cpu']}): {len(imgs)} {source} images at "
          f"{args.mpp} µm/px ({mpx:.2f} Mpx), encoder {model.encoder.name}")
    print(f"{'stage':16} {'tta':>3} {'s':>7} {'Mpx/s':>7} {'img/s':>7} {'nuclei/s':>9}  ms/image by stage")
    for r in rows:
        print(f"{r['stage']:16} {r['tta']:3d} {r['seconds']:7.2f} {r['mpx_per_s']:7.3f} {r['images_per_s']:7.2f} "
              f"{r['nuclei_per_s']:9.1f}  {r['ms_per_image_by_stage']}")
    name = "pipeline_speed" if device.type == "cpu" else f"pipeline_speed_{device.type}"
    write_result(name, result, args.report)


if __name__ == "__main__":
    main()
