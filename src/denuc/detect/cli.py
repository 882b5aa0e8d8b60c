"""``denuc detect``: find nuclei (points, class "nucleus") in images and whole slides.

The same inputs, tile stream, outputs (``--format``, summary, overlay), resume, claims and
error handling as ``denuc predict`` (:mod:`denuc.pipeline_cli`), with detection only; the CSV's
``score`` and ``det_score`` are the detector's confidence.
"""

from __future__ import annotations

import argparse
from typing import Any

HELP = ("detect nuclei (points) in images and whole slides -> <stem>.csv / .geojson(.gz) / .parquet, "
        "<stem>.summary.json and <stem>.overlay.png per input")


def configure(parser: argparse.ArgumentParser) -> None:
    from denuc.pipeline_cli import add_common_options

    add_common_options(parser, "detect")
    parser.add_argument("--threshold", type=float, default=None,
                        help="score threshold in [0, 1) (default: the checkpoint's, chosen on val)")


def main(args: argparse.Namespace) -> int:
    from denuc.detect.api import check_threshold
    from denuc.pipeline_cli import run_inputs

    if args.threshold is not None:
        check_threshold(args.threshold)

    def build() -> tuple[Any, dict[str, Any], None]:
        from denuc.detect.api import Detector
        from denuc.pipeline_cli import process_device
        from denuc.stream.runner import TileStream

        det = Detector.load(args.detector, device=process_device(args.device), threshold=args.threshold, tta=args.tta,
                            window=args.detector_window, runtime=args.runtime)
        from denuc.runtime import single_thread_glue

        single_thread_glue([det.runner])
        return TileStream(det, None, tile_px=args.tile_px, workers=args.workers), {"detector": det.describe()}, None

    return run_inputs("detect", args, build)
