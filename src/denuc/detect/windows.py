"""Window inference of a :class:`~denuc.detect.model.PointDetector` over images of any size.

Each image (already at the model's mpp) is cut into ``window`` px windows every ``stride``
px (:func:`denuc.merge.tiling.window_grid`); windows of all images are pooled into batches.
A point found within ``margin`` px of a window edge that lies inside the image is dropped
(:func:`denuc.merge.tiling.inner_margin_mask`), the rest are shifted to image pixels and a
global point NMS (radius ``config.nms_radius_px``) merges overlaps. Images smaller than a
window are padded at the right/bottom with :data:`PAD_VALUE` (white) and points in the
padding are dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from denuc.detect.model import PointDetector, normalise
from denuc.merge.nms import point_nms
from denuc.merge.tiling import inner_margin_mask, window_grid

WINDOW = 256
STRIDE = 192
MARGIN = 32
#: Value of canvas pixels outside the image (white, like empty glass in H&E).
PAD_VALUE = 255


@dataclass
class RawDetections:
    """Detections of one image in its pixels (x, y): ``xy (N, 2)``, ``scores (N,)``,
    ``labels (N,)`` (class index, 0 for a class-agnostic model), ``probs (N, C)``."""

    xy: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    probs: np.ndarray

    def filter(self, threshold: float) -> RawDetections:
        """Keep ``scores > threshold``; equal to inferring at that threshold, since greedy NMS
        decisions for higher-scored points never depend on lower-scored ones."""
        k = self.scores > threshold
        return RawDetections(self.xy[k], self.scores[k], self.labels[k], self.probs[k])


def _pad(img: np.ndarray, window: int) -> np.ndarray:
    h, w = img.shape[:2]
    if h >= window and w >= window:
        return img
    out = np.full((max(h, window), max(w, window), 3), PAD_VALUE, dtype=np.uint8)
    out[:h, :w] = img
    return out


#: A window is skipped (``regions``) only when its box grown by this many NMS radii touches no
#: region: its points, and those of every suppression chain this long that reaches a region,
#: are then outside the regions.
SKIP_NMS_LINKS = 3

#: ``(K, 4)`` boxes ``x0, y0, x1, y1`` in an image's pixels -> ``(K,)`` bool: the box touches a
#: region whose nuclei are wanted (e.g. tissue).
RegionTest = Callable[[np.ndarray], np.ndarray]


@torch.no_grad()
def detect_images(model: PointDetector, images: Sequence[np.ndarray], *, threshold: float | None = None,
                  window: int = WINDOW, stride: int = STRIDE, margin: float = MARGIN, batch_size: int = 16,
                  device: torch.device | str | None = None,
                  forward: Callable[[torch.Tensor], tuple[torch.Tensor, ...]] | None = None,
                  regions: Sequence[RegionTest | None] | None = None) -> list[RawDetections]:
    """Detect nuclei in ``images`` (each ``(H, W, 3)`` uint8 at the model's mpp).

    ``forward``: what runs the model's :meth:`~denuc.detect.model.PointDetector.raw` on a
    ``(B, 3, window, window)`` batch (default: the model itself; a :mod:`denuc.runtime` runner).

    ``regions``: per image, None (every window runs) or a :data:`RegionTest`: windows whose box,
    grown by :data:`SKIP_NMS_LINKS` x the NMS radius, touches no region are not run (for the
    glass between tissue pieces: the caller keeps only points in the regions, and those come
    out as without skipping unless a chain of more than :data:`SKIP_NMS_LINKS` suppressions
    links them to a skipped window).

    Returns one :class:`RawDetections` per image, coordinates in that image's pixels,
    sorted by descending score.
    """
    cfg = model.config
    device = device if device is not None else next(model.parameters()).device
    padded = [_pad(np.asarray(im), window) for im in images]
    grow = SKIP_NMS_LINKS * float(cfg.nms_radius_px)
    jobs = []
    for i, im in enumerate(padded):
        grid = np.asarray(window_grid(im.shape[0], im.shape[1], window, stride), dtype=np.int64).reshape(-1, 2)
        test = regions[i] if regions is not None else None
        if test is not None and len(grid):
            boxes = np.concatenate([grid - grow, grid + window + grow], axis=1).astype(np.float64)
            grid = grid[np.asarray(test(boxes), dtype=bool)]
        jobs += [(i, (int(x0), int(y0))) for x0, y0 in grid]
    parts: list[list[tuple[np.ndarray, ...]]] = [[] for _ in images]
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b:b + batch_size]
        crops = np.stack([padded[i][y0:y0 + window, x0:x0 + window] for i, (x0, y0) in chunk])
        cands = model.candidates_numpy(normalise(crops, cfg.mean, cfg.std, device), threshold, raw=forward)
        for (i, (x0, y0)), d in zip(chunk, cands, strict=True):
            xy = d["points"].astype(np.float64)
            hp, wp = padded[i].shape[:2]
            keep = inner_margin_mask(xy, (x0, y0), window, (hp, wp), margin)
            g = xy[keep] + np.array([x0, y0], dtype=np.float64)
            h, w = images[i].shape[:2]
            inside = (g[:, 0] < w) & (g[:, 1] < h)
            keep_idx = np.flatnonzero(keep)[inside]
            parts[i].append((g[inside], d["scores"][keep_idx], d["labels"][keep_idx], d["probs"][keep_idx]))
    out = []
    for p in parts:
        xy = np.concatenate([q[0] for q in p]) if p else np.zeros((0, 2))
        sc = np.concatenate([q[1] for q in p]).astype(np.float32) if p else np.zeros(0, np.float32)
        lb = np.concatenate([q[2] for q in p]).astype(np.int64) if p else np.zeros(0, np.int64)
        pr = np.concatenate([q[3] for q in p]).astype(np.float32) if p else np.zeros((0, cfg.num_classes), np.float32)
        keep = point_nms(xy, sc, cfg.nms_radius_px)
        out.append(RawDetections(xy[keep], sc[keep], lb[keep], pr[keep]))
    return out
