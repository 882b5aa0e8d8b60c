"""Slide speed near the hardware's limit: end to end s/mm² against the bare encoder, detector stage,
GPU busy time and GPU memory per encoder and batch (the targets of the speed issue, for one GPU).

On a pyramidal slide built from BRCA-M2C test tiles (``benchmarks/make_test_slide.py brca``,
made when missing), for each encoder setting:

* ``default``: the shipped detector + EfficientNet-Lite0 encoder + head;
* ``uni2-h``: the UNI2-h architecture with random weights (``weights="random"``) and a random
  linear head on its features (speed only; ``--smoke`` uses the tiny ``tiny-uni2h`` instead).

it measures, in one process:

1. **end to end**: :meth:`denuc.DeNuC.predict_slide` from the slide file to the written CSV and
   summary, twice (the first pass also warms up and compiles; reported apart); seconds per mm²
   of tissue (``tissue_area_mm2`` of the summary) of the second pass, the per-stage times of the
   stage timer, windows encoded, and the pipeline's encoder windows/s;
2. **bare encoder** windows/s with the same settings (batch, bf16 autocast on CUDA,
   ``torch.compile`` when ``--compile``) on random batches; the ratio pipeline / bare
   (target >= 0.85);
3. **detector stage**: a detection-only pass over the same slide (the ``denuc detect`` path:
   read, resampling, windows, NMS, the border rule, written CSV) in s/mm², and the stage
   timer's ``detect`` time per mm² of the end-to-end pass;
4. **GPU busy fraction** of the end-to-end pass: the summed time of CUDA kernels and copies in a
   ``torch.profiler`` trace over its wall time (with the stage table, to say which stage holds
   it back); None on the CPU;
5. **GPU memory**: peak allocated memory of the bare encoder per batch size (``--batches``),
   then doubling the batch until it no longer fits (the largest batch that fits); None on the CPU.

    python benchmarks/gpu_slide_speed.py [--device cuda] [--encoders default uni2-h] [--batch 64] [--compile] [--report]
    python benchmarks/gpu_slide_speed.py --device cpu --smoke     # tiny settings: checks that the script runs

Writes ``benchmarks/results/gpu_slide_speed_<device>.json`` (``--report``: also ``reported/``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import run_info, write_result

REPO = Path(__file__).resolve().parents[1]


def make_slide(path: Path, images: int) -> Path:
    """The BRCA-M2C test slide at ``path`` (made by make_test_slide.py when missing)."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_test_slide.py"), "brca", "--out", str(path),
                        "--images", str(images), "--columns", str(min(images, 4))], check=True)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(kind: str, device: torch.device, smoke: bool) -> Any:
    """``default``: the shipped models; ``uni2-h``: UNI2-h (random weights) + a random linear head."""
    from denuc.pipeline import DeNuC

    if kind == "default":
        return DeNuC.load(device=device)
    if kind != "uni2-h":
        raise SystemExit(f"unknown encoder setting {kind!r}; use default or uni2-h")
    from denuc.classify.head import HeadMeta, PointHead
    from denuc.detect.api import Detector
    from denuc.encode import build_encoder
    from denuc.encode.tiny import register_tiny

    name = "uni2-h"
    if smoke:
        register_tiny()
        name = "tiny-uni2h"
    enc = build_encoder(name, "random", device=device)
    torch.manual_seed(0)
    classes = ["lymphocyte", "tumor", "stromal"]
    head = PointHead(enc.dim, len(classes))
    meta = HeadMeta(classes=classes, colors=[[0, 0, 255], [255, 0, 0], [0, 160, 0]], encoder=enc.name,
                    weights_hash=enc.weights_hash, dim=enc.dim, mpp=enc.spec.mpp, window=enc.spec.window,
                    stride=enc.spec.window - enc.spec.window // 4, align="center", input_size=enc.input_size)
    return DeNuC(Detector.load(device=device), enc, head, meta)


def configure(model: Any, batch: int, compile_: bool) -> None:
    """Encoder batch size and ``torch.compile`` of the encoder (compiled lazily: the time is
    spent on the first call, inside the warm-up pass)."""
    model.featurizer.batch_size = batch
    if compile_:
        enc = model.encoder
        enc.forward = torch.compile(enc.forward)  # instance attribute: what nn.Module.__call__ runs


def run_slide(model: Any, slide: Path, out: Path, *, detect_only: bool = False, profile: bool = False
              ) -> dict[str, Any]:
    """One pass from the slide file to written outputs: wall s, summary, and the profiler's busy time."""
    from denuc.stream.job import RunOptions, run_source
    from denuc.stream.runner import TileStream

    opts = RunOptions(formats=("csv",), overlay=False, overwrite=True, progress=False)
    runner = TileStream(model.detector, None) if detect_only else model.stream()
    models = {"detector": model.detector.describe()} if detect_only else model.models()
    dev = torch.device(model.device)
    out.mkdir(parents=True, exist_ok=True)
    prof = None
    if profile and dev.type == "cuda":
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprofile

        prof = tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        prof.__enter__()
    sync(dev)
    t0 = time.perf_counter()
    res = run_source(runner, slide, out_dir=out, opts=opts, models=models)
    sync(dev)
    wall = time.perf_counter() - t0
    busy = None
    if prof is not None:
        prof.__exit__(None, None, None)
        busy = gpu_busy_s(prof)
    return {"wall_s": wall, "summary": res.summary, "gpu_busy_s": busy}


def gpu_busy_s(prof: Any) -> float:
    """Seconds of device activity (kernels, copies, memsets) in a profiler trace, overlaps merged."""
    spans = []
    for e in prof.events():
        dt = getattr(e, "device_type", None)
        if dt is not None and "CUDA" in str(dt) and e.time_range.end > e.time_range.start:
            spans.append((e.time_range.start, e.time_range.end))
    spans.sort()
    total, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total / 1e6  # µs -> s


def bare_encoder(model: Any, batch: int, steps: int) -> float:
    """Windows/s of the encoder alone: the featurizer's ``prepare`` + runner on random
    ``(batch, 3, window, window)`` crops on the device, with its precision (bf16 autocast on CUDA)."""
    fp = model.featurizer
    dev = fp.device
    crops = torch.rand(batch, 3, fp.window, fp.window, device=dev)
    dt = fp.autocast_dtype

    def once() -> None:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=dt or torch.bfloat16, enabled=dt is not None):
            fp.runner(fp.prepare(crops))

    for _ in range(2):
        once()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        once()
    sync(dev)
    return batch * steps / (time.perf_counter() - t0)


