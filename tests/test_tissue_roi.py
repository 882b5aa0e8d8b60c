"""Tissue masks (automatic, none, from a file) and their box queries; QuPath GeoJSON regions of
interest: holes, multipolygons, names, repairs, refusals, and vectorised queries checked
against shapely one point / one box at a time."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from shapely.geometry import Point, box

import denuc.source.roi as roi_mod
from denuc.errors import InputError
from denuc.source import (
    TISSUE_METHODS,
    TissueMask,
    detect_tissue,
    full_mask,
    load_rois,
    load_tissue_mask,
    open_source,
    tissue_mask,
)

GLASS = (243, 242, 240)
EOSIN = (232, 150, 190)
HEMATOXYLIN = (125, 85, 165)


def _synthetic_thumb(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 200 x 300 thumbnail: glass with noise, two H&E blobs, a green and a blue pen line and
    a black mark. Returns ``(thumb, blobs, pen)`` (the last two bool masks)."""
    rng = np.random.default_rng(seed)
    h, w = 200, 300
    img = np.empty((h, w, 3), np.float32)
    img[:] = GLASS
    yy, xx = np.mgrid[0:h, 0:w]
    blob1 = ((xx - 80) / 40.0) ** 2 + ((yy - 90) / 30.0) ** 2 <= 1
    blob2 = ((xx - 210) / 35.0) ** 2 + ((yy - 120) / 45.0) ** 2 <= 1
    blobs = blob1 | blob2
    mix = rng.random((h, w)) < 0.4  # speckled nuclei in eosin
    img[blobs & ~mix] = EOSIN
    img[blobs & mix] = HEMATOXYLIN
    # pen lines 8 px (64 µm) wide: too wide for the opening to remove, so the hue rule must
    green = (np.abs(yy - (0.3 * xx + 10)) < 4.0) & (xx > 20) & (xx < 280)
    blue = (np.abs(xx - 150) < 4) & (yy > 10) & (yy < 190)
    img[green] = (60, 160, 90)
    img[blue] = (40, 70, 170)
    img[168:192, 12:36] = (15, 15, 15)  # black mark, 192 x 192 µm: above the smallest kept piece
    img += rng.normal(0, 3, img.shape)
    thumb = np.clip(img, 0, 255).astype(np.uint8)
    return thumb, blobs, (green | blue) & ~blobs


# ------------------------------------------------------------------ automatic tissue detection
@pytest.mark.parametrize("mpp", [0.25, None])
def test_detect_tissue_finds_blobs_not_glass_or_pen(mpp: float | None) -> None:
    thumb, blobs, pen = _synthetic_thumb()
    m = detect_tissue(thumb, downsample=32.0, mpp=mpp)  # 8 µm per mask px at 0.25 µm/px
    assert m.method == "auto" and m.mask.shape == (200, 300) and m.downsample == 32.0
    inter = (m.mask & blobs).sum()
    assert inter / blobs.sum() > 0.95  # the blobs are found (pen crossing them is filled back)
    assert (m.mask & ~blobs).sum() / blobs.sum() < 0.08  # little spill
    assert (m.mask & pen).sum() < 0.05 * pen.sum()  # pen lines on glass are not tissue
    assert not m.mask[165:195, 10:40].any()  # nor the black mark
    assert 0.1 < m.fraction() < 0.3
    assert m.area_um2(0.25) == pytest.approx(m.mask.sum() * 64.0)


def test_detect_tissue_on_blank_glass_and_all_tissue() -> None:
    glass = np.full((50, 60, 3), GLASS, np.uint8)
    assert not detect_tissue(glass, 16.0, 0.5).mask.any()
    tissue = np.full((50, 60, 3), EOSIN, np.uint8)
    tissue[::3, ::3] = HEMATOXYLIN
    assert detect_tissue(tissue, 16.0, 0.5).mask.all()
    with pytest.raises(ValueError, match="uint8 RGB"):
        detect_tissue(np.zeros((5, 5), np.uint8), 2.0)


def test_auto_mask_of_a_source_uses_its_thumbnail() -> None:
    thumb, blobs, _ = _synthetic_thumb()
    big = np.repeat(np.repeat(thumb, 4, axis=0), 4, axis=1)  # 800 x 1200 px
    with open_source(big, mpp=2.0) as s:
        m = tissue_mask("auto", s)
    assert m.downsample == 1.0 and m.mask.shape == (800, 1200)
    assert m.touches(80 * 4, 90 * 4, 80 * 4 + 1, 90 * 4 + 1) and not m.touches(0, 0, 40, 40)
    assert (m.mask[::4, ::4] & blobs).sum() > 0.95 * blobs.sum()


