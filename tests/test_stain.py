"""Stain jitter and Macenko normalisation on images rendered from known stains (Beer-Lambert)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from denuc.data.stain import (
    MACENKO_REFERENCE,
    STAIN_NORMALIZERS,
    StainReference,
    estimate_stains,
    from_od,
    macenko_normalize,
    stain_jitter,
    to_od,
)
from denuc.errors import InputError

H_SITE_A = np.array([0.70, 0.65, 0.30])
E_SITE_A = np.array([0.22, 0.85, 0.48])
H_SITE_B = np.array([0.55, 0.75, 0.37])
E_SITE_B = np.array([0.25, 0.80, 0.55])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _concentrations(size: int = 96, seed: int = 0) -> np.ndarray:
    """(size, size, 2) H and E concentrations: dark round nuclei (mostly H) in eosin-stained
    stroma (mostly E), with a white (glass) corner."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    h = np.zeros((size, size))
    for cx, cy in rng.uniform(8, size - 8, (25, 2)):
        h += 1.2 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 3.0**2))
    e = 0.9 + 0.3 * rng.random((size, size))
    e = e * np.exp(-3.0 * h)  # nuclei displace the eosin-stained cytoplasm/stroma
    h = h + 0.05 * rng.random((size, size))
    glass = (xx < size // 5) & (yy < size // 5)
    h[glass], e[glass] = 0.0, 0.0
    return np.stack([h, e], -1)


def _render(conc: np.ndarray, h: np.ndarray, e: np.ndarray) -> np.ndarray:
    od = conc @ np.stack([_unit(h), _unit(e)])
    return from_od(od.astype(np.float32))


def test_estimate_recovers_the_stain_vectors() -> None:
    img = _render(_concentrations(), H_SITE_A, E_SITE_A)
    est = estimate_stains(img)
    assert not est.fallback
    assert est.stains[0] @ _unit(H_SITE_A) > 0.99  # haematoxylin first
    assert est.stains[1] @ _unit(E_SITE_A) > 0.99


def test_normalising_restains_to_the_reference() -> None:
    conc = _concentrations(seed=1)
    src = _render(conc, H_SITE_A, E_SITE_A)
    want = _render(conc, H_SITE_B, E_SITE_B)
    ref_est = estimate_stains(want)
    ref = StainReference(tuple(map(tuple, ref_est.stains.tolist())), tuple(ref_est.max_conc.tolist()))
    out = macenko_normalize(src, ref)
    assert out.shape == src.shape and out.dtype == np.uint8
    before = np.abs(src.astype(int) - want).mean()
    after = np.abs(out.astype(int) - want).mean()
    assert after < 3.0 and after < before / 4, (before, after)


def test_normalising_an_image_to_its_own_stains_is_identity() -> None:
    img = _render(_concentrations(seed=2), H_SITE_B, E_SITE_B)
    est = estimate_stains(img)
    ref = StainReference(tuple(map(tuple, est.stains.tolist())), tuple(est.max_conc.tolist()))
    assert np.abs(macenko_normalize(img, ref).astype(int) - img).max() <= 2


def test_no_tissue_is_left_alone_and_bad_input_is_refused() -> None:
    white = np.full((64, 64, 3), 250, np.uint8)
    assert estimate_stains(white).fallback
    assert np.array_equal(macenko_normalize(white), white)
    assert np.array_equal(STAIN_NORMALIZERS["none"](white), white)
    with pytest.raises(InputError, match="uint8 RGB"):
        macenko_normalize(white.astype(np.uint16))
    with pytest.raises(InputError, match="uint8 RGB"):
        macenko_normalize(white[..., :1])
    with pytest.raises(InputError, match="stain reference"):
        StainReference.from_dict({"stains": [[1, 0, 0]], "max_conc": [1, 1]})
    assert StainReference.from_dict(MACENKO_REFERENCE.as_dict()) == MACENKO_REFERENCE


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))
def test_od_round_trip(r: int, g: int, b: int) -> None:
    px = np.array([[[r, g, b]]], np.uint8)
    assert np.array_equal(from_od(to_od(px)), px)


def test_hed_stain_jitter() -> None:
    img = np.random.default_rng(0).integers(30, 250, (16, 16, 3)).astype(np.uint8)
    same = stain_jitter(img, np.random.default_rng(3), 0.0, "hed")
    assert np.abs(same.astype(int) - img).max() <= 1  # zero strength = identity up to rounding
    a = stain_jitter(img, np.random.default_rng(3), 0.2, "hed")
    assert np.array_equal(a, stain_jitter(img, np.random.default_rng(3), 0.2, "hed"))
    assert not np.array_equal(a, stain_jitter(img, np.random.default_rng(3), 0.2, "od"))
    assert np.abs(a.astype(int) - img).mean() > 1
    with pytest.raises(InputError, match="space"):
        stain_jitter(img, np.random.default_rng(3), 0.2, "lab")


@pytest.mark.parametrize("max_pixels", [250_000, 3_000])
def test_tensor_macenko_equals_numpy(max_pixels: int) -> None:
    import torch

    from denuc.data.stain import (
        STAIN_NORMALIZERS_TENSOR,
        estimate_stains,
        macenko_normalize_tensor,
    )

    img = _render(_concentrations(128, seed=2), H_SITE_B, E_SITE_B)
    if max_pixels < 250_000:  # more tissue than max_pixels: both sample the same pixels
        est = estimate_stains(img, max_pixels=max_pixels)
        ref = macenko_normalize(img, estimate=est)
    else:
        ref = macenko_normalize(img)
    got = macenko_normalize_tensor(torch.from_numpy(img.copy()), max_pixels=max_pixels).numpy()
    assert got.dtype == np.uint8 and got.shape == img.shape
    assert np.abs(got.astype(int) - ref).max() <= 1 and (got != ref).mean() < 1e-3  # last-bit rounding only
    assert (got != img).mean() > 0.5  # it did re-stain
    blank = np.full((40, 40, 3), 250, np.uint8)  # no tissue: unchanged
    assert torch.equal(STAIN_NORMALIZERS_TENSOR["macenko"](torch.from_numpy(blank)), torch.from_numpy(blank))
    with pytest.raises(InputError, match="uint8"):
        macenko_normalize_tensor(torch.zeros(8, 8, 3))


def test_featurizer_normalises_on_the_device_like_on_the_host() -> None:
    import torch

    from denuc.encode import build_encoder
    from denuc.query import PointFeaturizer

    img = _render(_concentrations(300, seed=3), H_SITE_B, E_SITE_B)
    enc = build_encoder("efficientnet-lite0", weights="random", device="cpu")
    xy = np.random.default_rng(0).uniform(10, 290, (50, 2))
    feats = []
    for on_device in (False, True):
        fz = PointFeaturizer(enc, stain_norm="macenko")
        fz.stain_on_device = on_device
        fz.set_image(img, 0.25)
        feats.append(fz.features_at(xy))
    assert fz.stain_on_device and not PointFeaturizer(enc).stain_on_device  # CPU default: numpy
    torch.testing.assert_close(feats[0], feats[1], atol=1e-3, rtol=1e-3)
