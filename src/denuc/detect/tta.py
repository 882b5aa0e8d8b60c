"""Dihedral test-time augmentation (TTA) of the detector.

A pass ``(k, flip)`` mirrors the image left-right (when ``flip``) and then rotates it by
``k`` x 90° counter-clockwise (as ``np.rot90``). Points found in the transformed image are
mapped back exactly with :func:`points_to_original` (pixel-edge frame: a mirror maps
``x -> W - x``; one counter-clockwise turn of a ``W``-wide image maps ``(x, y) -> (y, W - x)``).
The passes' points are fused by :func:`denuc.merge.fuse.fuse_points`.
"""

from __future__ import annotations

import numpy as np

from denuc.errors import InputError

#: passes used for each supported TTA count: 1 = none, 2 = + mirror, 4 = the four
#: rotations, 8 = rotations x mirror (the full dihedral group).
TTA_PASSES: dict[int, tuple[tuple[int, bool], ...]] = {
    1: ((0, False),),
    2: ((0, False), (0, True)),
    4: ((0, False), (1, False), (2, False), (3, False)),
    8: tuple((k, f) for f in (False, True) for k in range(4)),
}


def tta_passes(n: int) -> tuple[tuple[int, bool], ...]:
    """The ``(k, flip)`` passes of an ``n``-fold TTA (``n`` in 1, 2, 4, 8)."""
    if n not in TTA_PASSES:
        raise InputError(f"test-time augmentation takes 1, 2, 4 or 8 passes; got {n}")
    return TTA_PASSES[n]


def transform_image(image: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """``(H, W, C)`` image of pass ``(k, flip)`` (contiguous copy)."""
    if image.ndim == 3 and image.flags.c_contiguous:  # move whole pixels: one strided copy per pixel, not per byte
        px = image.view(np.dtype((np.void, image.shape[2] * image.itemsize)))[..., 0]
        out = np.ascontiguousarray(np.rot90(px[:, ::-1] if flip else px, k % 4))
        return out[..., None].view(image.dtype).reshape(*out.shape, image.shape[2])
    out = image[:, ::-1] if flip else image
    return np.ascontiguousarray(np.rot90(out, k % 4))


def points_to_transformed(xy: np.ndarray, k: int, flip: bool, hw: tuple[int, int]) -> np.ndarray:
    """``(N, 2)`` (x, y) in the original ``hw = (H, W)`` image -> the frame of pass ``(k, flip)``."""
    out = np.array(xy, dtype=np.float64).reshape(-1, 2)
    h, w = hw
    if flip:
        out[:, 0] = w - out[:, 0]
    for _ in range(k % 4):
        out = np.stack([out[:, 1], w - out[:, 0]], axis=1)
        h, w = w, h
    return out


def points_to_original(xy: np.ndarray, k: int, flip: bool, hw: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`points_to_transformed`: pass-frame (x, y) -> original ``hw = (H, W)`` image."""
    out = np.array(xy, dtype=np.float64).reshape(-1, 2)
    h, w = hw
    widths = [w if j % 2 == 0 else h for j in range(k % 4)]  # width of the image before turn j
    for wb in reversed(widths):
        out = np.stack([wb - out[:, 1], out[:, 0]], axis=1)
    if flip:
        out[:, 0] = w - out[:, 0]
    return out
