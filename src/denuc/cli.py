"""``denuc`` command line: a thin layer over the Python API.

Each subcommand lives in its own module exposing ``HELP: str``, ``configure(parser)`` and
``main(args) -> int``; this file only maps names to modules, so ``denuc --help`` stays fast
(heavy imports such as torch happen inside ``main``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from denuc import __version__
from denuc.errors import DenucError

#: subcommand -> module implementing it (in pipeline order).
COMMANDS: dict[str, str] = {
    "convert": "denuc.data.convert",
    "train-detector": "denuc.train.detector_cli",
    "detect": "denuc.detect.cli",
    "train-head": "denuc.train.head_cli",
    "finetune": "denuc.train.finetune_cli",
    "predict": "denuc.pipeline_cli",
    "embed": "denuc.query.embed_cli",
    "evaluate": "denuc.evaluate.cli",
    "summarize": "denuc.cohort.cli",
    "models": "denuc.models_cli",
}


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``denuc`` parser; with ``only`` (a command name), just that command's subparser, so a
    command's start does not import the other commands' modules (their imports cost about 0.5 s)."""
    parser = argparse.ArgumentParser(
        prog="denuc",
        description="Find every nucleus in H&E images and classify it (DeNuC: tiny detector + frozen foundation model).",
    )
    parser.add_argument("--version", action="version", version=f"denuc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, modname in COMMANDS.items():
        if only in COMMANDS and name != only:
            continue
        mod = importlib.import_module(modname)
        p = sub.add_parser(name, help=mod.HELP, description=mod.HELP)
        mod.configure(p)
        p.set_defaults(_main=mod.main)
    return parser


#: commands whose numpy matrix products are all tall and thin (stain unmixing of every pixel):
#: BLAS threads only spin on those, beside the networks' own threads (6x the CPU time on two cores).
SINGLE_THREAD_BLAS = ("predict", "detect")


def main(argv: Sequence[str] | None = None) -> int:
    first = (list(sys.argv[1:] if argv is None else argv) or [""])[0]
    if first in SINGLE_THREAD_BLAS and "numpy" not in sys.modules:  # read once, when numpy loads
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's OpenBLAS (torch keeps its threads)
    parser = build_parser(only=first)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    import warnings

    def one_line(message: Warning | str, category: type[Warning], *rest: object, **kw: object) -> str:
        return f"denuc {args.command}: warning: {' '.join(str(message).split())}\n"

    saved = warnings.formatwarning
    warnings.formatwarning = one_line  # type: ignore[assignment]  # no source lines, one line per warning
    try:
        return int(args._main(args) or 0)
    except DenucError as e:
        print(f"denuc {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = saved


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
