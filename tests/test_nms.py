"""Properties of greedy point NMS."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.spatial.distance import cdist

from denuc.merge.nms import point_nms

coords = st.lists(
    st.tuples(st.floats(0, 50, allow_nan=False), st.floats(0, 50, allow_nan=False),
              st.sampled_from([0.1, 0.5, 0.5, 0.9, 1.0])),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(pts=coords, radius=st.floats(0.5, 12))
def test_nms_properties(pts: list[tuple[float, float, float]], radius: float) -> None:
    arr = np.array(pts, dtype=np.float64).reshape(-1, 3)
    xy, sc = arr[:, :2], arr[:, 2]
    keep = point_nms(xy, sc, radius)
    assert len(set(keep.tolist())) == len(keep)
    kept = xy[keep]
    if len(keep) > 1:
        d = cdist(kept, kept)
        np.fill_diagonal(d, np.inf)
        assert d.min() > radius
    dropped = np.setdiff1d(np.arange(len(xy)), keep)
    for j in dropped:
        d = np.hypot(*(kept - xy[j]).T)
        assert np.any((d <= radius) & (sc[keep] >= sc[j]))
    again = point_nms(kept, sc[keep], radius)
    assert sorted(again.tolist()) == list(range(len(keep)))


def test_nms_highest_score_wins_and_empty_input() -> None:
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0]])
    keep = point_nms(xy, np.array([0.2, 0.9, 0.5]), radius=2.0)
    assert keep.tolist() == [1, 2]
    assert point_nms(np.zeros((0, 2)), np.zeros(0), 3.0).shape == (0,)
