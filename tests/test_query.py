"""Point-query geometry: a fake encoder whose map holds image coordinates must give them back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from denuc.encode.encoder import Encoder
from denuc.encode.specs import EncoderSpec
from denuc.encode.weights import WeightsSource
from denuc.errors import InputError
from denuc.query import PointFeaturizer, best_window, map_grid, sample_map


class _Pool(torch.nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.w = torch.nn.Parameter(torch.zeros(1))  # gives the encoder a device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.k)


class _BoxConv(_Pool):
    """``avg_pool2d`` as a depthwise strided convolution: CPU autocast runs it in bf16 (it keeps
    pooling in fp32), so the bf16 path really rounds."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.full((x.shape[1], 1, self.k, self.k), 1.0 / self.k**2, device=x.device)
        return F.conv2d(x, weight, stride=self.k, groups=x.shape[1])


class CoordEncoder(Encoder):
    """Map cell = mean of its input block; with a ramp image this is the block centre's coordinate."""

    calls = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        CoordEncoder.calls += 1
        return self.body(images)


def coord_encoder(input_size: int = 128, stride: int = 8, window: int = 64, conv: bool = False) -> CoordEncoder:
    spec = EncoderSpec(name="coords", family="fake", dim=3, stride=stride, num_prefix_tokens=0, mean=(0, 0, 0),
                       std=(1, 1, 1), input_size=input_size, mpp=0.25, window=window)
    return CoordEncoder(spec, (_BoxConv if conv else _Pool)(stride), WeightsSource(None, "fake", "fake"))


