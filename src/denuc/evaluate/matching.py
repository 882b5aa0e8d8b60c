"""One-to-one matching of predicted nucleus points to ground-truth points within a radius.

Every matcher has the signature::

    match(pred_xy, pred_scores, gt_xy, radius_px) -> (pred_idx, gt_idx)

* ``pred_xy``: ``(P, 2)`` float (x, y) and ``gt_xy``: ``(G, 2)`` float (x, y), both in
  pixels of the same image (any frame, as long as it is the same for both).
* ``pred_scores``: ``(P,)`` confidences or ``None`` (no scores: every prediction counts
  as equally confident, so score order is input order).
* ``radius_px``: matching radius in those pixels.
* Returns two ``int64`` arrays of equal length ``K`` (the matched pairs, one-to-one), in
  no particular order (sort them if you need one).

Distances are ``sqrt(dx*dx + dy*dy)`` in float64, computed the same way everywhere, so a
point at exactly ``r`` (e.g. integer offsets (3, 4) with r = 5) is decided exactly:
inclusive protocols keep it, strict ones drop it. Candidate pairs come from a KD-tree
(:func:`candidate_pairs`), queried slightly beyond ``r`` and then filtered exactly.

Ties in the greedy rules are deterministic: equal scores keep input order (stable sort)
and equal distances go to the lower index of the point being chosen (lower GT index for
prediction-driven rules, lower prediction index for GT-driven rules). ``hungarian`` has
no index rule: when several matchings have the same number of pairs and the same total
distance, the solver returns one of them (the same one for the same input, but not
necessarily the lowest indices; e.g. a prediction equidistant to GT 0 and GT 1 may take
GT 1). The count, and so every score, is the same whichever it returns.

Protocols (registry :data:`PROTOCOLS`), each with a default radius expressed as
"``px`` pixels at ``mpp`` µm/px" (a physical distance, converted to each image's pixels):

==========  ===============================================================  ==============
name        rule                                                             default radius
==========  ===============================================================  ==============
denuc       predictions by descending score take the nearest unmatched GT,   12 px @ 0.25
            ``d <= r`` (DeNuC's code)                                        (3 µm)
ocelot      same rule as ``denuc`` (OCELOT 2023 challenge)                   15 px @ 0.2
                                                                             (3 µm)
puma        GT in input order; candidates = unmatched predictions with       15 px @ 0.25
            ``d < r`` (strict), ordered by (-score, distance); take the      (3.75 µm)
            first (PUMA challenge's official evaluation code)
mcspatnet   GT in input order takes the nearest unused prediction with       6 px @ 0.5
            ``d < r`` (strict; scipy ``KDTree.query(distance_upper_bound)``   (3 µm)
            in the MCSpatNet authors' script)
hungarian   maximum number of one-to-one pairs with ``d <= r``; among those,  6 px @ 0.5
            minimum total distance (dense assignment per component)          (3 µm)
==========  ===============================================================  ==============

PUMA's rule, checked against the organisers' code (``tueimage/PUMA-challenge-eval-track1``,
``calculate_centroid_distance``): loop over GT features in order, keep predictions of the
same class with ``distance < 15``, sort them by ``(-score, distance)`` with Python's stable
sort, take the first and remove it from the pool; predictions without a score count as 1.

OCELOT's rule, checked against the organisers' code (``lunit-io/ocelot23algo``,
``evaluation/eval.py``, ``DISTANCE_CUTOFF = 15`` "fixed"): per class and image, predictions
in ``np.argsort(-confidence)`` order take the nearest GT still free with ``distance <= 15``
(distance ties: lowest GT index); counts pooled over images. Two quirks there are not
copied: the "confidence" column it reads is the class id (constant within a class), so its
order is numpy's unstable argsort of equal keys; and distances are float32. Here
predictions go by descending score, ties in input order, distances in float64.

MCSpatNet's rule, checked against the authors' evaluation script: for each GT dot, query
the k nearest predictions with ``distance_upper_bound = r`` (scipy excludes ``d == r``)
and take the nearest one not yet used. That script visits GT dots in raster order
(``np.where`` on the dot map); here GT is visited in the order given (on BRCA-M2C test both
orders give the same counts). On the published BRCA-M2C predictions the strict rule
reproduces the reference numbers (r = 6 px: detection F1 0.854; r = 3: 0.676), the
inclusive one does not (0.856; 0.700, i.e. the Hungarian values); see
``benchmarks/reference_mcspatnet.py``.

PUMA's images are 40x (stated as ~0.23-0.25 µm/px); the default uses the project's 0.25.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from denuc.errors import InputError
from denuc.registry import Registry

#: ``match(pred_xy (P,2), pred_scores (P,)|None, gt_xy (G,2), radius_px) -> (pred_idx, gt_idx)``
Matcher = Callable[[np.ndarray, "np.ndarray | None", np.ndarray, float], tuple[np.ndarray, np.ndarray]]

_EMPTY = np.zeros(0, dtype=np.int64)

#: Largest |coordinate| in pixels accepted for matching (beyond it no image exists, and the
#: KD-tree's squared distances would overflow).
MAX_COORD = 1e9


@dataclass(frozen=True)
class RadiusSpec:
    """A default matching radius: ``px`` pixels at ``mpp`` µm/px, i.e. ``px * mpp`` µm.

    Defaults are physical distances written the way each protocol states them; for an
    image at ``image_mpp`` µm/px the radius is ``px * mpp / image_mpp`` pixels
    (see :meth:`to_px`), which is exactly ``px`` when the image is at the protocol's mpp.
    """

    px: float
    mpp: float

    @property
    def um(self) -> float:
        """The radius in µm."""
        return round(self.px * self.mpp, 9)

    def to_px(self, image_mpp: float) -> float:
        """Radius in pixels of an image at ``image_mpp`` µm/px (rounded to 1e-9 px)."""
        return round_radius(self.px * (self.mpp / float(image_mpp)))


def round_radius(r: float) -> float:
    """Round a converted radius to 1e-9 px so float noise in µm/px (e.g. 3 / 0.2 =
    14.999999999999998) cannot flip an inclusive/strict boundary decision."""
    return float(round(float(r), 9))


@dataclass(frozen=True)
class Protocol:
    """A matching protocol: its rule, default radius and whether ``d == r`` matches."""

    name: str
    match: Matcher
    default_radius: RadiusSpec
    inclusive: bool
    description: str


PROTOCOLS: Registry[Protocol] = Registry("matching protocol")


# ---------------------------------------------------------------- candidates
def _check(pred_xy: np.ndarray, pred_scores: np.ndarray | None, gt_xy: np.ndarray,
           radius_px: float) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, float]:
    p = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    g = np.asarray(gt_xy, dtype=np.float64).reshape(-1, 2)
    r = float(radius_px)
    if not (np.isfinite(r) and r >= 0):
        raise InputError(f"matching radius must be a finite number >= 0 px; got {r}")
    for name, a in (("prediction", p), ("ground-truth", g)):
        if len(a) and not (np.abs(a) <= MAX_COORD).all():
            raise InputError(f"{name} coordinates must be finite pixel positions within ±{MAX_COORD:g}; "
                             f"got {float(np.abs(a)[~(np.abs(a) <= MAX_COORD)][0])}")
    s = None
    if pred_scores is not None:
        s = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
        if len(s) != len(p):
            raise InputError(f"{len(s)} scores for {len(p)} predictions")
        if np.isnan(s).any():
            raise InputError("prediction scores contain NaN")
    return p, s, g, r


def candidate_pairs(pred_xy: np.ndarray, gt_xy: np.ndarray, radius_px: float,
                    inclusive: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All (prediction, GT) pairs within the radius, found with a KD-tree.

    Returns ``(pi, gi, d)``: ``int64`` prediction and GT indices and float64 distances,
    with ``d <= r`` (``inclusive``) or ``d < r`` (strict), sorted by (pi, gi).
    """
    if len(pred_xy) == 0 or len(gt_xy) == 0:
        return _EMPTY, _EMPTY, np.zeros(0)
    r = float(radius_px)
    slack = r * 1e-9 + 1e-12  # query a hair beyond r, then decide exactly below
    tp, tg = cKDTree(pred_xy), cKDTree(gt_xy)
    m = tp.sparse_distance_matrix(tg, r + slack, output_type="ndarray")
    pi = m["i"].astype(np.int64)
    gi = m["j"].astype(np.int64)
    diff = pred_xy[pi] - gt_xy[gi]
    d = np.sqrt(diff[:, 0] * diff[:, 0] + diff[:, 1] * diff[:, 1])
    keep = d <= r if inclusive else d < r
    pi, gi, d = pi[keep], gi[keep], d[keep]
    order = np.lexsort((gi, pi))
    return pi[order], gi[order], d[order]


