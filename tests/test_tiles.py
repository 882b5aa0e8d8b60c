"""Tile geometry: exact region resampling and one owner per point (property tests)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from denuc.data.resample import resample, resampled_size
from denuc.merge.tiling import window_origins
from denuc.tiles.plan import AxisPlan, make_frame, make_plan
from denuc.tiles.resample import axis_taps, resample_taps, source_span

FACTORS = st.sampled_from([2.0, 1.0, 0.5, 1.0108, 0.9763, 0.4, 1.37, 0.25, 3.0])


@settings(max_examples=40, deadline=None)
@given(st.integers(3, 90), st.integers(3, 90), FACTORS, st.integers(0, 2**31 - 1), st.data())
def test_region_equals_the_same_region_of_a_whole_pass(h: int, w: int, f: float, seed: int, data: st.DataObject) -> None:
    img = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    oh, ow = resampled_size((h, w), f)
    whole = resample_taps(img, (0, 0), (0, 0), (ow, oh), f, (w, h))
    x0 = data.draw(st.integers(0, ow - 1))
    y0 = data.draw(st.integers(0, oh - 1))
    rw = data.draw(st.integers(1, ow - x0))
    rh = data.draw(st.integers(1, oh - y0))
    sx, sy = source_span(x0, rw, f, w), source_span(y0, rh, f, h)
    crop = img[sy[0]:sy[1], sx[0]:sx[1]]
    part = resample_taps(crop, (sx[0], sy[0]), (x0, y0), (rw, rh), f, (w, h))
    np.testing.assert_array_equal(part, whole[y0:y0 + rh, x0:x0 + rw])
    fl = resample_taps(crop, (sx[0], sy[0]), (x0, y0), (rw, rh), f, (w, h), as_float=True)
    np.testing.assert_array_equal(np.clip(np.rint(fl), 0, 255).astype(np.uint8), part)


@pytest.mark.parametrize("f", [2.0, 1.0108, 0.5, 0.4, 0.9763])
def test_taps_match_the_whole_image_resampler_to_rounding(f: float) -> None:
    img = np.random.default_rng(1).integers(0, 256, (121, 97, 3), dtype=np.uint8)
    oh, ow = resampled_size(img.shape[:2], f)
    ours = resample_taps(img, (0, 0), (0, 0), (ow, oh), f, (97, 121)).astype(int)
    ref = resample(img, f).astype(int)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1 and (ours != ref).mean() < 0.01


def test_taps_sum_to_one_and_stay_inside() -> None:
    for f in (2.0, 0.3, 1.01):
        idx, w = axis_taps(0, int(40 * f), f, 40)
        np.testing.assert_allclose(w.sum(1), 1, atol=1e-6)
        assert idx.min() >= 0 and idx.max() < 40


def test_crop_without_the_taps_is_refused() -> None:
    img = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="tap"):
        resample_taps(img[5:], (0, 5), (0, 0), (10, 10), 2.0, (20, 20))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5000), st.sampled_from([(256, 192, 32.0), (512, 448, 32.0), (64, 32, 16.0)]),
       st.integers(1, 12), st.data())
def test_every_point_has_exactly_one_owner_and_its_windows(length: int, geo: tuple[int, int, float], cells: int,
                                                             data: st.DataObject) -> None:
    window, stride, margin = geo
    ax = AxisPlan(length, window, stride, margin, cells)
    bounds = [ax.bounds(k) for k in range(ax.count)]
    assert bounds[0][0] == 0 and bounds[-1][1] == length
    for (a0, a1), (b0, b1) in zip(bounds, bounds[1:]):
        assert a1 == b0 and a0 < a1
    u = data.draw(st.floats(0, length, exclude_max=True))
    owners = [k for k, (a, b) in enumerate(bounds) if a <= u < b]
    assert len(owners) == 1
    k = owners[0]
    start, end = ax.read_range(k)
    assert 0 <= start <= u < end <= length
    # the tile's windows are the whole frame's windows that fall inside it
    glob = window_origins(max(length, window), window, stride)
    local = window_origins(max(end - start, window), window, stride) + start
    inside = glob[(glob >= start) & (glob + window <= max(end, window))]
    np.testing.assert_array_equal(local, inside)
    # the window that keeps u in a whole pass (the margin rule) lies inside the tile
    keepers = [o for o in glob if (o == 0 or u >= o + margin) and (o + window >= length or u < o + window - margin)
               and o <= u < o + window]
    assert keepers and all(start <= o and o + window <= max(end, window) for o in keepers)


def test_frame_reads_the_coarsest_level_no_coarser_than_the_working_mpp() -> None:
    dims = ((40000, 30000), (10000, 7500), (2500, 1875))
    ds = (1.0, 4.0, 16.0)
    assert make_frame(dims, ds, 0.25, 0.25).level == 0
    assert make_frame(dims, ds, 0.25, 1.0).level == 1
    assert make_frame(dims, ds, 0.25, 3.99).level == 1
    f = make_frame(dims, ds, 0.2527, 0.25)
    assert f.level == 0 and f.size == resampled_size((30000, 40000), 0.2527 / 0.25)[::-1]
    plan = make_plan(dims, ds, 0.25, det_mpp=0.25, det_window=256, det_stride=192, det_margin=32, tile_px=2048,
                     enc_mpp=0.5, enc_window=256, enc_stride=192)
    assert plan.enc is not None and plan.enc.level == 0 and plan.count == len(plan.selected)
    boxes = plan.core_boxes_level0()
    assert boxes.shape == (plan.count, 4)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
    assert area == pytest.approx(40000 * 30000)


def test_last_tile_holds_the_frames_flush_window() -> None:
    """Every length (a deterministic sweep, beside the property test above): a tile whose range
    reaches the frame's end holds the frame's last window, flush with the end (length 113 with
    64 px windows once read [64, 113) and ran a padded window the whole pass never runs)."""
    for length in range(1, 400):
        for cells in range(1, 5):
            ax = AxisPlan(length, 64, 32, 16.0, cells)
            glob = window_origins(max(length, 64), 64, 32)
            for k in range(ax.count):
                start, end = ax.read_range(k)
                local = window_origins(max(end - start, 64), 64, 32) + start
                np.testing.assert_array_equal(local, glob[(glob >= start) & (glob + 64 <= max(end, 64))])
