"""Resample any region of a large image exactly as if the whole image had been resampled.

:func:`denuc.data.resample.resample` scales a whole in-memory image by ``f`` (output pixel
``u`` samples the source at ``(u + 0.5) / f - 0.5``, pixel-edge frame). A slide cannot be held
in memory, so tiles are resampled here with *taps*: for every output pixel along an axis, the
global source indices and weights of the filter that produces it (bilinear when ``f >= 1``,
antialiased triangle when ``f < 1``, the rules of ``torch.nn.functional.interpolate`` with
``align_corners=False`` that ``resample`` uses). Taps depend only on the output coordinate, the
factor and the source length, never on the tile, and are applied in a fixed order, so a
region resampled from any source crop that holds its taps is bit-identical to the same
region of a whole-image pass through this module. Source indices are clamped at the
*source's* borders (the whole image's edge rule), not at the crop's.
"""

from __future__ import annotations

import math

import numpy as np


def _is_identity(factor: float) -> bool:
    return abs(factor - 1.0) < 1e-6


def axis_taps(start: int, length: int, factor: float, src_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Filter taps of output pixels ``start .. start + length - 1`` along one axis.

    Args:
        start: first output pixel (global, at the output resolution).
        length: number of output pixels.
        factor: output px per source px (``src_mpp / out_mpp``).
        src_len: the whole source axis length (px) whose borders clamp the taps.

    Returns:
        ``idx (length, K)`` int64 global source pixel indices and ``w (length, K)`` float32
        weights that sum to 1 per row (unused taps have weight 0 and a valid index).
    """
    if length <= 0:
        return np.zeros((0, 1), np.int64), np.zeros((0, 1), np.float32)
    u = np.arange(start, start + length, dtype=np.float64)
    if _is_identity(factor):
        idx = np.clip(u.astype(np.int64), 0, src_len - 1)[:, None]
        return idx, np.ones((length, 1), np.float32)
    scale = 1.0 / factor  # source px per output px
    if factor >= 1.0:  # bilinear, align_corners=False, negative source coordinates clamp to 0
        src = np.maximum((u + 0.5) * scale - 0.5, 0.0)
        i0 = np.floor(src).astype(np.int64)
        i0 = np.minimum(i0, src_len - 1)
        i1 = np.minimum(i0 + 1, src_len - 1)
        l1 = (src - i0).astype(np.float32)
        l1 = np.where(i1 == i0, np.float32(0.0), l1)
        return np.stack([i0, i1], 1), np.stack([1.0 - l1, l1], 1).astype(np.float32)
    # antialiased triangle filter of support `scale` source px (PIL / torch antialias rule)
    support = scale
    centre = scale * (u + 0.5)
    lo = np.maximum(np.floor(centre - support + 0.5).astype(np.int64), 0)
    hi = np.minimum(np.floor(centre + support + 0.5).astype(np.int64), src_len)
    k = int(math.ceil(support)) * 2 + 1
    j = lo[:, None] + np.arange(k, dtype=np.int64)[None, :]
    x = (j.astype(np.float64) - centre[:, None] + 0.5) / scale
    w = np.maximum(0.0, 1.0 - np.abs(x))
    w[j >= hi[:, None]] = 0.0
    total = w.sum(1, keepdims=True)
    w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 0.0)
    return np.clip(j, 0, src_len - 1), w.astype(np.float32)


def source_span(start: int, length: int, factor: float, src_len: int) -> tuple[int, int]:
    """Half-open source range ``[a, b)`` that holds every tap of output pixels
    ``[start, start + length)`` (see :func:`axis_taps`)."""
    idx, w = axis_taps(start, length, factor, src_len)
    used = idx[w != 0] if (w != 0).any() else idx.reshape(-1)
    return int(used.min()), int(used.max()) + 1


def _apply(arr: np.ndarray, idx: np.ndarray, w: np.ndarray, axis: int) -> np.ndarray:
    """Weighted sum of the rows (``axis=0``) or columns (``axis=1``) ``idx`` of ``arr``, taps in order."""
    if idx.shape[1] == 1 and np.all(w == 1):
        return np.take(arr, idx[:, 0], axis=axis).astype(np.float32, copy=False)
    out: np.ndarray | None = None
    for k in range(idx.shape[1]):
        part = np.take(arr, idx[:, k], axis=axis).astype(np.float32, copy=False)
        wk = w[:, k].reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
        out = part * wk if out is None else out + part * wk
    assert out is not None
    return out


def resample_taps(crop: np.ndarray, crop_origin: tuple[int, int], out_origin: tuple[int, int],
                  out_size: tuple[int, int], factor: float, src_size: tuple[int, int], *,
                  as_float: bool = False) -> np.ndarray:
    """Resample a region of a source image given a crop of it.

    Args:
        crop: ``(h, w, 3)`` uint8 RGB crop of the source, its top-left source pixel at
            ``crop_origin`` = (x, y); it must hold the taps of the output region
            (:func:`source_span` along each axis).
        out_origin: (x, y) of the region's top-left pixel at the output resolution (global).
        out_size: (width, height) of the region in output pixels.
        factor: output px per source px.
        src_size: (width, height) of the whole source (its borders clamp the taps).
        as_float: return float32 values in [0, 255] without rounding (what the encoder's
            featurizer works on, like its own whole-image resampling) instead of uint8.

    Returns:
        ``(height, width, 3)`` uint8 (or float32): the region of the whole source resampled by ``factor``.

    Raises:
        ValueError: the crop does not hold every tap.
    """
    (ox, oy), (ow, oh) = out_origin, out_size
    if _is_identity(factor):
        x0, y0 = ox - crop_origin[0], oy - crop_origin[1]
        if x0 < 0 or y0 < 0 or x0 + ow > crop.shape[1] or y0 + oh > crop.shape[0]:
            raise ValueError("crop does not cover the region")
        out_id = np.ascontiguousarray(crop[y0:y0 + oh, x0:x0 + ow])
        return out_id.astype(np.float32) if as_float else out_id
    iy, wy = axis_taps(oy, oh, factor, src_size[1])
    ix, wx = axis_taps(ox, ow, factor, src_size[0])
    iy = iy - crop_origin[1]
    ix = ix - crop_origin[0]
    for name, ind, wt, n in (("rows", iy, wy, crop.shape[0]), ("columns", ix, wx, crop.shape[1])):
        used = ind[wt != 0]
        if used.size and (used.min() < 0 or used.max() >= n):
            raise ValueError(f"crop does not hold every tap ({name})")
    iy = np.clip(iy, 0, crop.shape[0] - 1)
    ix = np.clip(ix, 0, crop.shape[1] - 1)
    rows = _apply(crop, iy, wy, axis=0)
    out = _apply(rows, ix, wx, axis=1)
    if as_float:
        return np.clip(out, 0, 255, out=out)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
