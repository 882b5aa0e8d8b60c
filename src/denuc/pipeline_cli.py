"""``denuc predict``: detect and classify every nucleus of images and whole slides.

Each input (image file, slide file, or a folder of them) goes through the one tile stream
(:mod:`denuc.stream`) and gets its own set of outputs in ``--out``, named by its stem: the
formats of ``--format`` plus ``<stem>.summary.json`` and ``<stem>.overlay.png``. This module only
parses options and prints: the run itself is :func:`denuc.cohort.runner.run_cohort`, which
Python's :meth:`denuc.pipeline.DeNuC.predict_many` calls alike. Inputs finished with the same
settings are skipped, inputs finished or partly done with other settings are refused
(``--overwrite`` redoes both); an interrupted input resumes from its last finished chunk of
tiles. An input that fails (unreadable, no mpp, or any unexpected error, MemoryError included)
is reported in one line by name, leaves no output, and the others are still processed (exit
status 1 at the end); Ctrl-C stops the run (exit 130). ``denuc detect`` shares all of this with
detection only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

HELP = ("detect and classify nuclei in images and whole slides (files or folders) -> <stem>.csv / .geojson(.gz) / "
        ".parquet, <stem>.summary.json and <stem>.overlay.png per input")


def add_common_options(p: argparse.ArgumentParser, command: str = "predict") -> None:
    """Options shared by ``denuc predict`` and ``denuc detect`` (inputs, outputs, slides, runtime)."""
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image or slide files, folders of them, or quoted glob patterns ('slides/*.svs')")
    p.add_argument("--inputs", dest="inputs_file", default=None, metavar="LIST",
                   help="a text file with one input path per line (# comments; relative to the file) (default: none)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--mpp", type=float, default=None,
                   help="µm per pixel of level 0 of every input. Needed for plain images (PNG, JPEG, BMP and TIFFs "
                        "without resolution tags); slides and TIFFs carry it in their metadata, which --mpp "
                        "overrides (default: from the file; an input without it fails with a message saying so)")
    p.add_argument("--mpp-default", type=float, default=None, metavar="MPP",
                   help="µm per pixel of level 0 for the inputs that carry none (plain images), while slides keep "
                        "their own: one run for a folder mixing slides and PNGs. --mpp wins over it "
                        "(default: none)")
    columns = ("x,y,x_um,y_um,class (always nucleus),score,det_score" if command == "detect"
               else "x,y,x_um,y_um,class,score,det_score,prob_<class>...")
    p.add_argument("--format", default="csv", metavar="FMT[,FMT...]",
                   help=f"output formats, comma-separated: csv ({columns}, and roi with --roi; what "
                        "`denuc evaluate` reads), geojson (QuPath detections; .geojson.gz for slides), parquet "
                        "(needs pyarrow: pip install 'denuc[parquet]'), h5ad (AnnData for scanpy/squidpy: obs = class, "
                        "scores, probabilities, roi; obsm['spatial'] = level-0 (x, y) px; obsm['X_denuc'] = the point "
                        "features the head saw; needs h5py: pip install 'denuc[anndata]'; docs/spatial.md), "
                        "spatialdata (a SpatialData store <stem>.zarr for napari-spatialdata: the nuclei as points, "
                        "the h5ad's table linked to them, tissue and ROI polygons; needs pip install "
                        "'denuc[spatialdata]'), density "
                        "(per-class counts and densities on a grid of --density-grid µm: <stem>.density.geojson for "
                        "QuPath and a <stem>.density.<class>.png heat map per class) (default: %(default)s)")
    p.add_argument("--embeddings", default="float16", choices=("float16", "float32", "none"),
                   help="point features in the h5ad and spatialdata outputs: float16 (half the size), float32 (exactly what the head "
                        "classified) or none (obs and positions only) (default: %(default)s)")
    p.add_argument("--density-grid", type=float, default=None, metavar="UM",
                   help="write the density output on a grid of UM x UM µm cells (adds 'density' to --format) "
                        "(default: off; 50 µm when --format has density)")
    p.add_argument("--tissue", default="auto", choices=("auto", "none"),
                   help="auto: find tissue on a thumbnail of each input (slide or image) and report only nuclei "
                        "whose centre lies in it; densities are per mm² of that tissue; none: report every nucleus "
                        "over the whole image (default: %(default)s)")
    p.add_argument("--tissue-mask", default=None, metavar="FILE|DIR",
                   help="binary mask image of the slide (nonzero = tissue, any size with the slide's aspect "
                        "ratio): only nuclei inside it are reported, densities are per mm² of it; replaces "
                        "--tissue. A folder gives each input its own mask, <stem>.png/.tif/.jpg (or <file "
                        "name>.png ...); an input without one is reported and not processed (default: none)")
    p.add_argument("--roi", default=None, metavar="FILE.geojson|DIR",
                   help="QuPath GeoJSON annotations (polygons, holes honoured, level-0 px): only nuclei inside them are "
                        "reported, each with its region's name; the summary counts per region. A folder gives each "
                        "input its own file, <stem>.geojson or <file name>.geojson (QuPath exports one per image); an "
                        "input without one is reported and not processed (default: none)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo inputs whose outputs exist, also those made with other settings (default: skip "
                        "inputs done with the same settings, refuse those done with others, naming what changed)")
    p.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=True,
                   help="write <stem>.overlay.png, a thumbnail with the tissue and ROI outlines (holes too), each "
                        "nucleus ringed in its class colour, and a legend with the count per class (default: on)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar per input (default: on when stderr is a terminal)")
    p.add_argument("--profile", action="store_true",
                   help="print a per-stage time table per input (always written into the summary) (default: off)")
    p.add_argument("--tile-px", type=int, default=2048, metavar="PX",
                   help="tile core side in px at the detector's mpp: larger tiles waste less on overlaps, use more "
                        "memory (default: %(default)s)")
    p.add_argument("--chunk-tiles", type=int, default=8, metavar="N",
                   help="tiles per saved chunk: an interrupted input resumes from its last finished chunk "
                        "(default: %(default)s)")
    p.add_argument("--workers", type=int, default=2, metavar="N",
                   help="loader threads that read and resample tiles ahead of the models (default: %(default)s)")
    p.add_argument("--jobs", default="auto", metavar="N|auto",
                   help="inputs this process runs at once, each in a thread with an equal share of the CPU threads; "
                        "outputs are the same whatever it is. auto: 2 on a CPU with two or more threads when two or "
                        "more inputs are to do (small images keep the cores busier side by side), 1 on a GPU "
                        "(default: %(default)s)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="this process is worker I of N (e.g. SLURM array task $SLURM_ARRAY_TASK_ID/"
                        "$SLURM_ARRAY_TASK_COUNT): it starts with every N-th input from I, then helps with inputs "
                        "the others have not claimed (claims in --out keep every input to one process). Under "
                        "torchrun or srun the rank and world size are read from the environment (default: "
                        "from the environment, else the only worker)")
    p.add_argument("--shard-only", action="store_true",
                   help="with --shard: process only this shard's inputs, never the others' (for output folders "
                        "that the workers do not share) (default: off)")
    p.add_argument("--stale-after", type=float, default=600.0, metavar="S",
                   help="seconds after which another process's claim on an input (a .<stem>.claim file in --out, "
                        "refreshed every chunk) counts as abandoned and is taken over (default: %(default)s)")
    p.add_argument("--detector", default=None, help="detector checkpoint (default: the shipped one)")
    p.add_argument("--threshold", type=float, default=None,
                   help="detector score threshold in [0, 1) (default: the checkpoint's, or the --model folder's, "
                        "chosen on val)")
    p.add_argument("--tta", type=int, choices=(1, 2, 4, 8), default=1,
                   help="detector test-time augmentation passes: fuse 2/4/8 mirrored or rotated passes (that many "
                        "times the detection work) (default: 1 = off)")
    p.add_argument("--detector-window", type=int, default=None, metavar="PX",
                   help="detector inference window side at its mpp (default: the checkpoint's, 256); larger windows "
                        "are faster and may lose a little F1 (docs/results.md)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    p.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnx", "onnx-int8"),
                   help="what runs the networks: torch (PyTorch, the reference); onnx (ONNX Runtime on the CPU, "
                        "pip install 'denuc[onnx]'; same results within float32 rounding); onnx-int8 (ONNX Runtime "
                        "with both networks quantized to 8 bits: faster than onnx on the CPU, at a small accuracy "
                        "cost, see docs/runtime.md); auto (on the CPU with ONNX Runtime installed: the "
                        "detector on onnx and a CNN encoder on onnx-int8, else torch; env DENUC_RUNTIME overrides) "
                        "(default: %(default)s)")


def configure(p: argparse.ArgumentParser) -> None:
    add_common_options(p, "predict")
    p.add_argument("--model", default=None, metavar="NAME|DIR",
                   help="a shipped model's name (`denuc models`: brca-m2c, consep) or a model folder written by "
                        "`denuc finetune` (detector + head + model.yaml); replaces --detector/--head/--encoder/"
                        "--weights, which it refuses alongside (default: brca-m2c, the shipped detector and "
                        "BRCA-M2C head)")
    p.add_argument("--encoder", default=None, help="encoder name (default: the head's encoder)")
    p.add_argument("--weights", default=None,
                   help="encoder weights: file, folder or hf-hub:org/name (default: the encoder's own)")
    p.add_argument("--head", default=None, help="head checkpoint (default: the shipped BRCA-M2C head)")
    p.add_argument("--offline", action="store_true", help="never touch the network (HF_HUB_OFFLINE=1) (default: off)")


def run_options(args: argparse.Namespace) -> Any:
    """:class:`denuc.stream.job.RunOptions` from the parsed shared options (validated)."""
    import math

    from denuc.errors import InputError
    from denuc.sinks import parse_formats
    from denuc.stream.job import RunOptions

    for name in ("tile_px", "chunk_tiles", "workers"):
        v = getattr(args, name)
        if v < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1; got {v}")
    if not args.stale_after > 0:
        raise InputError(f"--stale-after must be positive seconds; got {args.stale_after}")
    for name in ("tissue_mask", "roi"):
        v = getattr(args, name)
        if v is not None and not Path(v).exists():
            raise InputError(f"--{name.replace('_', '-')} {v}: no such file or folder")
    grid = getattr(args, "density_grid", None)
    if grid is not None and not (math.isfinite(grid) and grid > 0):
        raise InputError(f"--density-grid must be a positive number of µm; got {grid}")
    formats = parse_formats(args.format + (",density" if grid is not None else ""))
    return RunOptions(formats=formats, tissue=args.tissue, tissue_mask=args.tissue_mask,
                      roi=args.roi, overwrite=args.overwrite, overlay=args.overlay, progress=args.progress,
                      chunk_tiles=args.chunk_tiles, stale_after=args.stale_after,
                      embeddings=getattr(args, "embeddings", "float16"), density_grid_um=grid or 50.0)


def _print_result(command: str, r: Any, profile: bool) -> None:
    """One input's lines: a failure on stderr, a finished input's counts, times and files."""
    if r.status == "failed":
        print(f"denuc {command}: error: {r.error}", file=sys.stderr)
        return
    if r.status != "done":
        return
    s = r.summary
    counts = s.get("counts") or {}
    n = s.get("nuclei")
    tiles = s.get("tiles", {})
    print(f"{r.path.name}: {'' if n is None else f'{n} nuclei '}{counts if counts else ''} in "
          f"{s.get('wall_s', r.seconds):.2f} s ({tiles.get('selected', '?')} of {tiles.get('total', '?')} tiles) -> "
          f"{', '.join(p.name for p in r.paths)}")
    stages = s.get("timings_ms", {})
    if stages:
        print("  stage times: " + ", ".join(f"{k} {v / 1e3:.2f} s" for k, v in stages.items() if v >= 5))
    if profile:
        from denuc.stream.timing import StageTimer

        t = StageTimer()
        for k, v in stages.items():
            t.add(k, v)
        print(t.table(s.get("wall_s")))


def run_inputs(command: str, args: argparse.Namespace, build: Any) -> int:
    """``predict`` and ``detect``: :func:`denuc.cohort.runner.run_cohort` with the parsed options,
    printing each input's result and the run's last line.

    Returns:
        0 when every input was done or skipped, 1 when some failed.
    """
    from denuc.cohort.inputs import parse_shard
    from denuc.cohort.runner import run_cohort

    opts = run_options(args)
    res = run_cohort(args.inputs, args.out, build, opts=opts, inputs_file=args.inputs_file, mpp=args.mpp,
                     mpp_default=args.mpp_default,
                     shard=parse_shard(args.shard) if args.shard is not None else None, shard_only=args.shard_only,
                     on_result=lambda r: _print_result(command, r, args.profile), on_note=print, jobs=args.jobs)
    line = res.message()
    if not res.ok:
        print(f"denuc {command}: {line}", file=sys.stderr)
        return 1
    print(line)
    return 0


def process_device(name: str | None) -> Any:
    """The device this process uses: ``name`` (default: cuda, then mps, then cpu); under torchrun
    a CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per process)."""
    from denuc.core.device import process_device as device_of_process

    return device_of_process(name)


def check_model_options(args: argparse.Namespace) -> None:
    """``--model`` replaces ``--detector/--head/--encoder/--weights``: refuse them together."""
    from denuc.errors import InputError

    if args.model is None:
        return
    given = [f"--{n}" for n in ("detector", "head", "encoder", "weights") if getattr(args, n, None) is not None]
    if given:
        raise InputError(f"--model {args.model} replaces {', '.join(given)}: give either the model folder or "
                         "the separate models, not both")


def main(args: argparse.Namespace) -> int:
    from denuc.core.mpp import check_mpp
    from denuc.detect.api import check_threshold

    check_model_options(args)
    if args.mpp is not None:
        check_mpp(args.mpp, "--mpp")
    if args.threshold is not None:
        check_threshold(args.threshold)

    def build() -> tuple[Any, dict[str, Any], dict[str, tuple[int, int, int]]]:
        from denuc.pipeline import DeNuC
        from denuc.runtime import single_thread_glue

        model = DeNuC.load(detector=args.detector, encoder=args.encoder, head=args.head,
                           device=process_device(args.device),
                           weights=args.weights, offline=True if args.offline else None, tta=args.tta,
                           detector_window=args.detector_window, model=args.model, runtime=args.runtime,
                           threshold=args.threshold)
        single_thread_glue([getattr(model.detector, "runner", None), getattr(model.featurizer, "runner", None)])
        return model.stream(tile_px=args.tile_px, workers=args.workers), model.models(), model._colors()

    return run_inputs("predict", args, build)