def _greedy(first: np.ndarray, second: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walk candidate pairs in ``order``; take a pair when both ends are still free.

    Pairs are grouped by the deciding point (all candidates of one point adjacent, in
    preference order), so the walk gives each deciding point its best free partner.
    Isolated pairs (both ends of degree 1) are taken without the Python loop.
    """
    if len(first) == 0:
        return _EMPTY, _EMPTY
    n1, n2 = int(first.max()) + 1, int(second.max()) + 1
    deg1 = np.bincount(first, minlength=n1)
    deg2 = np.bincount(second, minlength=n2)
    solo = (deg1[first] == 1) & (deg2[second] == 1)
    rest = order[~solo[order]]
    used1 = bytearray(n1)
    used2 = bytearray(n2)
    out1: list[int] = []
    out2: list[int] = []
    for a, b in zip(first[rest].tolist(), second[rest].tolist()):
        if not used1[a] and not used2[b]:
            used1[a] = 1
            used2[b] = 1
            out1.append(a)
            out2.append(b)
    solo_idx = order[solo[order]]
    m1 = np.concatenate([np.asarray(out1, dtype=np.int64), first[solo_idx]])
    m2 = np.concatenate([np.asarray(out2, dtype=np.int64), second[solo_idx]])
    return m1, m2


def _score_rank(scores: np.ndarray | None, n: int) -> np.ndarray:
    """Rank of each prediction in descending-score order (stable: ties keep input order)."""
    if scores is None:
        return np.arange(n, dtype=np.int64)
    order = np.argsort(-scores, kind="stable")
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    return rank


# ------------------------------------------------------------------ matchers
def match_pred_greedy(pred_xy: np.ndarray, pred_scores: np.ndarray | None, gt_xy: np.ndarray,
                      radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Predictions in descending score (stable) take the nearest unmatched GT with ``d <= r``.

    Distance ties go to the lower GT index.
    """
    p, s, g, r = _check(pred_xy, pred_scores, gt_xy, radius_px)
    pi, gi, d = candidate_pairs(p, g, r, inclusive=True)
    rank = _score_rank(s, len(p))
    order = np.lexsort((gi, d, rank[pi]))
    return _greedy(pi, gi, order)


def match_puma(pred_xy: np.ndarray, pred_scores: np.ndarray | None, gt_xy: np.ndarray,
               radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """GT in input order; among unmatched predictions with ``d < r`` take the one with the
    highest score, then the smallest distance, then the lowest prediction index."""
    p, s, g, r = _check(pred_xy, pred_scores, gt_xy, radius_px)
    pi, gi, d = candidate_pairs(p, g, r, inclusive=False)
    neg = np.zeros(len(pi)) if s is None else -s[pi]
    order = np.lexsort((pi, d, neg, gi))
    m2, m1 = _greedy(gi, pi, order)
    return m1, m2


def match_gt_nearest(pred_xy: np.ndarray, pred_scores: np.ndarray | None, gt_xy: np.ndarray,
                     radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """MCSpatNet: GT in input order takes the nearest unused prediction with ``d < r``.

    Scores are ignored. Distance ties go to the lower prediction index.
    """
    p, _, g, r = _check(pred_xy, pred_scores, gt_xy, radius_px)
    pi, gi, d = candidate_pairs(p, g, r, inclusive=False)
    order = np.lexsort((pi, d, gi))
    m2, m1 = _greedy(gi, pi, order)
    return m1, m2


def match_hungarian(pred_xy: np.ndarray, pred_scores: np.ndarray | None, gt_xy: np.ndarray,
                    radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Optimal one-to-one matching: the most pairs with ``d <= r``, then the least total distance.

    The candidate pairs (``d <= r``) split into connected components, which are independent.
    A component of one prediction and one GT is that pair. Each larger one is a dense
    rectangular assignment problem (:func:`scipy.optimize.linear_sum_assignment`) with cost
    ``d - B`` for a candidate pair and 0 for any other; with ``B > (min(P, G) + 1) * r``
    one more pair always beats any saving in distance, and assigned non-candidates are
    dropped. Scores are ignored. Among equally good matchings (same count and total
    distance) the one returned is the solver's, not chosen by index; the count does not
    depend on it. (The sparse LAPJVsp solver used before loops forever on some inputs
    with tied distances, e.g. points on an integer grid.)
    """
    p, _, g, r = _check(pred_xy, pred_scores, gt_xy, radius_px)
    pi, gi, d = candidate_pairs(p, g, r, inclusive=True)
    if len(pi) == 0:
        return _EMPTY, _EMPTY
    up, lp = np.unique(pi, return_inverse=True)
    ug, lg = np.unique(gi, return_inverse=True)
    n_p, n_g = len(up), len(ug)
    # nodes: predictions 0..n_p-1, then GT n_p..n_p+n_g-1
    graph = csr_matrix((np.ones(len(lp)), (lp, n_p + lg)), shape=(n_p + n_g, n_p + n_g))
    _, label = connected_components(graph, directed=False)
    comp = label[lp]  # the component of each candidate pair
    size_p = np.bincount(label[:n_p], minlength=label.max() + 1)
    size_g = np.bincount(label[n_p:], minlength=label.max() + 1)
    solo = (size_p[comp] == 1) & (size_g[comp] == 1)
    out_p, out_g = [up[lp[solo]]], [ug[lg[solo]]]
    # local index of each node within its component (its rank among the component's nodes)
    local = np.empty(n_p + n_g, dtype=np.int64)
    for lo, hi in ((0, n_p), (n_p, n_p + n_g)):
        order = np.argsort(label[lo:hi], kind="stable")
        starts = np.searchsorted(label[lo:hi][order], label[lo:hi][order])
        local[lo + order] = np.arange(hi - lo) - starts
    rest = np.flatnonzero(~solo)
    rest = rest[np.argsort(comp[rest], kind="stable")]
    bounds = np.flatnonzero(np.diff(comp[rest])) + 1
    for edges in np.split(rest, bounds) if len(rest) else []:
        c = comp[edges[0]]
        k_p, k_g = int(size_p[c]), int(size_g[c])
        a, b = local[lp[edges]], local[n_p + lg[edges]]
        big = (min(k_p, k_g) + 1) * (r + 1.0)
        cost = np.zeros((k_p, k_g))
        cost[a, b] = d[edges] - big
        rows, cols = linear_sum_assignment(cost)
        edge = np.zeros((k_p, k_g), dtype=bool)
        edge[a, b] = True
        keep = edge[rows, cols]
        to_p = np.empty(k_p, dtype=np.int64)
        to_p[a] = lp[edges]
        to_g = np.empty(k_g, dtype=np.int64)
        to_g[b] = lg[edges]
        out_p.append(up[to_p[rows[keep]]])
        out_g.append(ug[to_g[cols[keep]]])
    return np.concatenate(out_p).astype(np.int64), np.concatenate(out_g).astype(np.int64)


_BUILTIN: tuple[tuple[str, Matcher, float, float, bool, str], ...] = (
    # name, rule, default radius (px, at µm/px), d == r matches?, description
    ("denuc", match_pred_greedy, 12.0, 0.25, True,
     "predictions by descending score take the nearest unmatched GT, d <= r (DeNuC code; 12 px at 0.25 µm/px)"),
    ("ocelot", match_pred_greedy, 15.0, 0.2, True,
     "as denuc (OCELOT 2023 challenge; 15 px at 0.2 µm/px = 3 µm)"),
    ("puma", match_puma, 15.0, 0.25, False,
     "GT in order; unmatched predictions with d < r ordered by (-score, distance) (PUMA; 15 px at 0.25 µm/px)"),
    ("mcspatnet", match_gt_nearest, 6.0, 0.5, False,
     "GT in order takes the nearest unused prediction, d < r (MCSpatNet; 6 px at 0.5 µm/px)"),
    ("hungarian", match_hungarian, 6.0, 0.5, True,
     "optimal one-to-one: most pairs with d <= r, then least total distance (3 µm)"),
)
for _name, _fn, _px, _mpp, _incl, _desc in _BUILTIN:
    PROTOCOLS.register(_name, Protocol(_name, _fn, RadiusSpec(_px, _mpp), _incl, _desc))


def match(protocol: str, pred_xy: np.ndarray, pred_scores: np.ndarray | None, gt_xy: np.ndarray,
          radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Match with the protocol named ``protocol`` (see :data:`PROTOCOLS`)."""
    return PROTOCOLS.get(protocol).match(pred_xy, pred_scores, gt_xy, radius_px)