# ------------------------------------------------------------------ box queries
def _brute_touches(mask: np.ndarray, ds: float, b: tuple[float, float, float, float]) -> bool:
    """Mask px (i, j) covers [i*ds, (i+1)*ds) x [j*ds, (j+1)*ds); the last column/row reaches on
    to (n+1)*ds (the slide's remainder)."""
    x0, y0, x1, y1 = b
    if not (x1 > x0 and y1 > y0):
        return False
    h, w = mask.shape
    for j in range(h):
        top, bottom = j * ds, (j + 2 if j == h - 1 else j + 1) * ds
        if not (y0 < bottom and y1 > top):
            continue
        for i in range(w):
            left, right = i * ds, (i + 2 if i == w - 1 else i + 1) * ds
            if mask[j, i] and x0 < right and x1 > left:
                return True
    return False


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 9), st.integers(1, 9), st.floats(1.0, 40.0), st.integers(0, 2**31 - 1),
       st.lists(st.tuples(st.floats(-1.5, 11.5), st.floats(-1.5, 11.5), st.floats(0, 6), st.floats(0, 6)),
                min_size=1, max_size=30))
def test_boxes_touching_matches_brute_force(h: int, w: int, ds: float, seed: int,
                                            raw: list[tuple[float, float, float, float]]) -> None:
    mask = np.random.default_rng(seed).random((h, w)) < 0.3
    tm = TissueMask(mask=mask, downsample=ds, method="auto")
    boxes = np.array([(x * ds, y * ds, (x + bw) * ds, (y + bh) * ds) for x, y, bw, bh in raw])
    got = tm.boxes_touching(boxes)
    want = [_brute_touches(mask, ds, tuple(b)) for b in boxes]
    assert got.tolist() == want
    assert [tm.touches(*b) for b in boxes] == want


def test_boxes_touching_many_boxes_on_a_large_mask_agrees_with_one_at_a_time() -> None:
    rng = np.random.default_rng(0)  # (speed is measured in benchmarks, not asserted here)
    tm = TissueMask(mask=rng.random((1500, 2000)) < 0.01, downsample=50.0, method="auto")
    xy = rng.random((20_000, 2)) * 100_000
    boxes = np.concatenate([xy, xy + 1024], axis=1)
    out = tm.boxes_touching(boxes)
    assert out.shape == (20_000,) and 0 < out.mean() < 1
    assert out[:200].tolist() == [tm.touches(*b) for b in boxes[:200]]


def test_full_mask(tmp_path: Path) -> None:
    with open_source(np.zeros((300, 1000, 3), np.uint8), mpp=0.5) as s:
        m = full_mask(s)
        assert TISSUE_METHODS["none"] is full_mask and tissue_mask("none", s).method == "none"
    assert m.method == "none" and m.mask.all() and m.fraction() == 1.0
    assert m.touches(999, 299, 1000, 300) and not m.touches(-10, 0, 0, 5) and not m.touches(0, 0, 0, 10)
    assert m.area_um2(0.5) == pytest.approx(1000 * 300 * 0.25, rel=0.02)


def test_load_tissue_mask(tmp_path: Path) -> None:
    src = open_source(np.zeros((400, 1000, 3), np.uint8), mpp=0.5)
    a = np.zeros((40, 100), np.uint8)
    a[10:20, 30:60] = 1  # nonzero = tissue (0/1 masks look black but count)
    Image.fromarray(a).save(tmp_path / "m.png")
    m = load_tissue_mask(tmp_path / "m.png", src)
    assert m.method == f"file:{tmp_path / 'm.png'}" and m.downsample == 10.0 and m.mask.sum() == 300
    assert m.touches(300, 100, 310, 110) and not m.touches(0, 0, 290, 99)
    assert tissue_mask(f"file:{tmp_path / 'm.png'}", src).mask.sum() == 300
    rgba = np.zeros((121, 300, 4), np.uint8)  # aspect 2.479 vs 2.5: within 1 %
    rgba[0, 0] = (255, 0, 0, 255)
    rgba[0, 1] = (255, 0, 0, 0)  # transparent: not tissue
    Image.fromarray(rgba, "RGBA").save(tmp_path / "c.png")
    c = load_tissue_mask(tmp_path / "c.png", src)
    assert c.mask.sum() == 1 and c.downsample == pytest.approx((1000 / 300 + 400 / 121) / 2)
    Image.fromarray(np.zeros((50, 100), np.uint8)).save(tmp_path / "wrong.png")
    with pytest.raises(InputError, match=r"wrong\.png: tissue mask is 100 x 50 px, aspect ratio 2\.0000, but the "
                                         r"slide is 1000 x 400 px \(2\.5000\)"):
        load_tissue_mask(tmp_path / "wrong.png", src)
    Image.fromarray(np.zeros((4, 10), np.uint8)).save(tmp_path / "empty.png")
    with pytest.warns(UserWarning, match=r"empty\.png: tissue mask is empty"):
        load_tissue_mask(tmp_path / "empty.png", src)
    (tmp_path / "junk.png").write_text("no")
    with pytest.raises(InputError, match=r"junk\.png: tissue mask is not a readable image"):
        load_tissue_mask(tmp_path / "junk.png", src)
    with pytest.raises(InputError, match=r"gone\.png: no such tissue mask file"):
        tissue_mask(str(tmp_path / "gone.png"), src)
    with pytest.raises(InputError, match="--tissue 'otsu': not one of auto, none"):
        tissue_mask("otsu", src)


