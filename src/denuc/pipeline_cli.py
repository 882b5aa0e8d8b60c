"""``denuc predict``: detect and classify every nucleus of images and whole slides.

Each input (image file, slide file, or a folder of them) goes through the one tile stream
(:mod:`denuc.stream`) and gets its own set of outputs in ``--out``, named by its stem: the
formats of ``--format`` plus ``<stem>.summary.json`` and ``<stem>.overlay.png``. Inputs whose
outputs all exist are skipped (``--overwrite`` redoes them); an interrupted input resumes from
its last finished chunk of tiles. An input that fails (unreadable, no mpp, or any unexpected
error, MemoryError included) is reported in one line by name and the others are still
processed (exit status 1 at the end); Ctrl-C stops the run (exit 130). ``denuc detect`` shares
all of this with detection only.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

HELP = ("detect and classify nuclei in images and whole slides (files or folders) -> <stem>.csv / .geojson(.gz) / "
        ".parquet, <stem>.summary.json and <stem>.overlay.png per input")


def add_common_options(p: argparse.ArgumentParser, command: str) -> None:
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
    p.add_argument("--format", default="csv", metavar="FMT[,FMT...]",
                   help="output formats, comma-separated: csv (x,y,x_um,y_um,class,score,det_score,prob_*,roi; what "
                        "`denuc evaluate` reads), geojson (QuPath detections; .geojson.gz for slides), parquet "
                        "(needs pyarrow: pip install 'denuc[parquet]') (default: %(default)s)")
    p.add_argument("--tissue", default="auto", choices=("auto", "none"),
                   help="auto: find tissue on a thumbnail of each slide and process only tiles that touch it (plain "
                        "images are processed whole); none: process every tile (default: %(default)s)")
    p.add_argument("--tissue-mask", default=None, metavar="FILE",
                   help="binary mask image of the slide (nonzero = tissue, any size with the slide's aspect ratio); "
                        "replaces --tissue (default: none)")
    p.add_argument("--roi", default=None, metavar="FILE.geojson",
                   help="QuPath GeoJSON annotations (polygons, holes honoured, level-0 px): only nuclei inside them are "
                        "reported, each with its region's name; the summary counts per region (default: none)")
    p.add_argument("--overwrite", action="store_true", help="redo inputs whose outputs already exist (default: skip)")
    p.add_argument("--overlay", action=argparse.BooleanOptionalAction, default=True,
                   help="write <stem>.overlay.png, a thumbnail with tissue outline and class-coloured nuclei "
                        "(default: on)")
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
    p.add_argument("--tta", type=int, choices=(1, 2, 4, 8), default=1,
                   help="detector test-time augmentation passes: fuse 2/4/8 mirrored or rotated passes (that many "
                        "times the detection work) (default: 1 = off)")
    p.add_argument("--detector-window", type=int, default=None, metavar="PX",
                   help="detector inference window side at its mpp (default: the checkpoint's, 256); larger windows "
                        "are faster and may lose a little F1 (docs/results.md)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    p.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnx"),
                   help="what runs the networks: torch (PyTorch, the reference), onnx (ONNX Runtime on the CPU, "
                        "pip install 'denuc[onnx]'; same results within float32 rounding), auto (onnx on the CPU "
                        "when installed, else torch; env DENUC_RUNTIME overrides) (default: %(default)s)")


def configure(p: argparse.ArgumentParser) -> None:
    add_common_options(p, "predict")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a model folder written by `denuc finetune` (detector + head + model.yaml); replaces "
                        "--detector/--head (default: the shipped models)")
    p.add_argument("--encoder", default=None, help="encoder name (default: the head's encoder)")
    p.add_argument("--weights", default=None,
                   help="encoder weights: file, folder or hf-hub:org/name (default: the encoder's own)")
    p.add_argument("--head", default=None, help="head checkpoint (default: the shipped BRCA-M2C head)")
    p.add_argument("--offline", action="store_true", help="never touch the network (HF_HUB_OFFLINE=1) (default: off)")


def collect_inputs(inputs: list[str], inputs_file: str | None = None) -> list[Path]:
    """Input files from files, folders (their images and slides, sorted, not recursive), globs
    and a list file.

    Raises:
        InputError: a path does not exist, nothing matches, a folder holds no image, or two
        inputs share a stem (they would write the same outputs).
    """
    from denuc.cohort.inputs import expand_inputs
    from denuc.data.image import IMAGE_SUFFIXES
    from denuc.errors import InputError
    from denuc.source import SLIDE_SUFFIXES

    if not inputs and not inputs_file:
        raise InputError("no input: give image or slide files, folders, globs or --inputs LIST")
    suffixes = tuple(dict.fromkeys([*IMAGE_SUFFIXES, *SLIDE_SUFFIXES]))
    return expand_inputs(inputs, inputs_file, suffixes=suffixes)


def image_error_line(command: str, path: Path, e: BaseException) -> str:
    """One line reporting a failed input: ``denuc CMD: error: PATH: message``, naming the path
    once (DeNuC's messages usually start with it) and the type of an unexpected exception."""
    from denuc.data.image import describe_exception
    from denuc.errors import DenucError

    msg = str(e) if isinstance(e, DenucError) else describe_exception(e)
    msg = " ".join(msg.split())
    if not msg.startswith(f"{path}:") and not msg.startswith(f"{path} "):
        msg = f"{path}: {msg}"
    return f"denuc {command}: error: {msg}"


def run_options(args: argparse.Namespace) -> Any:
    """:class:`denuc.stream.job.RunOptions` from the parsed shared options (validated)."""
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
        if v is not None and not Path(v).is_file():
            raise InputError(f"--{name.replace('_', '-')} {v}: no such file")
    return RunOptions(formats=parse_formats(args.format), tissue=args.tissue, tissue_mask=args.tissue_mask,
                      roi=args.roi, overwrite=args.overwrite, overlay=args.overlay, progress=args.progress,
                      chunk_tiles=args.chunk_tiles, stale_after=args.stale_after)


def run_inputs(command: str, args: argparse.Namespace, build: Any) -> int:
    """The input loop of ``predict`` and ``detect``.

    Args:
        command: ``predict`` or ``detect`` (for messages).
        args: parsed options (:func:`add_common_options`).
        build: ``() -> (TileStream, models dict, colors)``, called once, only if some input needs work.

    Returns:
        0 when every input was done or skipped, 1 when some failed.
    """
    from denuc.cohort.claims import claimed_inputs
    from denuc.cohort.inputs import parse_shard, shard, world
    from denuc.core.files import check_out_dir
    from denuc.core.mpp import check_mpp
    from denuc.sinks import output_paths
    from denuc.source import is_slide_path
    from denuc.stream.job import run_source

    if args.mpp is not None:
        check_mpp(args.mpp, "--mpp")
    opts = run_options(args)
    files = collect_inputs(args.inputs, args.inputs_file)
    rank, size = world()
    if args.shard is not None:
        rank, size = parse_shard(args.shard)
        if args.shard_only:
            files, rank, size = shard(files, rank, size), 0, 1
    elif args.shard_only:
        from denuc.errors import InputError

        raise InputError("--shard-only needs --shard I/N")
    out = check_out_dir(args.out)

    def finals(f: Path) -> list[Path]:
        return output_paths(f.stem, out, "slide" if is_slide_path(f) else "image", opts.formats, opts.overlay)

    def is_done(f: Path) -> bool:
        return not opts.overwrite and all(p.is_file() for p in finals(f))

    todo = [f for f in files if not is_done(f)]
    if len(todo) < len(files):
        print(f"skipping {len(files) - len(todo)} input(s) already done in {out} (use --overwrite to redo)")
    if not todo:
        _sweep_claims(out, files, is_done, opts.stale_after)
        _summary_table(out)
        return 0
    runner = models = colors = None
    failed = done = busy = 0
    for f, claim in claimed_inputs(todo, out, is_done, rank, size, stale_after=opts.stale_after):
        t0 = time.perf_counter()
        if runner is None:  # models load once, when some input needs them; their errors stop the run
            runner, models, colors = build()
        try:  # any failure is this input's: report it and go on (Ctrl-C still stops the run)
            res = run_source(runner, f, mpp=args.mpp, name=f.stem, out_dir=out, opts=opts, models=models,
                             colors=colors, claim=claim)
        except Exception as e:
            failed += 1
            print(image_error_line(command, f, e), file=sys.stderr)
            del e  # frees a MemoryError's traceback now
            continue
        if res.status == "busy":
            busy += 1
            continue
        if res.status == "skipped":
            continue
        done += 1
        s = res.summary
        counts = s.get("counts") or {}
        n = s.get("nuclei")
        tiles = s.get("tiles", {})
        print(f"{f.name}: {'' if n is None else f'{n} nuclei '}{counts if counts else ''} in "
              f"{time.perf_counter() - t0:.2f} s ({tiles.get('selected', '?')} of {tiles.get('total', '?')} tiles) -> "
              f"{', '.join(p.name for p in res.paths)}")
        stages = s.get("timings_ms", {})
        if stages:
            print("  stage times: " + ", ".join(f"{k} {v / 1e3:.2f} s" for k, v in stages.items() if v >= 5))
        if args.profile:
            from denuc.stream.timing import StageTimer

            t = StageTimer()
            for k, v in s.get("timings_ms", {}).items():
                t.add(k, v)
            print(t.table(s.get("wall_s")))
    _sweep_claims(out, files, is_done, opts.stale_after)
    _summary_table(out)
    if failed:
        written = f"{done} written to {out}" if done else "nothing was written"
        print(f"denuc {command}: {failed} of {len(todo)} input(s) failed; {written}", file=sys.stderr)
        return 1
    if busy:
        print(f"{busy} input(s) were being processed by another process; rerun to finish any it left")
    return 0


def _sweep_claims(out: Path, files: list[Path], is_done: Any, stale_after: float) -> None:
    """Remove claims left on finished inputs by processes that died after writing them (a live
    owner's claim stays)."""
    from denuc.cohort.claims import claim_path, try_claim

    for f in files:
        if claim_path(out, f.stem).exists() and is_done(f):
            c = try_claim(out, f.stem, stale_after=stale_after)
            if c is not None:
                c.release()


def _summary_table(out: Path) -> None:
    """``summary.csv`` over every input's summary in ``out`` (when there is more than one)."""
    from denuc.cohort.summary import write_summary_table

    if len(list(out.glob("*.summary.json"))) > 1:
        write_summary_table(out)


def process_device(name: str | None) -> Any:
    """The device this process uses: ``name`` (default: cuda, then mps, then cpu); under torchrun
    a CUDA device becomes ``cuda:LOCAL_RANK`` (one GPU per process)."""
    from denuc.train.detector import pick_device
    from denuc.train.distributed import launched_world, rank_device

    dev = pick_device(name)
    if name is not None and ":" in str(name):
        return dev
    return rank_device(dev, launched_world()[2])


def main(args: argparse.Namespace) -> int:
    from denuc.core.mpp import check_mpp

    if args.mpp is not None:
        check_mpp(args.mpp, "--mpp")

    def build() -> tuple[Any, dict[str, Any], dict[str, tuple[int, int, int]]]:
        from denuc.pipeline import DeNuC

        model = DeNuC.load(detector=args.detector, encoder=args.encoder, head=args.head,
                           device=process_device(args.device),
                           weights=args.weights, offline=True if args.offline else None, tta=args.tta,
                           detector_window=args.detector_window, model=args.model, runtime=args.runtime)
        from denuc.runtime import single_thread_glue

        single_thread_glue([model.detector.runner, model.featurizer.runner])
        return model.stream(tile_px=args.tile_px, workers=args.workers), model.models(), model._colors()

    return run_inputs("predict", args, build)
