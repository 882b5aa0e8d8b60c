"""Checks for µm-per-pixel values. DeNuC never guesses a magnification."""

from __future__ import annotations

import math

from denuc.errors import ResolutionError

#: Plausible range of µm per pixel for H&E microscopy (100x oil ~0.05 to a 0.5x overview ~20).
MPP_MIN = 0.05
MPP_MAX = 20.0


def check_mpp(mpp: float | None, source: str = "image") -> float:
    """Return ``mpp`` as float, or raise :class:`ResolutionError` if it is missing or absurd."""
    if mpp is None:
        raise ResolutionError(
            f"{source}: resolution (µm per pixel) is unknown; pass it explicitly, e.g. --mpp 0.5"
        )
    try:
        v = float(mpp)
    except (TypeError, ValueError):
        raise ResolutionError(f"{source}: mpp must be a number of µm per pixel; got {mpp!r}") from None
    if not math.isfinite(v) or not (MPP_MIN <= v <= MPP_MAX):
        raise ResolutionError(
            f"{source}: mpp={mpp!r} µm/px is outside the plausible range [{MPP_MIN}, {MPP_MAX}]; "
            "did you pass a magnification (e.g. 40) instead of µm per pixel (e.g. 0.25)?"
        )
    return v
