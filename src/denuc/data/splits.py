"""Split lists (``train`` / ``val`` / ``test``) as written in dataset.yaml or a splits file.

Format (YAML or JSON)::

    train: [stem_a, stem_b, ...]
    val: [...]          # optional: a missing split is empty
    test: [...]

A file may also hold this mapping under a top-level ``splits:`` key. Entries are image
stems; an entry with an image suffix (``a.png``) is accepted when its stem is an image.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from denuc.data.base import SPLITS
from denuc.data.image import IMAGE_SUFFIXES
from denuc.errors import InputError

if TYPE_CHECKING:
    from denuc.data.base import PointDataset

#: Share of the training images held back as val when a dataset has no val split.
VAL_FRACTION = 0.1


def _stem_of(entry: str, known: Collection[str] | None) -> str:
    if known is None or entry in known:
        return entry
    p = Path(entry)
    if p.suffix.lower() in IMAGE_SUFFIXES and p.stem in known:
        return p.stem
    return entry


def parse_splits(obj: Any, source: str, known: Collection[str] | None = None) -> dict[str, list[str]]:
    """Validate a ``{split: [stem, ...]}`` mapping.

    Args:
        source: names the file in error messages.
        known: the stems that have an image; every listed stem must be one (None = no check).

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` (missing splits are empty lists).

    Raises:
        InputError: not a mapping, unknown split name, non-string entry, a stem listed twice
            or in two splits, or a stem without an image.
    """
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    if obj is None:
        return out
    if not isinstance(obj, dict):
        raise InputError(f"{source}: splits must be a mapping {{train: [...], val: [...], test: [...]}}")
    bad = sorted(str(k) for k in obj if k not in SPLITS)
    if bad:
        raise InputError(f"{source}: unknown split name(s) {bad}; known: {list(SPLITS)}")
    owner: dict[str, str] = {}
    numeric = False
    for split, entries in obj.items():
        if entries is None:
            continue
        if isinstance(entries, str) or not isinstance(entries, list):
            raise InputError(f"{source}: split {split!r} must be a list of image stems")
        for e in entries:
            if not isinstance(e, (str, int)) or isinstance(e, bool):
                raise InputError(f"{source}: split {split!r} has a non-text entry {e!r}")
            numeric = numeric or isinstance(e, int)
            stem = _stem_of(str(e), known)
            if stem in owner:
                where = "twice" if owner[stem] == split else f"in both {owner[stem]!r} and {split!r}"
                raise InputError(f"{source}: image {stem!r} is listed {where}")
            owner[stem] = split
            out[split].append(stem)
    if known is not None:
        missing = [s for s in owner if s not in known]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            hint = " (YAML reads 001 as the number 1: quote such stems, '001')" if numeric else ""
            raise InputError(
                f"{source}: split(s) name {len(missing)} image(s) that do not exist: {missing[:5]}{more}{hint}"
            )
    return out


def read_splits_file(path: str | os.PathLike[str], known: Collection[str] | None = None) -> dict[str, list[str]]:
    """Read and validate a YAML/JSON splits file (see the module docstring)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: splits file does not exist")
    try:
        obj = yaml.safe_load(p.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise InputError(f"{p}: cannot read splits file ({e})") from None
    if isinstance(obj, dict) and set(obj) == {"splits"}:
        obj = obj["splits"]
    return parse_splits(obj, str(p), known)


def ordered_stems(splits: dict[str, list[str]], all_stems: Collection[str]) -> list[str]:
    """Every stem once: split members in split order (train, val, test), then the rest sorted."""
    seen = [s for sp in SPLITS for s in splits.get(sp, [])]
    rest = sorted(set(all_stems) - set(seen))
    return list(dict.fromkeys(seen)) + rest


class SplitLists:
    """Mixin for readers that hold their split lists in ``self._splits`` ({split: [stems]})
    and every stem in ``self._order``; provides ``stems`` and ``split_of``."""

    _splits: dict[str, list[str]]
    _order: list[str]

    def stems(self, split: str | None = None) -> list[str]:
        """Image stems of ``split`` (``None`` = all, split members first), in a fixed order."""
        if split is None:
            return list(self._order)
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; known: {SPLITS}")
        return list(self._splits[split])

    def split_of(self, stem: str) -> str | None:
        return next((s for s in SPLITS if stem in self._splits[s]), None)


def carve_val(train: Sequence[str], fraction: float = VAL_FRACTION, seed: int = 0) -> tuple[list[str], list[str]]:
    """Hold back ``fraction`` of the images ``train`` (at least one) as val, by image.

    Deterministic: a ``numpy.random.default_rng(seed)`` permutation of the sorted stems, so
    the same stems and seed always give the same split, whatever their order.

    Returns:
        ``(train stems in their given order, val stems sorted)``.
    """
    import numpy as np

    order = sorted(train)
    perm = np.random.default_rng(seed).permutation(len(order))
    n_val = max(1, round(fraction * len(order)))
    val = sorted(order[i] for i in perm[:n_val])
    held = set(val)
    return [s for s in train if s not in held], val


def train_val_stems(ds: PointDataset, fraction: float = VAL_FRACTION, seed: int = 0
                    ) -> tuple[list[str], list[str], bool]:
    """``(train stems, val stems, carved)`` of a dataset, as every training command splits it.

    Train is the ``train`` split, or every image outside ``test`` when the dataset has no
    ``train`` split. Val is the ``val`` split; without one and with ``fraction > 0`` and at
    least 2 training images, :func:`carve_val` holds ``fraction`` of train back (``carved``
    is then True); otherwise val is empty.
    """
    test = set(ds.stems("test"))
    train = ds.stems("train") or [s for s in ds.stems(None) if s not in test]
    val = ds.stems("val")
    if val or fraction <= 0 or len(train) < 2:
        return list(train), list(val), False
    tr, va = carve_val(train, fraction, seed)
    return tr, va, True
