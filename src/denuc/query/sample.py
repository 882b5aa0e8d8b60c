"""Bilinear sampling of a dense feature map at points given in window pixels.

Geometry. A window of ``W`` pixels (at the working mpp) is resized to the encoder input
``S`` pixels, so window point ``x`` sits at input pixel ``x' = x * S / W`` (pixel-edge frame).
Map cell ``j`` of a map of width ``w`` is centred at input pixel ``(j + 0.5) * stride``, so in
map-cell units (cell centres at integers) the point is at ``u = x' / stride - 0.5``.

* ``align="center"`` (default, geometrically right): ``grid_sample(align_corners=False)``
  with normalised ``g = (2 u + 1) / w - 1 = 2 x' / (stride * w) - 1``; beyond the outer
  cell centres the border value is used (``padding_mode="border"``).
* ``align="corners"`` (the DeNuC authors' code): ``g = 2 x / W - 1`` with
  ``align_corners=True``, i.e. ``u = x / W * (w - 1)``; this stretches the map so that the
  window's corners hit the outer cell *centres*, shifting features by up to half a cell.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ALIGN_MODES = ("center", "corners")


def map_grid(xy: torch.Tensor, window: float, input_size: int, stride: int, map_hw: tuple[int, int],
             align: str = "center") -> torch.Tensor:
    """Normalised ``grid_sample`` coordinates of window points.

    Args:
        xy: ``(N, 2)`` float (x, y) in window pixels.
        window: window side ``W`` in pixels at the working mpp.
        input_size: encoder input side ``S`` the window was resized to.
        stride: input pixels per map cell.
        map_hw: ``(h, w)`` of the feature map.
        align: ``center`` or ``corners`` (see module docstring).

    Returns:
        ``(N, 2)`` normalised (x, y) in [-1, 1] (roughly).
    """
    if align not in ALIGN_MODES:
        raise ValueError(f"align must be one of {ALIGN_MODES}; got {align!r}")
    h, w = map_hw
    xy = xy.to(torch.float32)
    if align == "corners":
        return 2.0 * xy / float(window) - 1.0
    inp = xy * (float(input_size) / float(window))
    extent = torch.tensor([stride * w, stride * h], dtype=torch.float32, device=xy.device)
    return 2.0 * inp / extent - 1.0


def sample_map(fmap: torch.Tensor, grid: torch.Tensor, align: str = "center") -> torch.Tensor:
    """Bilinear features of one map at normalised points.

    Args:
        fmap: ``(C, h, w)`` feature map.
        grid: ``(N, 2)`` normalised (x, y) from :func:`map_grid`.

    Returns:
        ``(N, C)`` features (same dtype as ``fmap``).
    """
    g = grid.to(fmap.dtype).view(1, 1, -1, 2)
    out = F.grid_sample(fmap[None], g, mode="bilinear", padding_mode="border", align_corners=(align == "corners"))
    return out[0, :, 0, :].transpose(0, 1)


def sample_maps(fmaps: torch.Tensor, grid: torch.Tensor, align: str = "center") -> torch.Tensor:
    """Bilinear features of a batch of maps at normalised points, one call for all of them.

    Args:
        fmaps: ``(B, C, h, w)`` feature maps.
        grid: ``(B, n, 2)`` normalised (x, y) from :func:`map_grid`, ``n`` points per map
            (pad maps with fewer points; padded slots are sampled and should be discarded).

    Returns:
        ``(B, n, C)`` features (same dtype as ``fmaps``); ``[b, i]`` equals
        ``sample_map(fmaps[b], grid[b])[i]``.
    """
    g = grid.to(fmaps.dtype)[:, None]  # (B, 1, n, 2)
    out = F.grid_sample(fmaps, g, mode="bilinear", padding_mode="border", align_corners=(align == "corners"))
    return out[:, :, 0, :].transpose(1, 2)