# ------------------------------------------------------------------ regions of interest
def _feat(geometry: dict[str, Any], name: str | None = None, cls: str | None = None, **props: Any) -> dict[str, Any]:
    p: dict[str, Any] = {"objectType": "annotation", **props}
    if name is not None:
        p["name"] = name
    if cls is not None:
        p["classification"] = {"name": cls, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": p}


def _square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _write(path: Path, obj: Any) -> Path:
    path.write_text(json.dumps(obj))
    return path


def test_polygon_hole_multipolygon_and_names(tmp_path: Path) -> None:
    feats = [
        _feat({"type": "Polygon", "coordinates": [_square(0, 0, 100, 100), _square(40, 40, 60, 60)]}, name="ring"),
        _feat({"type": "MultiPolygon", "coordinates": [[_square(200, 0, 220, 20)], [_square(300, 0, 320, 20)]]},
              cls="Tumor"),
        _feat({"type": "Polygon", "coordinates": [_square(90, 90, 150, 150)]}),  # overlaps "ring"
    ]
    r = load_rois(_write(tmp_path / "a.geojson", {"type": "FeatureCollection", "features": feats}))
    assert r.names == ("ring", "Tumor", "roi_3") and len(r) == 3
    pts = np.array([[10, 10], [50, 50], [210, 10], [310, 10], [250, 10], [95, 95], [120, 120], [np.nan, 5]])
    assert r.contains(pts).tolist() == ["ring", "", "Tumor", "Tumor", "", "ring", "roi_3", ""]
    assert r.contains(np.zeros((0, 2))).shape == (0,)
    assert r.bounds == (0.0, 0.0, 320.0, 150.0)
    a = r.area_um2(0.5)
    assert a["ring"] == pytest.approx((100 * 100 - 20 * 20) * 0.25)
    assert a["Tumor"] == pytest.approx(2 * 400 * 0.25)
    assert a["roi_3"] == pytest.approx((60 * 60 - 10 * 10) * 0.25)  # the part "ring" does not own
    hits = r.intersects_boxes(np.array([[45, 45, 55, 55], [150, 150, 160, 160], [230, 0, 290, 30],
                                        [0, 0, 0, 10], [140, 140, 160, 160]]))
    assert hits.tolist() == [False, True, False, False, True]  # inside the hole; touching a corner counts


def test_list_single_feature_and_geometry_collection(tmp_path: Path) -> None:
    sq = {"type": "Polygon", "coordinates": [_square(0, 0, 10, 10)]}
    assert load_rois(_write(tmp_path / "l.json", [_feat(sq, name="a")])).names == ("a",)
    assert load_rois(_write(tmp_path / "f.json", _feat(sq, cls="Stroma"))).names == ("Stroma",)
    gc = {"type": "GeometryCollection", "geometries": [sq, {"type": "Point", "coordinates": [5, 5]}]}
    with pytest.warns(UserWarning, match=r"gc\.json: skipped 1 feature\(s\) .*Point in a GeometryCollection"):
        r = load_rois(_write(tmp_path / "gc.json", [_feat(gc, name="g")]))
    assert r.contains(np.array([[5.0, 5.0]])).tolist() == ["g"]


def test_points_and_lines_are_skipped_with_one_warning(tmp_path: Path) -> None:
    feats = [_feat({"type": "Polygon", "coordinates": [_square(0, 0, 10, 10)]}, name="a"),
             _feat({"type": "Point", "coordinates": [1, 1]}), _feat({"type": "Point", "coordinates": [2, 2]}),
             _feat({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}),
             {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(0, 0, 5, 5)]},
              "properties": {"objectType": "detection"}}]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        r = load_rois(_write(tmp_path / "p.geojson", feats))
    assert len(w) == 1 and "skipped 4 feature(s)" in str(w[0].message) and "Point x2" in str(w[0].message)
    assert r.names == ("a",)


