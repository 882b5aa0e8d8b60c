"""Fusion of several point sets of the same image (test-time augmentation passes).

Each pass proposes points with scores. All proposals are pooled and reduced by greedy point
NMS (:func:`denuc.merge.nms.point_nms`); every proposal then joins the highest-scored kept
point within ``radius`` (the one that suppressed it). A fused point takes, from each pass, its
best proposal in the group: its score is the *mean over all passes* of those best scores (0
for a pass that proposed nothing there), and its position the score-weighted mean of their
positions. A nucleus that only one
of four passes sees thus scores a quarter of that pass's score, which is what makes the
fusion reject spurious points.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.spatial import cKDTree

from denuc.merge.nms import point_nms


def fuse_points(passes: Sequence[tuple[np.ndarray, np.ndarray]], radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Fuse the ``(xy (N_i, 2), scores (N_i,))`` proposals of ``len(passes)`` passes.

    Args:
        passes: per pass, points (x, y) in one common frame (e.g. pixels of the image) and scores.
        radius: grouping radius in the units of ``xy`` (usually the NMS radius in pixels).

    Returns:
        ``(xy (K, 2) float64, scores (K,) float32)`` fused points, in descending fused score.
    """
    n_pass = len(passes)
    if n_pass == 0:
        raise ValueError("fuse_points needs at least one pass")
    xy = np.concatenate([np.asarray(p[0], np.float64).reshape(-1, 2) for p in passes])
    sc = np.concatenate([np.asarray(p[1], np.float64).reshape(-1) for p in passes])
    pid = np.concatenate([np.full(len(np.asarray(p[1]).reshape(-1)), i) for i, p in enumerate(passes)])
    if len(xy) != len(sc):
        raise ValueError(f"{len(xy)} points but {len(sc)} scores")
    if len(xy) == 0:
        return np.zeros((0, 2)), np.zeros(0, np.float32)
    keep = point_nms(xy, sc, radius)
    # kept points are pairwise farther apart than radius, so at most 7 lie within radius of any point
    r = max(float(radius), 0.0) * (1 + 1e-9) + 1e-12
    _, nb = cKDTree(xy[keep]).query(xy, k=min(8, len(keep)), distance_upper_bound=r)
    nb = np.asarray(nb).reshape(len(xy), -1)
    owner = nb.min(axis=1)  # keep is in descending score: the smallest index is the best kept point
    joined = owner < len(keep)  # every proposal NMS dropped lies within radius of a kept one
    # best proposal per (group, pass): write in reverse NMS visiting order (descending score,
    # ties by index), so the first-visited one, e.g. the kept point itself, is written last
    best = np.full((len(keep), n_pass), -1, dtype=np.int64)
    visit = np.argsort(-sc, kind="stable")
    idx = visit[::-1][joined[visit[::-1]]]
    best[owner[idx], pid[idx]] = idx
    has = best >= 0
    s = np.where(has, sc[np.maximum(best, 0)], 0.0)
    fused = s.sum(1) / n_pass
    w = s / np.maximum(s.sum(1, keepdims=True), 1e-12)
    pos = (xy[np.maximum(best, 0)] * w[..., None]).sum(1)
    pos = np.where(s.sum(1, keepdims=True) > 0, pos, xy[keep])  # all-zero scores: the kept point
    order = np.argsort(-fused, kind="stable")
    return pos[order], fused[order].astype(np.float32)
