"""``denuc evaluate``: score a folder of predicted points against a dataset's labels.

Examples::

    denuc evaluate DATA/brca-m2c --split test --pred runs/preds --protocol denuc --radius-px 6
    denuc evaluate DATA/brca-m2c --split test \\
        --pred DATA/brca-m2c/reference_predictions_mcspatnet/points --pred-format brca-m2c \\
        --protocol mcspatnet --radius-px 6 --json runs/mcspatnet_r6.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from denuc.evaluate.matching import PROTOCOLS
from denuc.evaluate.predictions import MISSING_POLICIES, PRED_FORMATS

HELP = "Score predicted nucleus points against ground truth (precision, recall, F1 per class)."


def configure(parser: argparse.ArgumentParser) -> None:
    from denuc.core.cliargs import add_dataset_argument, add_deprecated_alias

    add_dataset_argument(parser, "dataset folder with the ground truth (--gt DATASET is its former spelling) (required)", "--gt")
    parser.add_argument("--gt-format", default=None, metavar="NAME",
                        help="dataset reader (default: detected from the folder)")
    parser.add_argument("--split", default=None, help="split to score: train, val or test (default: all images)")
    parser.add_argument("--pred", required=True, metavar="PRED_DIR",
                        help="folder with one prediction file per image (<stem>.csv: x,y,class[,score])")
    parser.add_argument("--pred-format", default="csv", choices=PRED_FORMATS.names(),
                        help="prediction files: csv = <stem>.csv with header x,y,class[,score]; "
                             "brca-m2c = <stem>_pred_class_coords.txt with 'y x class_id' lines (default: csv)")
    parser.add_argument("--protocol", default="denuc", choices=PROTOCOLS.names(),
                        help="matching rule (default: denuc); "
                             + "; ".join(f"{n}: {PROTOCOLS.get(n).description}" for n in PROTOCOLS.names()))
    rad = parser.add_mutually_exclusive_group()
    rad.add_argument("--radius-px", type=float, default=None, metavar="R", help="matching radius in pixels")
    rad.add_argument("--radius-um", type=float, default=None, metavar="R",
                     help="matching radius in µm (converted with each image's µm/px)")
    parser.add_argument("--classes", default=None, metavar="A,B",
                        help="comma-separated classes to score (default: every GT class)")
    parser.add_argument("--missing", default="error", choices=MISSING_POLICIES,
                        help="a GT image without prediction file: error, or count as no predictions (default: error)")
    parser.add_argument("--json", default=None, metavar="OUT", help="also write the full report (with per-image counts) as JSON")
    parser.add_argument("--print-format", default="table", choices=("table", "json"),
                        help="what to print: a text table or the JSON summary (default: table)")
    add_deprecated_alias(parser, "--format", "--print-format", "print_format", choices=("table", "json"))


def main(args: argparse.Namespace) -> int:
    from denuc.core.cliargs import dataset_of
    from denuc.core.files import atomic_write_text
    from denuc.data.base import open_dataset
    from denuc.errors import InputError
    from denuc.evaluate.api import evaluate

    classes = [c.strip() for c in args.classes.split(",") if c.strip()] if args.classes is not None else None
    if classes is not None and not classes:
        raise InputError(f"--classes {args.classes!r} names no class; give comma-separated class names, "
                         "or leave it out to score every GT class")
    if args.json and Path(args.json).is_dir():
        raise InputError(f"--json {args.json} is a folder; give a file name, e.g. {Path(args.json) / 'scores.json'}")
    gt = open_dataset(dataset_of(args, "evaluate"), format=args.gt_format)
    report = evaluate(gt, Path(args.pred), protocol=args.protocol, radius_px=args.radius_px,
                      radius_um=args.radius_um, split=args.split, classes=classes, missing=args.missing,
                      pred_format=args.pred_format)
    if args.print_format == "json":
        print(json.dumps(report.to_dict(per_image=False), indent=2))
    else:
        print(report.table())
    if args.json:
        out = atomic_write_text(Path(args.json), json.dumps(report.to_dict(), indent=2) + "\n")
        if args.print_format == "table":
            print(f"wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover - `python -m denuc.evaluate.cli` (same as `denuc evaluate`)
    import sys

    from denuc.errors import DenucError

    _parser = argparse.ArgumentParser(prog="denuc evaluate", description=HELP)
    configure(_parser)
    try:
        sys.exit(main(_parser.parse_args()))
    except DenucError as _e:
        print(f"denuc evaluate: error: {_e}", file=sys.stderr)
        sys.exit(2)
