"""Point matchers: hand-computed cases per protocol, and property tests against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from denuc.errors import DenucError, InputError
from denuc.evaluate.matching import PROTOCOLS, RadiusSpec, candidate_pairs, match, round_radius

ALL = PROTOCOLS.names()
GREEDY = ["denuc", "ocelot", "puma", "mcspatnet"]


def pairs(protocol: str, pred, gt, r, scores=None) -> set[tuple[int, int]]:
    p = np.asarray(pred, dtype=float).reshape(-1, 2)
    g = np.asarray(gt, dtype=float).reshape(-1, 2)
    s = None if scores is None else np.asarray(scores, dtype=np.float32)
    a, b = match(protocol, p, s, g, r)
    assert a.dtype == np.int64 and b.dtype == np.int64
    return set(zip(a.tolist(), b.tolist()))


# ------------------------------------------------------------------ registry
def test_registry_has_all_protocols_and_rejects_unknown() -> None:
    assert set(ALL) == {"denuc", "ocelot", "puma", "mcspatnet", "hungarian"}
    with pytest.raises(DenucError, match="known: denuc"):
        PROTOCOLS.get("nope")


def test_default_radii_are_physical() -> None:
    um = {n: PROTOCOLS.get(n).default_radius.um for n in ALL}
    assert um == {"denuc": 3.0, "ocelot": 3.0, "mcspatnet": 3.0, "hungarian": 3.0, "puma": 3.75}
    assert PROTOCOLS.get("ocelot").default_radius.to_px(0.2) == 15.0
    assert PROTOCOLS.get("ocelot").default_radius.to_px(0.5) == 6.0  # 15 * 0.2 / 0.5 without float noise
    assert PROTOCOLS.get("denuc").default_radius.to_px(0.25) == 12.0
    assert RadiusSpec(15.0, 0.2).to_px(0.25) == 12.0
    assert round_radius(3 / 0.2) == 15.0


# ------------------------------------------------------------------ empty / errors
@pytest.mark.parametrize("protocol", ALL)
@pytest.mark.parametrize("n_pred,n_gt", [(0, 0), (0, 3), (3, 0)])
def test_empty_sets(protocol: str, n_pred: int, n_gt: int) -> None:
    p = np.arange(2 * n_pred, dtype=float).reshape(-1, 2)
    g = np.arange(2 * n_gt, dtype=float).reshape(-1, 2)
    a, b = match(protocol, p, np.ones(n_pred) if n_pred else None, g, 5.0)
    assert len(a) == 0 and len(b) == 0 and a.dtype == np.int64


@pytest.mark.parametrize("protocol", ALL)
def test_bad_inputs(protocol: str) -> None:
    with pytest.raises(InputError):
        match(protocol, np.zeros((2, 2)), np.ones(3), np.zeros((1, 2)), 1.0)
    with pytest.raises(InputError):
        match(protocol, np.zeros((2, 2)), None, np.zeros((1, 2)), -1.0)


# ------------------------------------------------------------------ boundary d == r
@pytest.mark.parametrize("protocol,expected", [
    ("denuc", {(0, 0)}), ("ocelot", {(0, 0)}), ("hungarian", {(0, 0)}), ("puma", set()), ("mcspatnet", set()),
])
def test_boundary_exactly_r(protocol: str, expected: set) -> None:
    # (3, 4) is at distance exactly 5
    assert pairs(protocol, [[0, 0]], [[3, 4]], 5.0) == expected
    # just inside matches for everyone, just outside for no one
    assert pairs(protocol, [[0, 0]], [[3, 4]], 5.0 + 1e-9) == {(0, 0)}
    assert pairs(protocol, [[0, 0]], [[3, 4]], 5.0 - 1e-9) == set()


# ------------------------------------------------------------------ prediction-driven (denuc/ocelot)
@pytest.mark.parametrize("protocol", ["denuc", "ocelot"])
def test_pred_driven_score_order(protocol: str) -> None:
    gt = [[0, 0]]
    pred = [[1, 0], [2, 0]]  # pred 0 is closer, pred 1 more confident
    assert pairs(protocol, pred, gt, 3.0, scores=[0.2, 0.9]) == {(1, 0)}
    assert pairs(protocol, pred, gt, 3.0, scores=[0.9, 0.2]) == {(0, 0)}
    assert pairs(protocol, pred, gt, 3.0) == {(0, 0)}  # no scores: input order
    assert pairs(protocol, pred, gt, 3.0, scores=[0.5, 0.5]) == {(0, 0)}  # tie: input order
    assert pairs(protocol, pred[::-1], gt, 3.0, scores=[0.5, 0.5]) == {(0, 0)}


def test_pred_driven_nearest_gt_and_distance_tie() -> None:
    assert pairs("denuc", [[0, 0]], [[2, 0], [1, 0]], 3.0) == {(0, 1)}  # nearest GT
    assert pairs("denuc", [[0, 0]], [[1, 0], [-1, 0]], 3.0) == {(0, 0)}  # tie -> lower GT index
    assert pairs("denuc", [[0, 0]], [[-1, 0], [1, 0]], 3.0) == {(0, 0)}


def test_pred_driven_is_greedy_not_optimal() -> None:
    gt = [[0, 0], [2, 0]]
    pred = [[1.2, 0], [3, 0]]  # pred 0 grabs GT 1 (0.8 < 1.2); pred 1 only reaches GT 1
    assert pairs("denuc", pred, gt, 1.5) == {(0, 1)}
    assert pairs("hungarian", pred, gt, 1.5) == {(0, 0), (1, 1)}


# ------------------------------------------------------------------ GT-driven (puma/mcspatnet)
@pytest.mark.parametrize("protocol", ["puma", "mcspatnet"])
def test_gt_driven_gt_order(protocol: str) -> None:
    gt = [[0, 0], [2, 0]]
    pred = [[1.5, 0]]  # nearer to GT 1, but GT 0 comes first
    assert pairs(protocol, pred, gt, 3.0) == {(0, 0)}
    assert pairs(protocol, pred, gt[::-1], 3.0) == {(0, 0)}
    assert pairs("denuc", pred, gt, 3.0) == {(0, 1)}


def test_puma_score_before_distance() -> None:
    gt = [[0, 0]]
    pred = [[1, 0], [2, 0]]
    assert pairs("puma", pred, gt, 3.0, scores=[0.3, 0.8]) == {(1, 0)}
    assert pairs("puma", pred, gt, 3.0, scores=[0.8, 0.3]) == {(0, 0)}
    assert pairs("puma", pred, gt, 3.0, scores=[0.5, 0.5]) == {(0, 0)}  # equal score -> distance
    assert pairs("puma", pred, gt, 3.0) == {(0, 0)}  # no scores -> distance
    assert pairs("puma", [[1, 0], [-1, 0]], gt, 3.0) == {(0, 0)}  # full tie -> lower pred index
    # mcspatnet ignores scores: nearest wins
    assert pairs("mcspatnet", pred, gt, 3.0, scores=[0.3, 0.8]) == {(0, 0)}


def test_mcspatnet_nearest_unused_and_tie() -> None:
    gt = [[0, 0], [0.5, 0]]
    pred = [[0.4, 0], [2, 0]]
    # GT 0 takes pred 0 (nearest), GT 1 then takes the nearest unused one, pred 1
    assert pairs("mcspatnet", pred, gt, 3.0) == {(0, 0), (1, 1)}
    assert pairs("mcspatnet", [[1, 0], [-1, 0]], [[0, 0]], 3.0) == {(0, 0)}  # tie -> lower pred index


# ------------------------------------------------------------------ hungarian
def test_hungarian_minimises_distance_among_maximum_matchings() -> None:
    pred = [[0, 0], [2, 0]]
    gt = [[0.5, 0], [2.5, 0]]
    assert pairs("hungarian", pred, gt, 3.0) == {(0, 0), (1, 1)}
    assert pairs("hungarian", pred, gt[::-1], 3.0) == {(0, 1), (1, 0)}


def test_hungarian_prefers_more_pairs_over_shorter_ones() -> None:
    # one pair at distance 0 vs two pairs at distance ~2.9: two pairs win
    pred = [[0, 0], [2.9, 0]]
    gt = [[0, 0], [-2.9, 0]]
    assert pairs("hungarian", pred, gt, 3.0) == {(0, 1), (1, 0)}


def _best_by_enumeration(d: np.ndarray, r: float) -> tuple[int, float]:
    """(most pairs with d <= r, least total distance among those) over every matching."""
    best = (0, 0.0)

    def walk(i: int, used: frozenset, n: int, total: float) -> None:
        nonlocal best
        if i == d.shape[0]:
            if n > best[0] or (n == best[0] and total < best[1] - 1e-9):
                best = (n, total)
            return
        walk(i + 1, used, n, total)
        for j in range(d.shape[1]):
            if j not in used and d[i, j] <= r:
                walk(i + 1, used | {j}, n + 1, total + d[i, j])

    walk(0, frozenset(), 0, 0.0)
    return best


small = st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=0, max_size=6)


@settings(max_examples=150, deadline=None)
@given(small, small, st.sampled_from([1.0, 1.5, 2.0, 3.0]))
def test_hungarian_is_the_optimum_found_by_enumeration(pred, gt, r) -> None:
    p = np.array(pred, dtype=float).reshape(-1, 2)
    g = np.array(gt, dtype=float).reshape(-1, 2)
    a, b = match("hungarian", p, None, g, r)
    d = np.hypot(*(p[:, None, :] - g[None, :, :]).transpose(2, 0, 1)) if len(p) and len(g) else np.zeros((len(p), 0))
    n, total = _best_by_enumeration(d, r)
    assert len(a) == n
    assert float(d[a, b].sum()) == pytest.approx(total, abs=1e-9)


def test_hungarian_ends_on_tied_grid_points() -> None:
    # points on an integer grid (many equal distances): the sparse LAPJVsp solver never returned
    code = """
