"""Exact image resampling between resolutions.

``resample(img, f)`` scales by exactly ``f`` in the pixel-edge frame: image content at
(x, y) lands at (f*x, f*y), so :meth:`denuc.core.Nuclei.rescale` maps points exactly.
The output size is ``floor(size * f)``, at least 1 px: an axis shorter than ``1 / f`` px is
first extended by repeating its edge pixels (the same border rule the sampling uses), so a
tiny image gives a 1 px axis with the same geometric mapping instead of an error.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    import torch


def resample_factor(src_mpp: float, dst_mpp: float) -> float:
    """Scale factor from an image at ``src_mpp`` to ``dst_mpp`` (µm per pixel)."""
    return float(src_mpp) / float(dst_mpp)


def resampled_size(hw: tuple[int, int], factor: float) -> tuple[int, int]:
    """``(H, W)`` of an image of size ``hw`` after :func:`resample` by ``factor``: unchanged when
    ``factor`` is within 1e-6 of 1, else ``floor(size * factor)``, at least 1 px."""
    if abs(factor - 1.0) < 1e-6:
        return int(hw[0]), int(hw[1])
    return max(1, math.floor(hw[0] * factor)), max(1, math.floor(hw[1] * factor))


def resample(img: np.ndarray, factor: float) -> np.ndarray:
    """Resample an ``(H, W, 3)`` uint8 image by ``factor`` (antialiased bilinear).

    The geometric mapping is exactly ``x_dst = factor * x_src`` (pixel-edge frame); a factor
    within 1e-6 of 1 returns the input unchanged. The output is ``(max(1, floor(H * factor)),
    max(1, floor(W * factor)), 3)``.
    """
    if abs(factor - 1.0) < 1e-6:
        return img
    import torch
    import torch.nn.functional as F

    h, w = img.shape[:2]
    out_h, out_w = resampled_size((h, w), factor)
    need = max(1, math.ceil(1.0 / factor))  # shortest axis that still gives 1 output px
    while need * factor < 1.0:
        need += 1
    if h < need or w < need:  # extend by edge pixels; the 1 px output samples the same place
        img = np.pad(img, ((0, max(0, need - h)), (0, max(0, need - w)), (0, 0)), mode="edge")
    t = torch.from_numpy(np.require(img, requirements=("C", "W"))).permute(2, 0, 1)[None].float()
    out = F.interpolate(t, scale_factor=factor, mode="bilinear", align_corners=False,
                        recompute_scale_factor=False, antialias=factor < 1)
    if out.shape[-2:] == t.shape[-2:]:
        # torch copies the input when the output size equals the input size, ignoring a
        # factor that is not exactly 1; sample the exact mapping explicitly instead.
        out = _scale_by_sampling(t, factor)
    out = out[..., :out_h, :out_w]
    return out[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()


def _scale_by_sampling(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Bilinear resampling of ``(1, C, H, W)`` to the same size with ``x_dst = factor * x_src``."""
    import torch
    import torch.nn.functional as F

    h, w = t.shape[-2:]

    def axis(n: int) -> torch.Tensor:
        src = (torch.arange(n, dtype=torch.float64) + 0.5) / factor - 0.5  # source pixel centres
        return ((2 * src + 1) / n - 1).float()  # align_corners=False normalisation

    gy, gx = torch.meshgrid(axis(h), axis(w), indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None]
    return F.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)
