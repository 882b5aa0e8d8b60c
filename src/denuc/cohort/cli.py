"""``denuc summarize``: merge the per-input summaries of an output folder into one table.

Example::

    denuc summarize runs/cohort                        # every input -> runs/cohort/summary.csv
    denuc summarize runs/cohort a.svs b.svs            # only these inputs (paths or stems)
    denuc summarize runs/cohort --inputs cohort.txt    # only the inputs of a list file, as in predict

``--inputs`` is a list file (one path per line), as in ``predict`` and ``detect``. Until 0.2 the
old spelling ``--inputs A B ...`` (the inputs themselves) still works, with a deprecation note.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "merge the <stem>.summary.json files of an output folder into DIR/summary.csv (one row per input)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="output folder of `denuc predict` or `denuc detect`")
    p.add_argument("only", nargs="*", metavar="INPUT",
                   help="only these inputs (paths or stems; those without a finished summary get an empty row) "
                        "(default: every summary in DIR)")
    p.add_argument("--inputs", dest="inputs_file", nargs="+", default=None, metavar="LIST",
                   help="only the inputs of a text file with one path per line (# comments), the same list file "
                        "`denuc predict --inputs` reads; several values, or inputs instead of a list file, are the "
                        "deprecated old spelling of the INPUT arguments (default: none)")


def _from_list_file(values: list[str]) -> list[str]:
    """The inputs of ``--inputs``: one list file; the pre-0.2 spelling (the inputs themselves,
    recognised as several values or a value that is no list file) still works with a note."""
    from denuc.cohort.inputs import INPUT_SUFFIXES, read_list_file

    p = Path(values[0])
    if len(values) == 1 and p.is_file() and not p.name.lower().endswith(INPUT_SUFFIXES):
        return [entry for entry, _ in read_list_file(p)]
    print("denuc summarize: deprecated: --inputs A B ... (the inputs themselves); give them after DIR, or "
          "--inputs LIST (a list file, as in predict); the old spelling works until 0.2", file=sys.stderr)
    return list(values)


def main(args: argparse.Namespace) -> int:
    from denuc.cohort.summary import write_summary_table

    only: list[str] | None = list(args.only) if args.only else None
    if args.inputs_file is not None:
        only = (only or []) + _from_list_file(args.inputs_file)
    path = write_summary_table(args.dir, only)
    with open(path, encoding="utf-8") as f:
        n = sum(1 for _ in f) - 1
    print(f"{path}: {n} input(s)")
    return 0