import numpy as np
from denuc.evaluate.matching import match
p = np.array(%r, dtype=float)
g = np.array(%r, dtype=float)
a, b = match("hungarian", p, None, g, 5.0)
print(len(a))
""" % ([[3, 7], [2, 2], [9, 7], [10, 11], [12, 7], [11, 6], [10, 2], [7, 11], [4, 5], [2, 5], [4, 6], [10, 8],
         [9, 9], [9, 0], [3, 4], [5, 8]],
        [[7, 5], [6, 11], [4, 7], [2, 6], [7, 11], [8, 0], [1, 9], [5, 11], [5, 4], [0, 6], [11, 6], [9, 1],
         [1, 12], [3, 1], [10, 12], [8, 6]])
    import subprocess
    import sys

    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the hungarian matcher did not return within 60 s")
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) == 15  # one GT has no prediction within 5 px: 15 pairs (a dense assignment says so too)


def test_candidate_pairs_match_brute_force() -> None:
    rng = np.random.default_rng(1)
    p = rng.integers(0, 20, (60, 2)).astype(float)
    g = rng.integers(0, 20, (50, 2)).astype(float)
    d = np.sqrt(((p[:, None, :] - g[None, :, :]) ** 2).sum(-1))
    for inclusive in (True, False):
        pi, gi, dd = candidate_pairs(p, g, 3.0, inclusive)
        want = np.argwhere(d <= 3.0 if inclusive else d < 3.0)
        assert sorted(zip(pi.tolist(), gi.tolist())) == sorted(map(tuple, want.tolist()))
        np.testing.assert_allclose(dd, d[pi, gi])


# ------------------------------------------------------------------ brute-force references
def _dist(p: np.ndarray, g: np.ndarray) -> np.ndarray:
    diff = p[:, None, :] - g[None, :, :]
    return np.sqrt(diff[..., 0] * diff[..., 0] + diff[..., 1] * diff[..., 1])


def ref_pred_greedy(p, s, g, r):
    d = _dist(p, g)
    order = range(len(p)) if s is None else sorted(range(len(p)), key=lambda i: -float(s[i]))
    used, out = set(), set()
    for i in order:
        cands = [(d[i, j], j) for j in range(len(g)) if j not in used and d[i, j] <= r]
        if cands:
            j = min(cands)[1]
            used.add(j)
            out.add((i, j))
    return out


def ref_gt_driven(p, s, g, r, use_scores):
    d = _dist(p, g)
    used, out = set(), set()
    for j in range(len(g)):
        cands = []
        for i in range(len(p)):
            if i not in used and d[i, j] < r:
                sc = -float(s[i]) if (use_scores and s is not None) else 0.0
                cands.append((sc, d[i, j], i))
        if cands:
            i = min(cands)[2]
            used.add(i)
            out.add((i, j))
    return out


points = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), min_size=0, max_size=25)


@st.composite
def scenes(draw):
    p = np.array(draw(points), dtype=float).reshape(-1, 2)
    g = np.array(draw(points), dtype=float).reshape(-1, 2)
    with_scores = draw(st.booleans())
    s = None
    if with_scores:
        s = np.array(draw(st.lists(st.sampled_from([0.1, 0.5, 0.9]), min_size=len(p), max_size=len(p))),
                     dtype=np.float32)
    r = draw(st.sampled_from([1.0, 2.0, 2.5, 3.0, 5.0]))
    return p, s, g, r


@settings(max_examples=150, deadline=None)
@given(scenes())
def test_greedy_rules_equal_brute_force(scene) -> None:
    p, s, g, r = scene
    assert pairs("denuc", p, g, r, s) == ref_pred_greedy(p, s, g, r)
    assert pairs("ocelot", p, g, r, s) == ref_pred_greedy(p, s, g, r)
    assert pairs("puma", p, g, r, s) == ref_gt_driven(p, s, g, r, use_scores=True)
    assert pairs("mcspatnet", p, g, r, s) == ref_gt_driven(p, s, g, r, use_scores=False)


@settings(max_examples=150, deadline=None)
@given(scenes())
def test_matchings_are_one_to_one_within_r_and_hungarian_is_maximum(scene) -> None:
    p, s, g, r = scene
    d = _dist(p, g)
    counts = {}
    for name in ALL:
        proto = PROTOCOLS.get(name)
        a, b = proto.match(p, s, g, r)
        assert len(set(a.tolist())) == len(a) and len(set(b.tolist())) == len(b)
        if len(a):
            assert (d[a, b] <= r).all() if proto.inclusive else (d[a, b] < r).all()
        counts[name] = len(a)
        if name in GREEDY:  # greedy matchings are maximal: no free pred/GT pair left within r
            free_p = np.setdiff1d(np.arange(len(p)), a)
            free_g = np.setdiff1d(np.arange(len(g)), b)
            sub = d[np.ix_(free_p, free_g)]
            assert not ((sub <= r) if proto.inclusive else (sub < r)).any()
    assert all(counts["hungarian"] >= counts[n] for n in GREEDY)
    if len(p) and len(g):  # maximum cardinality, checked with a dense assignment
        from scipy.optimize import linear_sum_assignment

        cost = np.where(d <= r, -1.0, 0.0)
        rr, cc = linear_sum_assignment(cost)
        assert counts["hungarian"] == int(-cost[rr, cc].sum())


@settings(max_examples=80, deadline=None)
@given(scenes(), st.randoms(use_true_random=False))
def test_hungarian_count_is_order_invariant(scene, rnd) -> None:
    p, s, g, r = scene
    n = len(match("hungarian", p, s, g, r)[0])
    pp = rnd.sample(range(len(p)), len(p))
    gg = rnd.sample(range(len(g)), len(g))
    assert len(match("hungarian", p[pp], None, g[gg], r)[0]) == n
    # pred-driven greedy with distinct scores does not depend on prediction order
    if len(p):
        s2 = np.arange(len(p), dtype=np.float32)
        base = pairs("denuc", p, g, r, s2)
        perm = pairs("denuc", p[pp], g, r, s2[pp])
        assert {(pp[i], j) for i, j in perm} == base
