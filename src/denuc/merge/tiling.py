"""Window grids over large images, shared by the detector and the encoder.

Frame: window ``k`` along an axis covers pixels ``[origin_k, origin_k + window)`` of the
image (level-0 pixels at the working mpp). Images smaller than a window get one window at
0 and are zero/white padded by the caller.
"""

from __future__ import annotations

import math

import numpy as np


def window_origins(length: int, window: int, stride: int) -> np.ndarray:
    """Start offsets of windows of size ``window`` covering ``[0, length)`` along one axis.

    Windows start every ``stride`` pixels; the last one is moved back so it ends flush with
    the image (never past it) unless ``length < window``, where the single origin is 0.

    Returns:
        ``(K,)`` int64, strictly increasing, first 0, last ``max(length - window, 0)``.
    """
    if length <= 0:
        raise ValueError(f"length must be positive; got {length}")
    if window <= 0 or stride <= 0 or stride > window:
        raise ValueError(f"need 0 < stride <= window; got window={window}, stride={stride}")
    if length <= window:
        return np.zeros(1, dtype=np.int64)
    n = math.ceil((length - window) / stride) + 1
    starts = np.arange(n, dtype=np.int64) * stride
    starts[-1] = length - window
    return np.unique(starts)


def window_grid(height: int, width: int, window: int, stride: int) -> np.ndarray:
    """All window origins ``(x0, y0)`` of a 2-D grid, row-major. Shape ``(K, 2)`` int64."""
    ys = window_origins(height, window, stride)
    xs = window_origins(width, window, stride)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def inner_margin_mask(
    xy: np.ndarray, origin: tuple[int, int], window: int, image_hw: tuple[int, int], margin: float
) -> np.ndarray:
    """Keep-mask for points found in one window under the margin rule.

    A point (window-local ``xy``, shape ``(N, 2)``) is dropped when it lies within ``margin``
    pixels of a window edge that is *inside* the image (a neighbouring window covers it
    better); edges on the image border keep their points.
    """
    x0, y0 = origin
    h, w = image_hw
    keep = np.ones(len(xy), dtype=bool)
    if x0 > 0:
        keep &= xy[:, 0] >= margin
    if y0 > 0:
        keep &= xy[:, 1] >= margin
    if x0 + window < w:
        keep &= xy[:, 0] < window - margin
    if y0 + window < h:
        keep &= xy[:, 1] < window - margin
    return keep
