"""Small spatial-analysis tools for cell tables (``.h5ad`` from ``denuc predict --format h5ad``),
with numpy/scipy only, so they run where scanpy/squidpy do not install:

* :func:`embedding_clusters`: k-means on standardised, PCA-reduced point features
  (``obsm['X_denuc']``), the unsupervised view of the frozen encoder's cell states;
* :func:`adjusted_rand_index`: agreement of two labelings (1 = same partition, ~0 = chance);
* :func:`neighbourhood_enrichment`: for every pair of classes, how many more (z > 0) or fewer
  (z < 0) neighbours within a radius they have than under random relabelling (squidpy's
  ``nhood_enrichment`` statistic on a radius graph).

Coordinates are level-0 px (``obsm['spatial']``); radii are given in the same unit.
"""

from __future__ import annotations

import numpy as np


def embedding_clusters(features: np.ndarray, k: int, *, pcs: int = 50, seed: int = 0, restarts: int = 4) -> np.ndarray:
    """``(N,)`` int64 cluster ids in ``[0, k)`` of ``features (N, C)``: each channel standardised,
    projected on its first ``pcs`` principal components, then k-means (k-means++ starts, the best
    of ``restarts`` by inertia; deterministic for a given ``seed``)."""
    from scipy.cluster.vq import kmeans2

    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) < k:
        raise ValueError(f"need an (N, C) array with N >= k = {k}; got shape {x.shape}")
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)
    _, _, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    z = x @ vt[: min(pcs, vt.shape[0])].T
    best, best_inertia = None, np.inf
    rng = np.random.default_rng(seed)
    for _ in range(max(1, restarts)):
        centres, labels = kmeans2(z, k, minit="++", seed=int(rng.integers(2**31)), iter=50)
        inertia = float(((z - centres[labels]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    assert best is not None
    return best.astype(np.int64)


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings of the same ``N`` items (Hubert & Arabie)."""
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if len(a) != len(b):
        raise ValueError(f"labelings differ in length: {len(a)} vs {len(b)}")
    n = len(a)
    if n < 2:
        return 1.0
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), np.int64)
    np.add.at(table, (ia, ib), 1)

    def pairs(v: np.ndarray) -> float:
        return float((v * (v - 1) / 2).sum())

    index = pairs(table)
    sa, sb = pairs(table.sum(1)), pairs(table.sum(0))
    expected = sa * sb / (n * (n - 1) / 2)
    top = (sa + sb) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)


def neighbourhood_enrichment(xy: np.ndarray, labels: np.ndarray, radius: float, *, n_perm: int = 200,
                             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Z-scores of neighbour counts between classes.

    Args:
        xy: ``(N, 2)`` positions; ``labels``: ``(N,)`` int class ids in ``[0, K)``.
        radius: two cells are neighbours when closer than this (same unit as ``xy``).
        n_perm: random relabellings (labels shuffled, positions kept) for the null.

    Returns:
        ``(z, counts)``: ``(K, K)`` symmetric z-scores ``(observed - mean) / std`` of the null
        (0 where the null has no spread) and the observed ``(K, K)`` neighbour-pair counts.
    """
    from scipy.spatial import cKDTree

    labels = np.asarray(labels, dtype=np.int64).ravel()
    k = int(labels.max()) + 1 if len(labels) else 0
    pairs = cKDTree(np.asarray(xy, dtype=np.float64)).query_pairs(float(radius), output_type="ndarray")

    def count(lab: np.ndarray) -> np.ndarray:
        c = np.zeros((k, k), np.int64)
        np.add.at(c, (lab[pairs[:, 0]], lab[pairs[:, 1]]), 1)
        return c + c.T - np.diag(np.diag(c))

    observed = count(labels)
    rng = np.random.default_rng(seed)
    null = np.stack([count(rng.permutation(labels)) for _ in range(n_perm)]).astype(np.float64)
    sd = null.std(0)
    z = np.where(sd > 0, (observed - null.mean(0)) / np.where(sd > 0, sd, 1.0), 0.0)
    return z, observed
