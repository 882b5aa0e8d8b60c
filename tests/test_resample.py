"""Resampling maps image content at (x, y) to (f*x, f*y) exactly (pixel-edge frame)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from denuc.core.result import Nuclei
from denuc.data.resample import resample, resample_factor


def _blob(h: int, w: int, cx: float, cy: float, sigma: float = 3.0) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] + 0.5  # pixel centres in the pixel-edge frame
    g = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    return np.repeat((g * 255).round().astype(np.uint8)[:, :, None], 3, axis=2)


def _centroid(img: np.ndarray) -> tuple[float, float]:
    v = img[:, :, 0].astype(np.float64)
    yy, xx = np.mgrid[0 : v.shape[0], 0 : v.shape[1]] + 0.5
    return float((v * xx).sum() / v.sum()), float((v * yy).sum() / v.sum())


@settings(max_examples=25, deadline=None)
@given(
    factor=st.one_of(st.floats(0.5, 2.0), st.floats(0.999, 1.001)),
    cx=st.floats(30.0, 70.0),
    cy=st.floats(30.0, 70.0),
)
def test_blob_centre_moves_with_the_factor(factor: float, cx: float, cy: float) -> None:
    out = resample(_blob(100, 100, cx, cy), factor)
    assert out.shape[:2] == (max(int(100 * factor), 1),) * 2 or abs(factor - 1) < 1e-6
    gx, gy = _centroid(out)
    pts = Nuclei(np.array([[cx, cy]]), mpp=1.0).rescale(1.0 / factor)
    assert abs(gx - pts.xy[0, 0]) < 0.25 and abs(gy - pts.xy[0, 1]) < 0.25


def test_same_size_but_not_identity_still_rescales() -> None:
    # floor(1000 * 1.0005) == 1000: the output keeps the size, but content must still move.
    im = np.zeros((4, 1000, 3), np.uint8)
    im[:, 800:] = 255  # an edge at x = 800 moves to x = 800.4
    out = resample(im, 1.0005)
    assert out.shape == im.shape
    assert 120 < out[0, 800, 0] < 190  # pixel 800 is 60% above the moved edge
    assert out[0, 799, 0] == 0 and out[0, 801, 0] == 255


def test_factor_one_is_identity_and_factor_from_mpp() -> None:
    im = _blob(20, 30, 10, 10)
    assert resample(im, 1.0) is im
    assert resample_factor(0.5, 0.25) == 2.0


def test_read_only_input_is_accepted() -> None:
    im = _blob(20, 20, 10, 10)
    im.setflags(write=False)
    assert resample(im, 2.0).shape == (40, 40, 3)
