"""Checks for µm-per-pixel values. DeNuC never guesses a magnification."""

from __future__ import annotations

import math

from denuc.errors import ResolutionError

#: Plausible range of µm per pixel for nucleus-level H&E work. The low end is 100x oil
#: (~0.05 µm/px). The high end is 4 µm/px (about a 2.5x objective): a nucleus (5-10 µm across)
#: is then only 1-3 px wide, too small to detect, and the detector (0.25-0.5 µm/px) would have
#: to upsample the image 8-16x (64-256x the pixels and memory). Anything above it, such as
#: ``5``, ``10``, ``20`` or ``40``, is almost surely a magnification typed instead of µm/px.
MPP_MIN = 0.05
MPP_MAX = 4.0

#: Hint appended when an mpp looks like a magnification.
MAGNIFICATION_HINT = ("did you pass a magnification instead of µm per pixel? 40x is about 0.25 µm/px, "
                      "20x about 0.5, 10x about 1")


def check_mpp(mpp: float | None, source: str = "image") -> float:
    """Return ``mpp`` (µm per pixel) as float, or raise :class:`ResolutionError` if it is missing,
    not a number (bools included), not finite or outside ``[MPP_MIN, MPP_MAX]``."""
    if mpp is None:
        raise ResolutionError(
            f"{source}: resolution (µm per pixel) is unknown; pass it explicitly, e.g. --mpp 0.5"
        )
    if isinstance(mpp, bool):
        raise ResolutionError(f"{source}: mpp must be a number of µm per pixel; got {mpp!r}")
    try:
        v = float(mpp)
    except (TypeError, ValueError):
        raise ResolutionError(f"{source}: mpp must be a number of µm per pixel; got {mpp!r}") from None
    if not math.isfinite(v) or not (MPP_MIN <= v <= MPP_MAX):
        hint = MAGNIFICATION_HINT if math.isfinite(v) and v > MPP_MAX else (
            "pass the image's µm per pixel, e.g. 0.25 (40x) or 0.5 (20x)")
        raise ResolutionError(
            f"{source}: mpp={v:g} µm/px is outside the plausible range [{MPP_MIN:g}, {MPP_MAX:g}]; {hint}"
        )
    return v
