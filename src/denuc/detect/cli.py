"""``denuc detect``: find nuclei in images and write one ``<stem>.csv`` (``x,y,class,score``)
per image. Existing CSVs are skipped unless ``--overwrite`` (so a crashed run resumes);
an image that fails (unreadable, too large, or any unexpected error, MemoryError included)
is reported in one line by name, the others are still processed, and the exit status is 1
at the end; Ctrl-C stops the run (exit 130). Inputs are collected as by ``denuc predict``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "detect nuclei (points) in images; writes <stem>.csv per image"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    parser.add_argument("--out", required=True, type=Path, help="output folder for <stem>.csv files")
    parser.add_argument("--mpp", type=float, default=None, help="µm per pixel of the input images (required)")
    parser.add_argument("--detector", type=Path, default=None, help="detector checkpoint (default: shipped model)")
    parser.add_argument("--threshold", type=float, default=None, help="score threshold (default: the checkpoint's)")
    parser.add_argument("--tta", type=int, choices=(1, 2, 4, 8), default=1,
                        help="test-time augmentation: fuse 2/4/8 mirrored or rotated passes (that many times the work; "
                             "default 1 = off)")
    parser.add_argument("--detector-window", type=int, default=None, metavar="PX",
                        help="inference window side at the detector's mpp (default: the checkpoint's, 256); larger "
                             "windows are faster and may lose a little F1 (README, Results)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: first available)")
    parser.add_argument("--overwrite", action="store_true", help="recompute images whose CSV already exists")


def collect_images(inputs: list[str]) -> list[Path]:
    """Image files from files and folders; the same rules as ``denuc predict``
    (:func:`denuc.pipeline_cli.collect_inputs`): a missing path, a folder without images or two
    inputs sharing an output stem raise :class:`~denuc.errors.InputError`."""
    from denuc.pipeline_cli import collect_inputs

    return collect_inputs(inputs)


def main(args: argparse.Namespace) -> int:
    from denuc.core.files import check_out_dir
    from denuc.core.mpp import check_mpp
    from denuc.data.image import prefetch_images
    from denuc.detect.api import Detector, check_threshold
    from denuc.pipeline_cli import image_error_line

    check_mpp(args.mpp, "--mpp")
    if args.threshold is not None:
        check_threshold(args.threshold)
    files = collect_images(args.inputs)
    check_out_dir(args.out)
    det = Detector.load(args.detector, device=args.device, threshold=args.threshold, tta=args.tta,
                        window=args.detector_window)
    failed: list[str] = []
    done = 0
    todo = [f for f in files if args.overwrite or not (args.out / f"{f.stem}.csv").exists()]
    skipped = len(files) - len(todo)
    for f, image in prefetch_images(todo):  # the next images are read meanwhile
        dst = args.out / f"{f.stem}.csv"
        try:  # any failure is this image's: report it and go on (Ctrl-C still stops the run)
            if isinstance(image, Exception):
                raise image
            nuc = det.detect(image, args.mpp, name=f.stem)
            nuc.to_csv(dst)
        except Exception as e:
            print(image_error_line("detect", f, e), file=sys.stderr)
            failed.append(str(f))
            del e, image  # frees the failed image's memory (and a MemoryError's traceback) now
            continue
        done += 1
        print(f"{f.name}: {len(nuc)} nuclei -> {dst}")
    print(f"{done} image(s) processed, {skipped} skipped (CSV exists), {len(failed)} failed")
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0
