"""Checks of user-given numbers, with messages that name the option and show plain numbers."""

from __future__ import annotations

import math

import numpy as np

from denuc.errors import InputError


def plain_number(v: object) -> str:
    """``v`` for a message: numbers as plain Python numbers (never ``np.float64(...)``)."""
    if isinstance(v, (bool, np.bool_)):
        return repr(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return repr(v)


def check_int(v: object, low: int, what: str) -> int:
    """``v`` as an int >= ``low``, else :class:`InputError` naming ``what``."""
    try:
        ok = not isinstance(v, bool) and float(v) == int(v) and int(v) >= low  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok:
        raise InputError(f"{what} must be a whole number >= {low}; got {plain_number(v)}")
    return int(v)  # type: ignore[arg-type]


def check_number(v: object, what: str, low: float, high: float | None = None, low_open: bool = False) -> float:
    """``v`` as a finite float with ``low <= v < high`` (``low < v`` if ``low_open``), else :class:`InputError`."""
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        f = math.nan
    ok = math.isfinite(f) and (f > low if low_open else f >= low) and (high is None or f < high)
    if not ok:
        rng = (f"> {low:g}" if low_open else f">= {low:g}") + (f" and < {high:g}" if high is not None else "")
        raise InputError(f"{what} must be a finite number {rng}; got {plain_number(v)}")
    return f
