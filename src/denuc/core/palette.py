"""Class colours (``(r, g, b)`` 0-255) for overlays, dataset.yaml and QuPath export."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from denuc.errors import InputError

RGB = tuple[int, int, int]

#: Distinct colours handed out in order to classes that have none.
DEFAULT_COLORS: tuple[RGB, ...] = (
    (0, 160, 0),
    (200, 0, 0),
    (0, 90, 220),
    (230, 160, 0),
    (150, 0, 200),
    (0, 170, 170),
    (120, 80, 40),
    (255, 105, 180),
    (128, 128, 128),
    (90, 200, 90),
)


def default_colors(n: int) -> tuple[RGB, ...]:
    """``n`` colours from :data:`DEFAULT_COLORS`, cycling when there are more classes."""
    return tuple(DEFAULT_COLORS[i % len(DEFAULT_COLORS)] for i in range(n))


def parse_color(value: Any, source: str) -> RGB:
    """``[r, g, b]`` with integers in 0..255 -> tuple; anything else raises naming ``source``."""
    if isinstance(value, str) or not isinstance(value, Sequence) or len(value) != 3:
        raise InputError(f"{source}: a colour must be [r, g, b] with integers 0-255; got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or not 0 <= v <= 255:
            raise InputError(f"{source}: a colour must be [r, g, b] with integers 0-255; got {value!r}")
        out.append(int(v))
    return (out[0], out[1], out[2])


def resolve_colors(
    class_names: Sequence[str], colors: Mapping[str, Sequence[int]] | Sequence[Sequence[int]] | None
) -> dict[str, RGB]:
    """One colour per class name.

    Args:
        colors: ``None`` (defaults), a mapping name -> rgb (missing names get defaults), or
            a sequence aligned with ``class_names``.
    """
    base = dict(zip(class_names, default_colors(len(class_names))))
    if colors is None:
        return base
    if isinstance(colors, Mapping):
        for name, c in colors.items():
            base[str(name)] = parse_color(c, f"colour of class {name!r}")
        return base
    if len(colors) != len(class_names):
        raise InputError(f"{len(colors)} colours for {len(class_names)} classes {list(class_names)}")
    return {n: parse_color(c, f"colour of class {n!r}") for n, c in zip(class_names, colors)}
