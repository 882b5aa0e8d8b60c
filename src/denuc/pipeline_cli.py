"""``denuc predict``: detect and classify nuclei in image files, one CSV per image.

An image that fails (unreadable, too large, or any unexpected error, MemoryError included) is
reported in one line by name and the others are still processed (exit status 1 at the end);
Ctrl-C stops the run (exit 130).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELP = "detect and classify nuclei in images (files or folders) -> <stem>.csv with x,y,class,score,prob_*"

#: output format -> file suffix (``<stem><suffix>`` in --out).
FORMATS = {"csv": ".csv", "geojson": ".geojson"}


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files and/or folders of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--mpp", type=float, default=None, help="µm per pixel of the input images (required)")
    p.add_argument("--detector", default=None, help="detector checkpoint (default: the shipped one)")
    p.add_argument("--encoder", default=None, help="encoder name (default: the head's encoder)")
    p.add_argument("--weights", default=None, help="encoder weights file/folder/hf-hub:repo (default: the encoder's)")
    p.add_argument("--head", default=None, help="head checkpoint (default: the shipped BRCA-M2C head)")
    p.add_argument("--tta", type=int, choices=(1, 2, 4, 8), default=1,
                   help="detector test-time augmentation passes (default 1 = off; 4 = four rotations)")
    p.add_argument("--detector-window", type=int, default=None, metavar="PX",
                   help="detector inference window side at its mpp (default: the checkpoint's, 256); larger windows "
                        "are faster and may lose a little F1 (README, Results)")
    p.add_argument("--format", choices=tuple(FORMATS), default="csv",
                   help="csv (x,y,class,score,prob_*; what `denuc evaluate` reads) or geojson (QuPath detections)")
    p.add_argument("--overwrite", action="store_true", help="redo images whose output already exists")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: cuda, then mps, then cpu)")
    p.add_argument("--offline", action="store_true", help="never touch the network (HF_HUB_OFFLINE=1)")


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Image files from files and folders (folders: their images, sorted, not recursive).

    Raises:
        InputError: a path does not exist, a folder holds no image, or two inputs share a stem.
    """
    from denuc.data.image import IMAGE_SUFFIXES
    from denuc.errors import InputError

    files: list[Path] = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"{p}: folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen and seen[f.stem] != f:
            raise InputError(f"{seen[f.stem]} and {f} would both write outputs named {f.stem}; rename one")
        seen[f.stem] = f
    return list(seen.values())


def image_error_line(command: str, path: Path, e: BaseException) -> str:
    """One line reporting a failed image: ``denuc CMD: error: PATH: message``, naming the path
    once (DeNuC's messages usually start with it) and the type of an unexpected exception."""
    from denuc.data.image import describe_exception
    from denuc.errors import DenucError

    msg = str(e) if isinstance(e, DenucError) else describe_exception(e)
    msg = " ".join(msg.split())
    if not msg.startswith(f"{path}:"):
        msg = f"{path}: {msg}"
    return f"denuc {command}: error: {msg}"


def main(args: argparse.Namespace) -> int:
    from denuc.core.files import check_out_dir
    from denuc.core.mpp import check_mpp
    from denuc.data.image import prefetch_images
    from denuc.pipeline import DeNuC

    mpp = check_mpp(args.mpp, "--mpp")
    files = collect_inputs(args.inputs)
    out = check_out_dir(args.out)
    suffix = FORMATS[args.format]
    todo = [f for f in files if args.overwrite or not (out / f"{f.stem}{suffix}").is_file()]
    if len(todo) < len(files):
        print(f"skipping {len(files) - len(todo)} image(s) already done in {out} (use --overwrite to redo)")
    if not todo:
        return 0
    model = DeNuC.load(detector=args.detector, encoder=args.encoder, head=args.head, device=args.device,
                       weights=args.weights, offline=True if args.offline else None, tta=args.tta,
                       detector_window=args.detector_window)
    failed = 0
    t0 = time.perf_counter()
    for i, (f, image) in enumerate(prefetch_images(todo), 1):  # the next images are read meanwhile
        try:  # any failure is this image's: report it and go on (Ctrl-C still stops the run)
            if isinstance(image, Exception):
                raise image
            nuclei = model(image, mpp, name=f.stem)
            if args.format == "geojson":
                from denuc.export.geojson import write_geojson

                write_geojson(nuclei, out / f"{f.stem}{suffix}", model.meta.colors)
            else:
                nuclei.to_csv(out / f"{f.stem}{suffix}")
        except Exception as e:
            failed += 1
            print(image_error_line("predict", f, e), file=sys.stderr)
            del e, image  # frees the failed image's memory (and a MemoryError's traceback) now
            continue
        sp = nuclei.meta.get("speed", {})
        counts = {c: int((nuclei.class_ids == k).sum()) for k, c in enumerate(nuclei.class_names)}
        print(f"[{i}/{len(todo)}] {f.name}: {len(nuclei)} nuclei {counts} in {(time.perf_counter() - t0):.2f} s "
              f"(detect {sp.get('detect', 0):.0f} ms, encode {sp.get('encode', 0):.0f} ms, "
              f"classify {sp.get('classify', 0):.0f} ms)")
        t0 = time.perf_counter()
    if failed:
        print(f"denuc predict: {failed} of {len(todo)} image(s) failed; the others were written to {out}",
              file=sys.stderr)
        return 1
    return 0
