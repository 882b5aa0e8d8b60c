"""Greedy point non-maximum suppression (NMS) with a KD-tree.

Points are visited in descending score (ties: lower index first); a point is kept unless
a kept point lies within ``radius`` (inclusive, same units as ``xy``, usually pixels).
Guarantees: kept points are pairwise farther apart than ``radius``; every dropped point
lies within ``radius`` of a kept point of higher or equal score; NMS of the kept set
keeps all of it (idempotent).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree


def point_nms(xy: np.ndarray, scores: np.ndarray, radius: float) -> np.ndarray:
    """Indices of the points kept by greedy NMS, in descending score order.

    Args:
        xy: ``(N, 2)`` float (x, y) positions.
        scores: ``(N,)`` scores; higher wins.
        radius: suppression radius in the units of ``xy``; ``<= 0`` keeps everything.

    Returns:
        ``(K,)`` int64 indices into ``xy``.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(xy) != len(scores):
        raise ValueError(f"{len(xy)} points but {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    if len(xy) == 0 or radius <= 0:
        return order.astype(np.int64)
    pairs = cKDTree(xy).query_pairs(r=float(radius), output_type="ndarray")
    if len(pairs) == 0:
        return order.astype(np.int64)
    # rank[i] = position of point i in visiting order; neighbours stored both ways as CSR
    rank = np.empty(len(xy), dtype=np.int64)
    rank[order] = np.arange(len(xy))
    a = np.concatenate([pairs[:, 0], pairs[:, 1]])
    b = np.concatenate([pairs[:, 1], pairs[:, 0]])
    srt = np.argsort(a, kind="stable")
    a, b = a[srt], b[srt]
    starts = np.searchsorted(a, np.arange(len(xy) + 1))
    has_nb = starts[1:] > starts[:-1]
    suppressed = np.zeros(len(xy), dtype=bool)
    keep: list[int] = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        if has_nb[i]:
            nb = b[starts[i]:starts[i + 1]]
            suppressed[nb[rank[nb] > rank[i]]] = True
    return np.asarray(keep, dtype=np.int64)
