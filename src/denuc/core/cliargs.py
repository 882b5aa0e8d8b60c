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