def ramp_image(h: int, w: int) -> np.ndarray:
    """Float image whose R/G channels hold 255 * ... the pixel-centre x / y (so /255 gives coords)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.stack([xx + 0.5, yy + 0.5, np.zeros_like(xx)], axis=-1)


@pytest.mark.parametrize("image_mpp", [0.25, 0.5])
def test_center_mode_returns_point_coordinates(image_mpp: float) -> None:
    enc = coord_encoder()
    fp = PointFeaturizer(enc, window=64, stride=32)
    h, w = 70, 90  # at 0.5 µm/px this becomes 140 x 180 working px -> several overlapping windows
    fp.set_image(ramp_image(h, w), image_mpp)
    rng = np.random.default_rng(0)
    margin = 10 * 0.25 / image_mpp
    xy = np.stack([rng.uniform(margin, w - margin, 300), rng.uniform(margin, h - margin, 300)], axis=1)
    got = fp.features_at(xy).numpy()[:, :2] * 255.0
    np.testing.assert_allclose(got, xy, atol=2e-3 * max(h, w))
    assert fp.n_encoded == len(fp._xs) * len(fp._ys) > 1


def test_corners_mode_matches_authors_formula() -> None:
    enc = coord_encoder()
    fp = PointFeaturizer(enc, window=64, stride=64, align="corners")
    fp.set_image(ramp_image(64, 64), 0.25)
    xy = np.array([[10.0, 20.0], [40.0, 33.0]])
    got = fp.features_at(xy).numpy()[:, :2] * 255.0
    w_map = 128 // 8
    u = xy / 64 * (w_map - 1)  # map-cell units, the authors' align_corners=True mapping
    expected = (u + 0.5) * 8 * 64 / 128  # cell centre -> input px -> window px (= image px here)
    np.testing.assert_allclose(got, expected, atol=1e-3)
    assert np.abs(got - xy).max() > 0.5  # the shift the right geometry removes


def test_only_windows_with_points_are_encoded_once() -> None:
    enc = coord_encoder()
    fp = PointFeaturizer(enc, window=64, stride=64)
    fp.set_image(ramp_image(128, 192), 0.25)  # 2 x 3 windows
    fp.features_at(np.array([[10.0, 10.0]]))
    assert fp.n_encoded == 1
    fp.features_at(np.array([[12.0, 11.0], [100.0, 100.0]]))
    assert fp.n_encoded == 2  # the first window is reused
    assert fp.features_at(np.zeros((0, 2))).shape == (0, 3)


def test_point_in_overlap_takes_the_deepest_window() -> None:
    origins = np.array([0, 48, 96])
    k, depth = best_window(np.array([5.0, 60.0, 100.0, 140.0]), origins, 64)
    assert k.tolist() == [0, 1, 1, 2]  # 60: depths 4 / 12 / - ; 100: 4 / 12 / 4 -> middle window
    assert depth.tolist() == [5.0, 12.0, 12.0, 20.0]


def test_small_image_is_padded_and_outside_points_raise() -> None:
    fp = PointFeaturizer(coord_encoder(), window=64, stride=48)
    fp.set_image(ramp_image(30, 40), 0.25)
    got = fp.features_at(np.array([[20.0, 15.0]])).numpy()[0, :2] * 255
    np.testing.assert_allclose(got, [20.0, 15.0], atol=0.05)
    with pytest.raises(InputError, match="outside"):
        fp.features_at(np.array([[41.0, 5.0]]))


def test_sample_map_hits_cell_centres() -> None:
    fmap = torch.arange(4.0).view(1, 1, 4).expand(1, 4, 4).clone()  # value = column index
    centres = (torch.arange(4.0) + 0.5) * 16 * 64 / 64  # window = input = 64, stride 16
    xy = torch.stack([centres, torch.full((4,), 30.0)], 1)
    g = map_grid(xy, 64, 64, 16, (4, 4), "center")
    assert torch.allclose(sample_map(fmap, g)[:, 0], torch.arange(4.0))


def test_stain_norm_restains_the_working_image_and_enters_the_geometry() -> None:
    from denuc.data.stain import macenko_normalize

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    h = sum(1.2 * np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 18.0) for cx, cy in rng.uniform(8, 88, (20, 2)))
    e = (0.9 + 0.3 * rng.random((96, 96))) * np.exp(-3 * h)
    od = h[..., None] * np.array([0.70, 0.65, 0.30]) + e[..., None] * np.array([0.22, 0.85, 0.48])
    img = np.clip(np.round(np.exp(-od) * 256 - 1), 0, 255).astype(np.uint8)
    enc = coord_encoder(input_size=64, window=64)
    plain = PointFeaturizer(enc, mpp=0.25)
    fz = plain.with_stain_norm("macenko")
    assert "stain_norm" not in plain.geometry() and fz.geometry() == {**plain.geometry(), "stain_norm": "macenko"}
    fz.set_image(img, 0.25)
    want = torch.from_numpy(macenko_normalize(img).astype(np.float32)).permute(2, 0, 1) / 255
    torch.testing.assert_close(fz._img[:, :96, :96], want)
    plain.set_image(img, 0.25)
    assert not torch.equal(plain._img, fz._img)
    with pytest.raises(InputError, match="stain normaliser"):
        PointFeaturizer(enc, stain_norm="reinhard-ish")


def test_precision_option_and_bf16_autocast_stay_close_to_fp32() -> None:
    enc = coord_encoder(input_size=64, window=64, conv=True)
    img = ramp_image(100, 90)
    xy = np.array([[10.0, 20.0], [80.0, 95.0]])
    full = PointFeaturizer(enc, mpp=0.25, precision="fp32")
    half = PointFeaturizer(enc, mpp=0.25, precision="bf16")
    assert full.autocast_dtype is None and half.autocast_dtype == torch.bfloat16
    assert PointFeaturizer(enc, mpp=0.25).autocast_dtype is None  # auto: fp32 on the CPU
    full.set_image(img, 0.25)
    half.set_image(img, 0.25)
    a, b = full.features_at(xy), half.features_at(xy)
    assert a.dtype == b.dtype == torch.float32
    assert not torch.equal(a, b)  # the convolution really ran in bf16
    torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)
    np.testing.assert_allclose(a[:, :2].numpy() * 255, xy, atol=1.0)  # fp32 gives the coordinates back
    with pytest.raises(InputError, match="precision"):
        PointFeaturizer(enc, precision="fp8")


@pytest.mark.parametrize("chunk_values", [None, 7])
@pytest.mark.parametrize("align", ["center", "corners"])
def test_batched_sampling_equals_sampling_each_window_alone(chunk_values: int | None, align: str,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from denuc.query import predictor

    if chunk_values is not None:  # tiny budget: every window sampled in its own chunk
        monkeypatch.setattr(predictor, "SAMPLE_CHUNK_VALUES", chunk_values)
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)
    fp = PointFeaturizer(coord_encoder(input_size=96, stride=8, window=64), window=64, stride=48, batch_size=3,
                         align=align)
    fp.set_image(img, 0.25)
    xy = np.stack([rng.uniform(0, 170, 400), rng.uniform(0, 150, 400)], axis=1)
    first = fp.features_at(xy[:150])  # some windows encoded by an earlier query (other batches)
    got = fp.features_at(xy)
    ref = torch.zeros_like(got)
    for k, sel, local in fp.group_points(xy):
        ref[torch.from_numpy(sel)] = fp.sample(fp._maps[k], local)
    assert len(fp._batches) > 1
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(first, ref[:150], rtol=0, atol=0)


def test_sampling_points_of_one_inner_window_and_no_points() -> None:
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)
    fp = PointFeaturizer(coord_encoder(input_size=96, stride=8, window=64), window=64, stride=48, batch_size=4)
    fp.set_image(img, 0.25)
    assert fp.features_at(np.zeros((0, 2))).shape == (0, fp.encoder.dim)
    fp.features_at(np.array([[1.0, 1.0], [169.0, 149.0], [90.0, 70.0]]))  # three windows: rows 0-2 of batch 0
    xy = np.array([[90.0, 70.0], [85.0, 75.0], [95.5, 66.25]])  # the middle one (row 1) alone, sampled again
    got = fp.features_at(xy)
    (k, sel, local), = fp.group_points(xy)
    assert fp._where[k][1] > 0
    torch.testing.assert_close(got[torch.from_numpy(sel)], fp.sample(fp._maps[k], local), rtol=0, atol=0)


def test_feature_tta_averages_the_features_of_flipped_and_rotated_passes() -> None:
    from denuc.detect.tta import points_to_transformed, tta_passes, transform_image

    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (90, 130, 3), dtype=np.uint8)
    xy = np.vstack([rng.uniform(0, [130, 90], (40, 2)), [[0.0, 0.0], [129.9, 89.9]]])  # edges too
    enc = coord_encoder(input_size=96, stride=8, window=64)
    fz = PointFeaturizer(enc, window=64, stride=48, feature_tta=4)
    assert fz.geometry()["feature_tta"] == 4 and "feature_tta" not in PointFeaturizer(enc).geometry()
    fz.set_image(img, 0.25)
    got = fz.features_at(xy)
    ref = torch.zeros_like(got)
    for k, flip in tta_passes(4):
        one = PointFeaturizer(enc, window=64, stride=48)
        one.set_image(transform_image(img, k, flip), 0.25)
        q = points_to_transformed(xy, k, flip, img.shape[:2])
        h, w = one.image_hw
        ref += one.features_at(np.clip(q, 0, [np.nextafter(w, 0), np.nextafter(h, 0)]))
    torch.testing.assert_close(got, ref / 4)
    assert fz.windows_encoded > 0 and fz.n_encoded == fz.windows_encoded
    with pytest.raises(InputError, match="outside"):
        fz.features_at(np.array([[130.0, 10.0]]))
    with pytest.raises(InputError, match="feature_tta"):
        PointFeaturizer(enc, feature_tta=3)


@pytest.mark.parametrize("feature_tta", [1, 4])
def test_bounded_map_cache_streams_windows_with_identical_features(feature_tta: int) -> None:
    """With room for one batch of maps, a query over many windows encodes, samples and drops
    them batch by batch: same features as keeping every map, memory bounded by the cache."""
    rng = np.random.default_rng(8)
    img = rng.integers(0, 256, (230, 260, 3), dtype=np.uint8)
    xy = np.stack([rng.uniform(0, 260, 500), rng.uniform(0, 230, 500)], axis=1)
    enc = coord_encoder(input_size=96, stride=8, window=64)
    one_map_mb = enc.dim * enc.map_size() ** 2 * 4 / 2**20
    kw = {"window": 64, "stride": 48, "batch_size": 3, "feature_tta": feature_tta}
    full = PointFeaturizer(enc, **kw)
    small = PointFeaturizer(enc, cache_mb=3.5 * one_map_mb * feature_tta, **kw)  # 3.5 maps per pass -> 3
    assert full.cache_windows > 100 and (small.cache_windows if feature_tta == 1 else 3) == 3
    for fz in (full, small):
        fz.set_image(img, 0.25)
    ref, got = full.features_at(xy), small.features_at(xy)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    assert small.windows_encoded == full.windows_encoded > 3  # every needed window, each once
    subs = [s for _, s in small._passes] or [small]
    assert all(len(s._maps) <= 3 for s in subs)
    torch.testing.assert_close(small.features_at(xy[:40]), ref[:40], rtol=0, atol=0)  # re-encodes dropped maps
    with pytest.raises(InputError, match="cache_mb"):
        PointFeaturizer(enc, cache_mb=-1)


def test_float_images_in_0_1_and_0_255_give_the_same_features() -> None:
    rng = np.random.default_rng(11)
    img = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)
    xy = np.stack([rng.uniform(0, 90, 30), rng.uniform(0, 70, 30)], axis=1)
    out = []
    for arr in (img, img.astype(np.float32), img.astype(np.float64) / 255.0):
        fp = PointFeaturizer(coord_encoder(input_size=96, stride=8, window=64), window=64, stride=48)
        fp.set_image(arr, 0.25)
        out.append(fp.features_at(xy))
    torch.testing.assert_close(out[1], out[0], rtol=0, atol=0)
    torch.testing.assert_close(out[2], out[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="NaN"):
        fp.set_image(np.full((8, 8, 3), np.nan), 0.25)
