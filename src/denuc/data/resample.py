"""Exact image resampling between resolutions.

``resample(img, f)`` scales by exactly ``f`` in the pixel-edge frame: image content at
(x, y) lands at (f*x, f*y), so :meth:`denuc.core.Nuclei.rescale` maps points exactly.
The output size is ``floor(size * f)`` (at least 1).
"""

from __future__ import annotations

import numpy as np


def resample_factor(src_mpp: float, dst_mpp: float) -> float:
    """Scale factor from an image at ``src_mpp`` to ``dst_mpp`` (µm per pixel)."""
    return float(src_mpp) / float(dst_mpp)


def resample(img: np.ndarray, factor: float) -> np.ndarray:
    """Resample an ``(H, W, 3)`` uint8 image by ``factor`` (antialiased bilinear).

    The geometric mapping is exactly ``x_dst = factor * x_src`` (pixel-edge frame); a factor
    within 1e-6 of 1 returns the input unchanged.
    """
    if abs(factor - 1.0) < 1e-6:
        return img
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.require(img, requirements=("C", "W"))).permute(2, 0, 1)[None].float()
    out = F.interpolate(t, scale_factor=factor, mode="bilinear", align_corners=False,
                        recompute_scale_factor=False, antialias=factor < 1)
    return out[0].permute(1, 2, 0).round_().clamp_(0, 255).to(torch.uint8).numpy()
