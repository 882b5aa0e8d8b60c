"""``denuc summarize``: merge the per-input summaries of an output folder into one table.

Example::

    denuc summarize runs/cohort      # -> runs/cohort/summary.csv
"""

from __future__ import annotations

import argparse

HELP = "merge the <stem>.summary.json files of an output folder into DIR/summary.csv (one row per input)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="output folder of `denuc predict`")
    p.add_argument("--inputs", nargs="+", default=None, metavar="INPUT",
                   help="only these inputs (paths or stems; those without summary get an empty row); "
                        "default: every summary in DIR")


def main(args: argparse.Namespace) -> int:
    from denuc.cohort.summary import write_summary_table

    path = write_summary_table(args.dir, args.inputs)
    with open(path, encoding="utf-8") as f:
        n = sum(1 for _ in f) - 1
    print(f"{path}: {n} input(s)")
    return 0
