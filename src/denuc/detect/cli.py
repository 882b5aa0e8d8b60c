"""``denuc detect``: find nuclei (points, class "nucleus") in images and whole slides.

The same inputs, tile stream, outputs (``--format``, summary, overlay), resume, claims and
error handling as ``denuc predict`` (:mod:`denuc.pipeline_cli`), with detection only; the CSV's
``score`` and ``det_score`` are the detector's confidence.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

HELP = ("detect nuclei (points) in images and whole slides -> <stem>.csv / .geojson(.gz) / .parquet, "
        "<stem>.summary.json and <stem>.overlay.png per input")


def configure(parser: argparse.ArgumentParser) -> None:
    from denuc.pipeline_cli import add_common_options

    add_common_options(parser, "detect")
    parser.add_argument("--model", default=None, metavar="NAME|DIR",
                        help="use this model's detector and its val-chosen threshold: a shipped model's name "
                             "(`denuc models`) or a folder written by `denuc finetune`; replaces --detector, which "
                             "it refuses alongside; --threshold overrides its threshold (default: the shipped "
                             "detector)")


def model_detector(model: str | None, detector: str | None, threshold: float | None,
                   tta: int) -> tuple[str | Path | None, float | None]:
    """``(detector checkpoint, threshold)`` for ``--model``: the model's detector unless
    ``detector`` is given, and its val-chosen detection threshold (one pass, ``tta == 1``) unless
    ``threshold`` is given; without a model, the arguments unchanged."""
    if model is None:
        return detector, threshold
    from denuc.modeldir import resolve_model

    md = resolve_model(model)
    if threshold is None and detector is None and tta == 1:
        threshold = md.thresholds.get("detection")
    return (md.detector if detector is None else detector), threshold


def main(args: argparse.Namespace) -> int:
    from denuc.detect.api import check_threshold
    from denuc.pipeline_cli import check_model_options, run_inputs

    check_model_options(args)
    if args.threshold is not None:
        check_threshold(args.threshold)

    def build() -> tuple[Any, dict[str, Any], None]:
        from denuc.detect.api import Detector
        from denuc.pipeline_cli import process_device
        from denuc.stream.runner import TileStream

        path, threshold = model_detector(args.model, args.detector, args.threshold, args.tta)
        det = Detector.load(path, device=process_device(args.device), threshold=threshold, tta=args.tta,
                            window=args.detector_window, runtime=args.runtime)
        from denuc.runtime import single_thread_glue

        single_thread_glue([det.runner])
        return TileStream(det, None, tile_px=args.tile_px, workers=args.workers), {"detector": det.describe()}, None

    return run_inputs("detect", args, build)