def test_bad_roi_files_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "x.geojson").write_text("{not json")
    with pytest.raises(InputError, match=r"x\.geojson: not JSON"):
        load_rois(tmp_path / "x.geojson")
    with pytest.raises(InputError, match=r"y\.geojson: not GeoJSON regions"):
        load_rois(_write(tmp_path / "y.geojson", {"foo": 1}))
    with pytest.raises(InputError, match=r"pts\.geojson: no polygon region in the file \(found: Point x1\)"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_rois(_write(tmp_path / "pts.geojson", [_feat({"type": "Point", "coordinates": [1, 1]})]))
    line = {"type": "Polygon", "coordinates": [[[0, 0], [5, 5], [10, 10], [0, 0]]]}  # no area at all
    with pytest.raises(InputError, match=r"flat\.geojson: feature 0 \('flat'\): invalid polygon that cannot be "
                                         r"repaired"):
        load_rois(_write(tmp_path / "flat.geojson", [_feat(line, name="flat")]))
    with pytest.raises(InputError, match=r"gone\.geojson: no such ROI file"):
        load_rois(tmp_path / "gone.geojson")


def test_self_intersecting_polygon_is_repaired(tmp_path: Path) -> None:
    bowtie = {"type": "Polygon", "coordinates": [[[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}
    r = load_rois(_write(tmp_path / "b.geojson", [_feat(bowtie, name="bow")]))
    assert r.contains(np.array([[1.0, 5.0], [9.0, 5.0], [5.0, 1.0]])).tolist() == ["bow", "bow", ""]


def test_regions_outside_the_slide(tmp_path: Path) -> None:
    far = [_feat({"type": "Polygon", "coordinates": [_square(5000, 5000, 5100, 5100)]}, name="far")]
    p = _write(tmp_path / "far.geojson", far)
    with pytest.raises(InputError, match=r"far\.geojson: every region lies outside the slide \(1000 x 800 px"):
        load_rois(p, slide_size=(1000, 800))
    assert load_rois(p).names == ("far",)  # without a slide size nothing is checked
    part = far + [_feat({"type": "Polygon", "coordinates": [_square(900, 700, 1100, 900)]}, name="edge")]
    with pytest.warns(UserWarning, match=r"2 region\(s\) extend beyond the slide"):
        load_rois(_write(tmp_path / "part.geojson", part), slide_size=(1000, 800))


_coord = st.floats(0, 100, allow_nan=False)


@st.composite
def _regions(draw: st.DrawFn) -> list[Any]:
    out = []
    for _ in range(draw(st.integers(1, 6))):
        x, y, r = draw(_coord), draw(_coord), draw(st.floats(2, 40))
        g = Point(x, y).buffer(r, quad_segs=draw(st.integers(1, 6)))
        if draw(st.booleans()):
            g = g.difference(Point(x, y).buffer(r / 2))  # a hole
        if draw(st.booleans()):
            x2, y2 = draw(_coord), draw(_coord)
            g = shapely.MultiPolygon([g, box(x2, y2, x2 + 10, y2 + 10)]) if g.geom_type == "Polygon" and \
                not g.intersects(box(x2, y2, x2 + 10, y2 + 10)) else g
        out.append(g)
    return out


@pytest.mark.parametrize("loop_max", [32, 0])  # per-region loop and STRtree paths
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(geoms=_regions(), seed=st.integers(0, 2**31 - 1))
def test_contains_and_boxes_match_shapely_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        loop_max: int, geoms: list[Any], seed: int) -> None:
    monkeypatch.setattr(roi_mod, "_LOOP_MAX", loop_max)
    feats = [_feat(shapely.geometry.mapping(g), name=f"r{k % 3}") for k, g in enumerate(geoms)]
    r = load_rois(_write(tmp_path / "h.geojson", feats))
    rng = np.random.default_rng(seed)
    xy = rng.random((300, 2)) * 160 - 20
    xy[:20] = np.round(xy[:20])  # some points on whole numbers (boundaries of boxes)
    want = []
    for x, y in xy:
        k = next((k for k, g in enumerate(r.geoms) if g.contains(Point(x, y))), None)
        want.append("" if k is None else r.names[k])
    assert r.contains(xy).tolist() == want
    b = np.concatenate([xy[:50], xy[:50] + rng.random((50, 2)) * 30], axis=1)
    assert r.intersects_boxes(b).tolist() == [any(g.intersects(box(*bb)) for g in r.geoms) for bb in b]


def test_contains_on_many_points_covers_the_regions_area(tmp_path: Path) -> None:
    feats = [_feat(shapely.geometry.mapping(Point(5000 + 3000 * k, 5000).buffer(2000, quad_segs=64)), name=f"r{k}")
             for k in range(5)]
    r = load_rois(_write(tmp_path / "m.geojson", feats))
    xy = np.random.default_rng(0).random((200_000, 2)) * 20_000  # (speed: benchmarks, not asserted here)
    names = r.contains(xy)
    frac = (names != "").mean()
    area = float(shapely.union_all(r.geoms).area) / 20_000**2
    assert math.isclose(frac, area, rel_tol=0.02)
