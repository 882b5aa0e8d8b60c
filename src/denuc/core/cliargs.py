"""Small argparse helpers shared by the ``denuc`` subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


class _Deprecated(argparse.Action):
    """Stores into the new option's ``dest`` and warns on stderr that ``option_string`` is renamed."""

    def __init__(self, option_strings: Sequence[str], dest: str, new_flag: str = "", **kwargs: Any) -> None:
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: warning: {option_string} is deprecated here; use {self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old_flag: str, new_flag: str, dest: str,
                         **kwargs: Any) -> None:
    """Accept ``old_flag`` as a hidden spelling of ``new_flag`` (same ``dest``), with a warning.

    ``kwargs`` (``choices``, ``type``) should match the new option's so the values are checked alike.
    """
    parser.add_argument(old_flag, dest=dest, action=_Deprecated, new_flag=new_flag, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS, **kwargs)


def add_dataset_argument(parser: argparse.ArgumentParser, help: str, old_flag: str) -> None:
    """The dataset folder as the first positional argument (``DATASET``), as in every command
    that reads one; ``old_flag`` (e.g. ``--data``) stays accepted with a deprecation warning.
    Read it back with :func:`dataset_of`."""
    parser.add_argument("dataset", nargs="*", default=[], metavar="DATASET", help=help)  # "*": one checked later
    add_deprecated_alias(parser, old_flag, "the positional DATASET", "dataset_flag")


def dataset_of(args: argparse.Namespace, command: str) -> str:
    """The dataset folder given positionally or with the deprecated flag of :func:`add_dataset_argument`.

    Raises:
        InputError: none given, several, or both spellings with different folders.
    """
    from denuc.errors import InputError

    given, flag = list(getattr(args, "dataset", None) or []), getattr(args, "dataset_flag", None)
    if len(given) > 1:
        raise InputError(f"denuc {command} reads one dataset folder; got {len(given)}: {' '.join(given)}")
    pos = given[0] if given else None
    if pos is not None and flag is not None and pos != flag:
        raise InputError(f"two datasets given ({pos} and {flag}); give the dataset folder once, as the first argument")
    if pos is None and flag is None:
        raise InputError(f"a dataset folder is required: denuc {command} DATASET ...")
    return str(pos if pos is not None else flag)
