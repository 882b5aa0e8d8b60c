"""Speed and peak memory of the output sinks: one million synthetic nuclei of a slide, streamed in
chunks of 50,000 to each format, each format in a fresh process.

The slide is 100,000 x 75,000 px at 0.25 µm/px with 3 classes and ROI names on (about 5% of
nuclei unclassified, two ROIs), a 2048 x 1536 thumbnail and a tissue mask for the overlay.
Every chunk carries scores, detector scores, class probabilities and ROI names, as the
pipeline's do. Only the sink calls (``write`` of every chunk and ``close``) are timed; the
chunks are made in the same process from a seeded generator, one at a time.

Each format runs twice, each time in a fresh subprocess: once for ``seconds`` and the rise of
peak resident memory over the process before the first chunk (``rss_rise_mb``, from
``ru_maxrss``, which also sees pyarrow's and zlib's own allocations), and once under
``tracemalloc`` for the peak of memory traced during the sink calls (``traced_peak_mb``:
Python objects and numpy arrays; tracing slows the run, so its time is not reported).
``--check-nuclei`` repeats the traced run with fewer nuclei: equal peaks show that memory does
not grow with the number of nuclei (it is bounded by one chunk).

    python benchmarks/writers_speed.py [--nuclei 1000000] [--chunk 50000] [--check-nuclei 200000] [--report]
    python benchmarks/writers_speed.py --formats 'h5ad (no embeddings)' 'h5ad (float16 embeddings)' \
        'h5ad (float32 embeddings)' 'density (50 µm grid)' --name writers_speed_cells --report
    python benchmarks/writers_speed.py --formats 'spatialdata (no embeddings)' \
        'spatialdata (float16 embeddings)' --name writers_speed_spatialdata --report

The h5ad and spatialdata rows carry ``--feature-dim`` (472) random float32 features per nucleus,
stored as the row's dtype; ``bytes_per_nucleus`` is the file size over the nuclei (a ``.zarr``
store's size is the sum of its files).

Prints a table and writes ``benchmarks/results/writers_speed.json`` (with ``--report`` also
``benchmarks/reported/writers_speed.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import run_info, write_result

#: benchmark row name -> (sink class name in denuc.sinks, input kind[, embeddings dtype])
FORMATS = {
    "csv": ("CsvSink", "slide"),
    "geojson.gz": ("GeoJsonSink", "slide"),
    "geojson (image kind, plain)": ("GeoJsonSink", "image"),
    "parquet": ("ParquetSink", "slide"),
    "summary": ("SummarySink", "slide"),
    "overlay": ("OverlaySink", "slide"),
    "h5ad (no embeddings)": ("AnnDataSink", "slide", "none"),
    "h5ad (float16 embeddings)": ("AnnDataSink", "slide", "float16"),
    "h5ad (float32 embeddings)": ("AnnDataSink", "slide", "float32"),
    "density (50 µm grid)": ("DensitySink", "slide"),
    "spatialdata (no embeddings)": ("SpatialDataSink", "slide", "none"),
    "spatialdata (float16 embeddings)": ("SpatialDataSink", "slide", "float16"),
}

CHILD = r"""
import json, resource, sys, tempfile, time, tracemalloc
from pathlib import Path
import numpy as np, pandas, pyarrow.parquet, PIL.Image, PIL.ImageDraw, scipy.ndimage, torch  # imports before the baseline
import denuc.sinks as sinks
import denuc.sinks.anndata, denuc.sinks.density, denuc.sinks.spatialdata
from denuc.core.result import Nuclei
cls_name, kind, n_total, chunk, trace = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
emb, dim = sys.argv[6], int(sys.argv[7])
SINK = {"AnnDataSink": denuc.sinks.anndata.AnnDataSink, "DensitySink": denuc.sinks.density.DensitySink,
        "SpatialDataSink": denuc.sinks.spatialdata.SpatialDataSink}.get(cls_name)
if cls_name == "SpatialDataSink":  # its libraries are imported before the baseline too
    import anndata, geopandas, spatialdata, spatialdata.models, zarr
CLS = ("lymphocyte", "tumor", "stromal")
W, H, MPP = 100_000, 75_000, 0.25
ROIS = np.array(["", "", "tumour bed", "margin"], dtype=object)

def make(rng, n):
    probs = rng.dirichlet(np.ones(3), n).astype(np.float32)
    ids = probs.argmax(1)
    ids[rng.random(n) < 0.05] = -1
    det = rng.random(n).astype(np.float32)
    xy = np.column_stack([rng.uniform(0, W, n), rng.uniform(0, H, n)])
    feats = rng.standard_normal((n, dim), dtype=np.float32) if emb != "none" else None
    return Nuclei(xy, det * probs.max(1), ids, CLS, probs, MPP, det_scores=det, roi=ROIS[rng.integers(0, 4, n)],
                  features=feats)