def memory_sweep(model: Any, batches: list[int], cap: int) -> dict[str, Any]:
    """Peak allocated GPU memory (MiB) of one encoder call per batch size, and the largest batch
    that fits (doubling from the largest of ``batches`` up to ``cap``); None on the CPU."""
    fp = model.featurizer
    dev = fp.device
    if dev.type != "cuda":
        return {"peak_mib": None, "largest_batch": None, "note": "GPU memory is measured on CUDA devices only"}
    dt = fp.autocast_dtype

    def peak(b: int) -> float | None:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        try:
            crops = torch.rand(b, 3, fp.window, fp.window, device=dev)
            with torch.inference_mode(), torch.autocast("cuda", dtype=dt or torch.bfloat16, enabled=dt is not None):
                fp.runner(fp.prepare(crops))
            sync(dev)
        except torch.OutOfMemoryError:
            return None
        finally:
            crops = None  # noqa: F841
        return torch.cuda.max_memory_allocated(dev) / 2**20

    out = {str(b): peak(b) for b in batches}
    fits = [b for b in batches if out[str(b)] is not None]
    b = max(fits) if fits else 0
    while b and b * 2 <= cap and peak(b * 2) is not None:
        b *= 2
    torch.cuda.empty_cache()
    return {"peak_mib": {k: None if v is None else round(v, 1) for k, v in out.items()}, "largest_batch": b,
            "largest_batch_cap": cap}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--encoders", nargs="+", default=["default", "uni2-h"], choices=["default", "uni2-h"])
    ap.add_argument("--slide", type=Path, default=None, help="slide file (default runs/test_slides/brca.svs)")
    ap.add_argument("--images", type=int, default=12, help="test images in a slide made here (default 12)")
    ap.add_argument("--batch", type=int, default=64, help="encoder windows per call in the pipeline (default 64)")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 64, 256], help="memory sweep batch sizes")
    ap.add_argument("--max-batch", type=int, default=4096, help="cap of the largest-batch search")
    ap.add_argument("--steps", type=int, default=20, help="bare-encoder timing calls")
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoder (time reported apart)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny settings to check the script (2-image slide, tiny-uni2h, batch 4, 2 steps)")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from denuc.core.device import pick_device

    device = pick_device(args.device)
    if args.smoke:
        args.images, args.batch, args.batches, args.steps, args.max_batch = 2, 4, [2, 4], 2, 8
    default_slide = REPO / "runs" / "test_slides" / ("brca_smoke.svs" if args.smoke else "brca.svs")
    slide = make_slide(args.slide or default_slide, args.images)
    rows = []
    for kind in args.encoders:
        t0 = time.perf_counter()
        model = build_model(kind, device, args.smoke)
        load_s = time.perf_counter() - t0
        configure(model, args.batch, args.compile)
        with tempfile.TemporaryDirectory(prefix="denuc-gpu-slide-") as tmp:
            first = run_slide(model, slide, Path(tmp) / "warm")
            e2e = run_slide(model, slide, Path(tmp) / "e2e", profile=True)
            det = run_slide(model, slide, Path(tmp) / "det", detect_only=True)
        s = e2e["summary"]
        area = s.get("tissue_area_mm2") or 0.0
        timings = s.get("timings_ms", {})
        windows = int(s.get("windows_encoded", 0))
        pipe_wps = windows / e2e["wall_s"] if e2e["wall_s"] > 0 else 0.0
        bare_wps = bare_encoder(model, args.batch, args.steps)
        row = {
            "encoder": kind, "encoder_name": model.encoder.name, "device": str(device), "batch": args.batch,
            "precision": "bf16 autocast" if model.featurizer.autocast_dtype is not None else "fp32",
            "runtimes": {"detector": model.detector.runner.runtime, "encoder": model.featurizer.runner.runtime},
            "compile": args.compile, "load_s": round(load_s, 2),
            "first_pass_s": round(first["wall_s"], 2),  # warm-up (+ compile with --compile)
            "tissue_mm2": round(area, 3), "nuclei": s.get("nuclei"), "windows_encoded": windows,
            "e2e_s": round(e2e["wall_s"], 3), "e2e_s_per_mm2": round(e2e["wall_s"] / area, 4) if area else None,
            "detector_pass_s": round(det["wall_s"], 3),
            "detector_pass_s_per_mm2": round(det["wall_s"] / area, 4) if area else None,
            "detect_stage_s_per_mm2": round(timings.get("detect", 0.0) / 1e3 / area, 4) if area else None,
            "stage_ms": timings,
            "pipeline_windows_per_s": round(pipe_wps, 1), "bare_encoder_windows_per_s": round(bare_wps, 1),
            "pipeline_vs_bare": round(pipe_wps / bare_wps, 3) if bare_wps else None,
            "gpu_busy_fraction": (round(e2e["gpu_busy_s"] / e2e["wall_s"], 3)
                                  if e2e["gpu_busy_s"] is not None else None),
            "memory": memory_sweep(model, args.batches, args.max_batch),
        }
        busy = row["gpu_busy_fraction"]
        slowest = max(((k, v) for k, v in timings.items() if k not in ("read",)), key=lambda kv: kv[1],
                      default=("", 0.0))[0]
        row["holds_back"] = slowest if busy is None or busy < 0.8 else None
        rows.append(row)
        print(f"{kind:>8} ({row['encoder_name']}, {row['precision']}, batch {args.batch}): e2e {row['e2e_s_per_mm2']} s/mm², "
              f"detector pass {row['detector_pass_s_per_mm2']} s/mm², pipeline {row['pipeline_windows_per_s']} vs bare "
              f"{row['bare_encoder_windows_per_s']} windows/s ({row['pipeline_vs_bare']}), GPU busy {busy}, "
              f"largest batch {row['memory']['largest_batch']}; stages {timings}")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    result = {"benchmark": "gpu_slide_speed", **run_info("gpu_slide_speed.py"), "device": str(device), "gpu": gpu,
              "slide": str(slide.relative_to(REPO) if slide.is_relative_to(REPO) else slide), "smoke": args.smoke,
              "targets": {"uni2-h e2e s/mm2": 0.25, "uni2-h pipeline/bare": 0.85, "default e2e s/mm2": 0.05,
                          "detector stage s/mm2": 0.03, "gpu busy fraction": 0.8},
              "rows": rows}
    write_result(f"gpu_slide_speed_{device.type}" + ("_smoke" if args.smoke else ""), result, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
