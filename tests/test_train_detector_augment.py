"""Augmentation moves points exactly with the pixels."""

from __future__ import annotations

import numpy as np
import pytest

from denuc.train.augment import AugmentConfig, augment, hflip, photometric, rot90, vflip


def _one_hot(h: int, w: int, col: int, row: int) -> np.ndarray:
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[row, col] = (255, 0, 0)  # red: distinct from the black image and the white canvas
    return img


def _hot_all(img: np.ndarray) -> np.ndarray:
    return np.argwhere((img[..., 0] == 255) & (img[..., 1] == 0))


def _hot(img: np.ndarray) -> tuple[int, int]:
    hot = _hot_all(img)
    assert len(hot) == 1
    r, c = hot[0]
    return int(c), int(r)


@pytest.mark.parametrize("op", ["h", "v", "r1", "r2", "r3"])
def test_geometric_ops_move_the_hot_pixel_centre(op: str) -> None:
    img = _one_hot(7, 11, col=2, row=5)
    xy = np.array([[2.5, 5.5]])
    if op == "h":
        out, pts = hflip(img, xy)
    elif op == "v":
        out, pts = vflip(img, xy)
    else:
        out, pts = rot90(img, xy, int(op[1]))
    c, r = _hot(out)
    assert np.allclose(pts[0], [c + 0.5, r + 0.5])


def test_full_augment_keeps_points_on_their_pixels() -> None:
    rng = np.random.default_rng(0)
    cfg = AugmentConfig(crop=32, p_scale=0.0, p_jitter=0.0, p_blur=0.0, p_noise=0.0)
    for _ in range(50):
        col, row = int(rng.integers(0, 40)), int(rng.integers(0, 20))
        img = _one_hot(20, 40, col, row)  # narrower than the crop in y: canvas padding
        out, pts, lab = augment(img, np.array([[col + 0.5, row + 0.5]]), np.array([3]), cfg, rng)
        assert out.shape == (32, 32, 3)
        if len(pts):
            assert lab.tolist() == [3]
            c, r = _hot(out)
            assert np.allclose(pts[0], [c + 0.5, r + 0.5])
        else:
            assert len(_hot_all(out)) == 0  # the point left the crop with its pixel


def test_scaling_keeps_points_at_blob_centre() -> None:
    rng = np.random.default_rng(1)
    cfg = AugmentConfig(crop=64, p_scale=1.0, scale_range=(0.8, 1.25), p_flip=0, p_rot90=0, p_jitter=0,
                        p_blur=0, p_noise=0)
    img = np.zeros((64, 64, 3), dtype=np.uint8)
    img[30:34, 20:24, 0] = 200  # 4x4 red block centred at (22, 32) on black
    n = 0
    for _ in range(20):
        out, pts, _ = augment(img, np.array([[22.0, 32.0]]), np.array([0]), cfg, rng)
        if not len(pts):
            continue
        red = out[..., 0].astype(float) * (out[..., 1] == 0)  # the white canvas has green = 255
        ys, xs = np.nonzero(red)
        if ys.min() == 0 or xs.min() == 0 or ys.max() == 63 or xs.max() == 63:
            continue  # blob cut by the crop: its centroid moves
        cx = (red[ys, xs] * (xs + 0.5)).sum() / red[ys, xs].sum()
        cy = (red[ys, xs] * (ys + 0.5)).sum() / red[ys, xs].sum()
        assert abs(cx - pts[0, 0]) < 0.3 and abs(cy - pts[0, 1]) < 0.3
        n += 1
    assert n >= 5


def test_scaling_a_large_image_rescales_only_the_crop_region_and_keeps_points_on_blobs() -> None:
    # image much larger than the crop: augment crops a region before rescaling it
    rng = np.random.default_rng(2)
    cfg = AugmentConfig(crop=48, p_scale=1.0, scale_range=(0.8, 1.25), p_flip=0.5, p_rot90=0.75, p_jitter=0,
                        p_blur=0, p_noise=0)
    img = np.zeros((256, 256, 3), dtype=np.uint8)
    centres = [(16.0 + 32 * i, 16.0 + 32 * j) for i in range(8) for j in range(8)]
    for cx, cy in centres:
        img[int(cy) - 2:int(cy) + 2, int(cx) - 2:int(cx) + 2, 0] = 200
    checked = 0
    for _ in range(30):
        out, pts, _ = augment(img, np.array(centres), np.zeros(len(centres), np.int64), cfg, rng)
        assert out.shape == (48, 48, 3)
        red = out[..., 0].astype(float) * (out[..., 1] == 0)
        for px, py in pts:
            x0, x1 = int(px) - 5, int(px) + 6
            y0, y1 = int(py) - 5, int(py) + 6
            if x0 < 0 or y0 < 0 or x1 > 48 or y1 > 48:
                continue  # blob may be cut by the crop edge
            win = red[y0:y1, x0:x1]
            ys, xs = np.nonzero(win)
            cx = (win[ys, xs] * (xs + x0 + 0.5)).sum() / win[ys, xs].sum()
            cy = (win[ys, xs] * (ys + y0 + 0.5)).sum() / win[ys, xs].sum()
            assert abs(cx - px) < 0.3 and abs(cy - py) < 0.3
            checked += 1
    assert checked >= 20


def test_photometric_changes_colours_not_shape() -> None:
    rng = np.random.default_rng(2)
    img = np.random.default_rng(3).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    cfg = AugmentConfig(p_jitter=1.0, p_blur=1.0, p_noise=1.0)
    out = photometric(img, cfg, rng)
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)


def test_stain_jitter_in_augment_recolours_and_keeps_points() -> None:
    img = np.full((64, 64, 3), 235, np.uint8)
    img[20:30, 20:30] = (90, 60, 140)  # a purple nucleus
    xy = np.array([[25.0, 25.0]])
    lab = np.zeros(1, np.int64)
    geo_off = dict(p_scale=0.0, p_flip=0.0, p_rot90=0.0, p_jitter=0.0, p_blur=0.0, p_noise=0.0, crop=64)
    plain, xy0, _ = augment(img, xy, lab, AugmentConfig(**geo_off), np.random.default_rng(0))
    assert np.array_equal(plain, img)
    stained, xy1, _ = augment(img, xy, lab, AugmentConfig(**geo_off, p_stain=1.0, stain_strength=0.4),
                              np.random.default_rng(0))
    assert np.array_equal(xy1, xy0) and not np.array_equal(stained, img)
    assert stained[25, 25].astype(int).sum() < stained[5, 5].astype(int).sum()  # the nucleus stays darker