mask = np.zeros((750, 1000), bool)
mask[100:650, 150:850] = True  # 100 level-0 px per mask px
with tempfile.TemporaryDirectory() as tmp:
    info = sinks.OutputInfo("slide", Path(tmp), kind, CLS, {}, MPP, (W, H),
                            thumbnail=np.full((1536, 2048, 3), 235, np.uint8), thumb_downsample=W / 2048,
                            tissue_mask=mask, tissue_downsample=100.0, tissue_area_um2=float(mask.sum()) * 100 * 100 * MPP ** 2,
                            roi_areas_um2={"tumour bed": 4e6, "margin": 2e6},
                            roi_outlines=[np.array([[20000.0, 20000], [60000, 20000], [60000, 50000], [20000, 50000]])],
                            sink_options={"embeddings": emb, "density_grid_um": 50.0})
    rng = np.random.default_rng(0)
    make(rng, 10)  # numpy's first-call allocations before the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if trace:
        tracemalloc.start()
    sink = (SINK or getattr(sinks, cls_name))(info)
    spent, done = 0.0, 0
    while done < n_total:
        c = make(rng, min(chunk, n_total - done))
        t0 = time.perf_counter()
        sink.write(c)
        spent += time.perf_counter() - t0
        done += len(c)
        del c
    t0 = time.perf_counter()
    path = sink.close({"benchmark": True})
    spent += time.perf_counter() - t0
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    out = {"seconds": round(spent, 2), "rss_rise_mb": round((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, 1),
           "file": path.name, "file_mb": round(size / 2**20, 1)}
    if trace:
        out = {"traced_peak_mb": round(tracemalloc.get_traced_memory()[1] / 2**20, 1)}
print(json.dumps(out))
"""


def child(cls_name: str, kind: str, n: int, chunk: int, trace: bool, emb: str = "none", dim: int = 0) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD, cls_name, kind, str(n), str(chunk), "1" if trace else "0",
                        emb, str(dim)], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{cls_name} ({kind}) failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nuclei", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=50_000)
    ap.add_argument("--check-nuclei", type=int, default=200_000,
                    help="also trace a run with this many nuclei (0 = skip): the peak should not change")
    ap.add_argument("--formats", nargs="+", choices=tuple(FORMATS), default=list(FORMATS))
    ap.add_argument("--feature-dim", type=int, default=472,
                    help="channels of the h5ad embeddings (472: the shipped efficientnet-lite0 head's)")
    ap.add_argument("--name", default="writers_speed", help="result name (benchmarks/results/<name>.json)")
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    args = ap.parse_args()
    rows = []
    for name in args.formats:
        cls_name, kind, *rest = FORMATS[name]
        emb = rest[0] if rest else "none"
        dim = args.feature_dim if emb != "none" else 0
        row = {"format": name, "sink": cls_name, "kind": kind,
               **child(cls_name, kind, args.nuclei, args.chunk, False, emb, dim),
               **child(cls_name, kind, args.nuclei, args.chunk, True, emb, dim)}
        if rest:
            row.update({"embeddings": emb, "feature_dim": dim,
                        "bytes_per_nucleus": round(row["file_mb"] * 2**20 / args.nuclei, 1)})
        row["nuclei_per_s"] = round(args.nuclei / row["seconds"]) if row["seconds"] else None
        if args.check_nuclei:
            row[f"traced_peak_mb_{args.check_nuclei}"] = child(cls_name, kind, args.check_nuclei, args.chunk,
                                                               True, emb, dim)["traced_peak_mb"]
        rows.append(row)
        print(f"{name:>28}: {row['seconds']:6.2f} s, rss +{row['rss_rise_mb']:6.1f} MiB, "
              f"traced peak {row['traced_peak_mb']:6.1f} MiB, {row['file_mb']:7.1f} MiB file", flush=True)
    check = f"traced_peak_mb_{args.check_nuclei}"
    print(f"\n{'format':>28} {'s':>7} {'nuclei/s':>10} {'rss+ MiB':>9} {'traced MiB':>11} "
          f"{'(' + str(args.check_nuclei) + ')':>10} {'file MiB':>9}")
    for r in rows:
        print(f"{r['format']:>28} {r['seconds']:7.2f} {r['nuclei_per_s'] or 0:10d} {r['rss_rise_mb']:9.1f} "
              f"{r['traced_peak_mb']:11.1f} {r.get(check, float('nan')):10.1f} {r['file_mb']:9.1f}")
    chunk_mb = args.chunk * (16 + 4 + 4 + 12 + 8 + 8) / 2**20
    write_result(args.name, {
        "benchmark": "writers_speed", "feature_dim": args.feature_dim, "nuclei": args.nuclei, "chunk": args.chunk, "classes": 3, "roi": True,
        "slide_px": [100_000, 75_000], "mpp": 0.25, "device": "cpu", "threads": 1,
        "chunk_arrays_mb": round(chunk_mb, 2), "check_nuclei": args.check_nuclei,
        **run_info("writers_speed.py", one_thread=True), "results": rows}, args.report)


if __name__ == "__main__":
    main()
