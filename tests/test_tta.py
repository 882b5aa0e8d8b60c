"""Detector test-time augmentation: dihedral point mapping, pass fusion, equivariance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from model_fixtures import tiny_detector_checkpoint

from denuc.detect.api import Detector
from denuc.detect.checkpoint import save_detector
from denuc.detect.model import DetectorConfig, build_detector
from denuc.detect.tta import (
    TTA_PASSES,
    points_to_original,
    points_to_transformed,
    transform_image,
    tta_passes,
)
from denuc.errors import InputError
from denuc.merge.fuse import fuse_points
from denuc.merge.nms import point_nms

PASSES = TTA_PASSES[8]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(PASSES), st.integers(1, 40), st.integers(1, 40),
       arrays(np.float64, (5, 2), elements=st.floats(0, 1)))
def test_point_mapping_round_trips(p: tuple[int, bool], h: int, w: int, unit: np.ndarray) -> None:
    k, flip = p
    xy = unit * np.array([w, h])
    there = points_to_transformed(xy, k, flip, (h, w))
    hw_t = (w, h) if k % 2 else (h, w)
    assert ((there >= 0) & (there <= np.array(hw_t[::-1]))).all()
    np.testing.assert_allclose(points_to_original(there, k, flip, (h, w)), xy, atol=1e-9)


@pytest.mark.parametrize("p", PASSES)
def test_pixel_centres_follow_the_pixels(p: tuple[int, bool]) -> None:
    k, flip = p
    img = np.zeros((5, 7, 3), np.uint8)
    img[1, 4] = 255  # pixel (col 4, row 1): centre (4.5, 1.5)
    t = transform_image(img, k, flip)
    r, c = np.argwhere(t[..., 0] == 255)[0]
    np.testing.assert_allclose(points_to_transformed(np.array([[4.5, 1.5]]), k, flip, (5, 7)), [[c + 0.5, r + 0.5]])


@pytest.mark.parametrize("p", PASSES)
def test_transform_image_equals_numpy_rot90_for_any_layout(p: tuple[int, bool]) -> None:
    k, flip = p
    rng = np.random.default_rng(k + 4 * flip)
    for img in (rng.integers(0, 256, (9, 13, 3), dtype=np.uint8), rng.random((6, 4, 3)).astype(np.float32),
                rng.integers(0, 2**16, (5, 8, 4), dtype=np.uint16),
                rng.integers(0, 256, (13, 9, 3), dtype=np.uint8).transpose(1, 0, 2)):  # non-contiguous input
        want = np.rot90(img[:, ::-1] if flip else img, k)
        got = transform_image(img, k, flip)
        assert got.dtype == img.dtype and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (30, 2), elements=st.floats(0, 50)), arrays(np.float64, (30,), elements=st.floats(0.01, 1)))
def test_fusing_one_pass_is_nms_and_copies_change_nothing(xy: np.ndarray, sc: np.ndarray) -> None:
    keep = point_nms(xy, sc, 4.0)
    one_xy, one_s = fuse_points([(xy, sc)], 4.0)
    np.testing.assert_allclose(one_xy, xy[keep])
    np.testing.assert_allclose(one_s, sc[keep], rtol=1e-6)
    two_xy, two_s = fuse_points([(xy, sc), (xy.copy(), sc.copy())], 4.0)
    np.testing.assert_allclose(two_s, one_s, rtol=1e-6)
    np.testing.assert_allclose(np.sort(two_xy, 0), np.sort(one_xy, 0), atol=1e-9)


def test_fused_score_averages_over_passes() -> None:
    a = (np.array([[10.0, 10.0], [40.0, 40.0]]), np.array([0.8, 0.6]))
    b = (np.array([[11.0, 10.0]]), np.array([0.4]))
    empty = (np.zeros((0, 2)), np.zeros(0))
    xy, s = fuse_points([a, b, empty, empty], 3.0)
    np.testing.assert_allclose(s, [(0.8 + 0.4) / 4, 0.6 / 4])
    np.testing.assert_allclose(xy, [[(10 * 0.8 + 11 * 0.4) / 1.2, 10.0], [40.0, 40.0]])
    assert fuse_points([empty], 3.0)[0].shape == (0, 2)
    with pytest.raises(InputError):
        tta_passes(3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_detector_checkpoint(tmp_path_factory.mktemp("tta") / "tiny.safetensors", seed=1, score_threshold=0.3,
                                    tta_thresholds={"4": 0.2})


def test_four_rotation_tta_is_rotation_equivariant(tiny: Path) -> None:
    det = Detector.load(tiny, device="cpu", tta=4)
    assert det.threshold == 0.2 and Detector.load(tiny, device="cpu").threshold == 0.3  # per-TTA threshold
    img = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)  # one window: no tiling
    a = det.detect(img, 0.5)
    b = det.detect(np.ascontiguousarray(np.rot90(img)), 0.5)
    assert len(a) > 5 and len(a) == len(b)
    back = points_to_original(b.xy, 1, False, (256, 256))
    np.testing.assert_allclose(back[np.lexsort(back.T)], a.xy[np.lexsort(a.xy.T)], atol=1e-4)
    assert a.inside(256, 256).all()


def test_tta_refuses_class_aware_detectors(tmp_path: Path) -> None:
    model = build_detector(DetectorConfig(backbone="tiny", num_classes=2, class_names=("a", "b"))).eval()
    save_detector(tmp_path / "c.safetensors", model, {"mpp": 0.5, "nms_radius_um": 3.0})
    with pytest.raises(InputError, match="class-agnostic"):
        Detector.load(tmp_path / "c.safetensors", device="cpu", tta=4)


def test_detect_cli_tta_writes_the_fused_points(tiny: Path, tmp_path: Path) -> None:
    import argparse

    from PIL import Image

    from denuc.core.result import Nuclei
    from denuc.detect import cli as detect_cli

    img = np.random.default_rng(3).integers(0, 256, (200, 230, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.png")
    p = argparse.ArgumentParser()
    detect_cli.configure(p)
    args = p.parse_args([str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--mpp", "0.5", "--detector",
                         str(tiny), "--device", "cpu", "--tta", "4"])
    assert detect_cli.main(args) == 0
    got = Nuclei.read_csv(tmp_path / "o" / "a.csv")
    want = Detector.load(tiny, device="cpu", tta=4).detect(img, 0.5)
    assert len(got) == len(want) > 0
    np.testing.assert_allclose(got.xy[np.lexsort(got.xy.T)], want.xy[np.lexsort(want.xy.T)], atol=1e-3)
    with pytest.raises(SystemExit):
        p.parse_args([str(tmp_path / "a.png"), "--out", "o", "--tta", "3"])
