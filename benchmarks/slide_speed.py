"""Whole-slide runs on this machine: seconds per mm² of tissue, tiles skipped, peak memory.

Slides (made by ``benchmarks/make_test_slide.py`` when missing, under ``runs/test_slides/``):

* ``brca``: BRCA-M2C test images (0.5 µm/px, upsampled to a 0.25 µm/px level 0) in a grid on
  glass, an Aperio-style pyramidal JPEG TIFF; its ground-truth points give detection F1 through
  the whole slide path (denuc protocol, 3 µm);
* ``glass``: a 100,000 x 100,000 px mostly-glass slide with a few tissue islands;
* ``png``: a plain PNG of ``--png-side`` px a side at 0.5 µm/px tiled from BRCA-M2C images (a
  large lab tile: read whole, processed in tiles).

Each (slide, command) runs ``denuc detect`` or ``denuc predict`` in a fresh process and reports
its wall time, peak resident memory (``ru_maxrss``) and the per-stage times, tiles and tissue
area from ``<stem>.summary.json``.

    python benchmarks/slide_speed.py [--slides brca glass png] [--commands detect predict] [--threads 2] [--report]

Prints a table and writes ``benchmarks/results/slide_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import run_info, write_result

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(int(sys.argv[1]))
from denuc.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[2:])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t0,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_slide(kind: str, path: Path, png_side: int) -> Path:
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind in ("brca", "glass"):
        subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_test_slide.py"), kind, "--out", str(path)],
                       check=True)
        return path
    import numpy as np
    from PIL import Image

    from denuc.data.image import read_image
    from denuc.data.paths import brca_m2c_dir

    root = brca_m2c_dir()
    stems = sorted((root / "images").glob("*.png"))[:16]
    tiles = [read_image(p) for p in stems]
    side = min(min(t.shape[:2]) for t in tiles)
    canvas = np.zeros((png_side, png_side, 3), np.uint8)
    k = 0
    for y in range(0, png_side, side):
        for x in range(0, png_side, side):
            t = tiles[k % len(tiles)][:side, :side]
            k += 1
            canvas[y:y + side, x:x + side] = t[:png_side - y, :png_side - x]
    Image.fromarray(canvas).save(path)
    return path


def f1_against(slide: Path, csv: Path) -> dict[str, float] | None:
    """Detection F1 of ``csv`` against the slide's ground-truth points (denuc protocol, 3 µm)."""
    gt = slide.with_name(slide.stem + "_points.csv")
    if not gt.is_file():
        return None
    from denuc.core.result import Nuclei
    from denuc.evaluate.matching import match

    g = Nuclei.read_csv(gt)
    p = Nuclei.read_csv(csv)
    pi, _ = match("denuc", p.xy, p.scores, g.xy, 3.0 / 0.25)
    tp = len(pi)
    prec, rec = tp / max(len(p), 1), tp / max(len(g), 1)
    return {"precision": round(prec, 4), "recall": round(rec, 4),
            "f1": round(2 * prec * rec / max(prec + rec, 1e-12), 4), "gt": len(g), "pred": len(p)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slides", nargs="+", default=["brca", "glass", "png"], choices=["brca", "glass", "png"],
                    help="test slides to run (default: all)")
    ap.add_argument("--commands", nargs="+", default=["detect", "predict"], choices=["detect", "predict"],
                    help="detection only and/or the whole pipeline (default: both)")
    ap.add_argument("--png-side", type=int, default=4000, help="png: side in px at 0.5 µm/px (default 4000)")
    ap.add_argument("--slide-dir", type=Path, default=REPO / "runs" / "test_slides",
                    help="where the test slides are kept (default runs/test_slides)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    args = ap.parse_args()
    rows = []
    for kind in args.slides:
        path = make_slide(kind, args.slide_dir / (f"{kind}.png" if kind == "png" else f"{kind}.svs"), args.png_side)
        for cmd in args.commands:
            with tempfile.TemporaryDirectory() as out:
                argv = [cmd, str(path), "--out", out, "--no-progress", "--device", args.device]
                if kind == "png":
                    argv += ["--mpp", "0.5"]
                env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
                r = subprocess.run([sys.executable, "-c", CHILD, str(args.threads), *argv], capture_output=True,
                                   text=True, env=env)
                if r.returncode != 0:
                    sys.exit(f"{kind} {cmd} failed:\n{r.stderr[-3000:]}")
                res = json.loads(r.stdout.strip().splitlines()[-1])
                s = json.loads((Path(out) / f"{path.stem}.summary.json").read_text())
                area = s.get("tissue_area_mm2") or 0.0
                t = s["tiles"]
                row = {"slide": kind, "command": cmd, "size": s["size"], "mpp": s["mpp"], "mpp_source": s["mpp_source"],
                       "tissue_mm2": round(area, 3), "seconds": round(res["seconds"], 2),
                       "s_per_mm2": round(res["seconds"] / area, 3) if area else None,
                       "peak_rss_mb": round(res["peak_rss_mb"]), "nuclei": s["nuclei"], "tiles": t,
                       "tiles_skipped_tissue_frac": round(t["skipped_tissue"] / max(t["total"], 1), 4),
                       "tiles_without_nuclei_frac": round(s.get("tiles_without_nuclei", 0) / max(t["selected"], 1), 4),
                       "timings_ms": s["timings_ms"]}
                if kind == "brca":
                    row["detection"] = f1_against(path, Path(out) / f"{path.stem}.csv")
                rows.append(row)
                print(f"{kind:>6} {cmd:>8}: {row['seconds']:8.1f} s, {row['tissue_mm2']:7.2f} mm² tissue, "
                      f"{row['s_per_mm2']} s/mm², peak {row['peak_rss_mb']} MiB, {row['nuclei']} nuclei, tiles "
                      f"{t['selected']}/{t['total']}", flush=True)
    print(f"\n{'slide':>6} {'command':>8} {'s/mm²':>7} {'tissue mm²':>10} {'skip tissue':>11} {'no nuclei':>9} "
          f"{'peak MiB':>8}")
    for r in rows:
        print(f"{r['slide']:>6} {r['command']:>8} {r['s_per_mm2']!s:>7} {r['tissue_mm2']:>10} "
              f"{r['tiles_skipped_tissue_frac']:>11.3f} {r['tiles_without_nuclei_frac']:>9.3f} {r['peak_rss_mb']:>8}")
    write_result("slide_speed", {"benchmark": "slide_speed", "device": args.device, "threads": args.threads,
                                 **run_info("slide_speed.py"), "results": rows}, args.report)


if __name__ == "__main__":
    main()
