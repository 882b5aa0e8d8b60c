"""The generic layout reader (dataset.yaml + images/ + points/), its writers and QuPath point files."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from denuc.core.result import NO_CLASS, Nuclei
from denuc.data.base import open_dataset
from denuc.data.geojson_points import polygon_centroid, read_geojson_points
from denuc.data.readers.generic import GenericDataset, write_dataset_yaml, write_points_csv
from denuc.errors import InputError, ResolutionError

CLASSES = ["inflammatory", "epithelial", "stromal"]


def make_generic(
    root: Path,
    points: dict[str, str] | None = None,
    cfg: dict[str, Any] | None = None,
    size: tuple[int, int] = (40, 50),
    suffix: str = ".png",
) -> Path:
    """A small generic-layout folder: one (H, W) = ``size`` image and one CSV per stem."""
    if points is None:  # the default set: a (2 nuclei, train), b (header only, test), c (empty, no split)
        points = {"a": "x,y,class\n1,2,inflammatory\n10.5,20.25,stromal\n", "b": "x,y,class\n", "c": ""}
        cfg = cfg or {"mpp": 0.5, "classes": CLASSES, "splits": {"train": ["a"], "test": ["b"]}}
    cfg = {"mpp": 0.5, "classes": CLASSES} if cfg is None else cfg
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "points").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, text in points.items():
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(root / "images" / f"{stem}{suffix}")
        if text is not None:
            (root / "points" / f"{stem}.csv").write_text(text)
    (root / "dataset.yaml").write_text(yaml.safe_dump(cfg))
    return root


# --------------------------------------------------------------------- reading
def test_open_and_read(tmp_path: Path) -> None:
    root = make_generic(tmp_path / "ds")
    ds = open_dataset(root)  # auto-detected
    assert isinstance(ds, GenericDataset) and ds.format_name == "generic"
    assert ds.classes == tuple(CLASSES) and len(ds.colors) == 3 and ds.mpp == 0.5
    assert ds.stems("train") == ["a"] and ds.stems("val") == [] and ds.stems("test") == ["b"]
    assert ds.stems(None) == ["a", "b", "c"]  # c is in no split but still listed
    assert [ds.split_of(s) for s in "abc"] == ["train", "test", None]
    s = ds.load("a")
    assert s.image.shape == (40, 50, 3) and s.split == "train" and s.mpp == 0.5
    np.testing.assert_array_equal(s.points.xy, [[1, 2], [10.5, 20.25]])
    assert s.points.classes == ["inflammatory", "stromal"]
    assert s.points.image_size == (40, 50) and s.points.name == "a" and s.points.mpp == 0.5
    for stem in "bc":  # header-only and empty point files = zero nuclei
        p = ds.points(stem)
        assert len(p) == 0 and p.class_ids is not None and p.class_names == tuple(CLASSES)


def test_class_dicts_colors_image_mpp_and_scores(tmp_path: Path) -> None:
    cfg = {
        "mpp": 0.25,
        "classes": [{"name": "tumor", "color": [255, 0, 0]}, {"name": "other"}],
        "image_mpp": {"a": 0.2},
        "name": "my set",
    }
    root = make_generic(tmp_path, {"a": "x,y,class,score\n3,4,tumor,0.75\n5,6,,0.5\n", "b": ""}, cfg)
    ds = GenericDataset(root)
    assert ds.colors[0] == (255, 0, 0) and len(ds.colors) == 2
    assert ds.mpp_of("a") == 0.2 and ds.mpp_of("b") == 0.25 and ds.points("a").mpp == 0.2
    p = ds.points("a")
    assert p.class_ids.tolist() == [0, NO_CLASS]  # type: ignore[union-attr]
    np.testing.assert_array_equal(p.scores, np.float32([0.75, 0.5]))
    assert ds.stems(None) == ["a", "b"] and ds.stems("train") == []


@pytest.mark.parametrize("suffix", [".jpg", ".jpeg", ".tif", ".tiff", ".PNG"])
def test_image_suffixes(tmp_path: Path, suffix: str) -> None:
    ds = GenericDataset(make_generic(tmp_path, {"a": ""}, suffix=suffix))
    assert ds.image_path("a").name == f"a{suffix}" and ds.load("a").image.shape == (40, 50, 3)


# ------------------------------------------------------------------ validation
def _cfg(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"mpp": 0.5, "classes": CLASSES}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize(
    "cfg, err, match",
    [
        (_cfg(mpp=None), ResolutionError, r"dataset\.yaml: resolution .* unknown"),
        (_cfg(mpp=40), ResolutionError, r"dataset\.yaml: mpp=40 .* magnification"),
        (_cfg(mpp="fast"), ResolutionError, r"dataset\.yaml: mpp must be a number"),
        (_cfg(classes=None), InputError, r"dataset\.yaml: 'classes' must be a non-empty list"),
        (_cfg(classes=["a", "b", "a"]), InputError, r"dataset\.yaml: duplicate class name\(s\) \['a'\]"),
        (_cfg(classes=[{"name": "a"}, {"name": "a", "color": [1, 2, 3]}]), InputError, "duplicate class name"),
        (_cfg(classes=["a", ""]), InputError, "must be non-empty text"),
        (_cfg(classes=["a,b"]), InputError, "without commas"),
        (_cfg(classes=[{"name": "a", "color": [300, 0, 0]}]), InputError, r"class 'a': a colour must be"),
        (_cfg(classes=[{"color": [1, 2, 3]}]), InputError, "has no 'name'"),
        (_cfg(splits={"train": ["a", "zzz"]}), InputError, r"splits: split\(s\) name 1 image\(s\) .* \['zzz'\]"),
        (_cfg(splits={"training": ["a"]}), InputError, r"unknown split name\(s\) \['training'\]"),
        (_cfg(splits={"train": ["a"], "test": ["a"]}), InputError, "'a' is listed in both"),
        (_cfg(splits={"train": ["a", "a"]}), InputError, "'a' is listed twice"),
        (_cfg(splits={"train": "a"}), InputError, "must be a list of image stems"),
        (_cfg(splits={"train": [1]}), InputError, "quote such stems"),
        (_cfg(image_mpp={"zzz": 0.5}), InputError, "image_mpp names 'zzz'"),
        (_cfg(image_mpp={"a": 100}), ResolutionError, "image_mpp of 'a'"),
    ],
)
def test_bad_yaml_content(tmp_path: Path, cfg: dict[str, Any], err: type[Exception], match: str) -> None:
    root = make_generic(tmp_path, {"a": ""}, cfg)
    with pytest.raises(err, match=match):
        GenericDataset(root)


def test_split_entries_may_carry_the_image_suffix(tmp_path: Path) -> None:
    ds = GenericDataset(make_generic(tmp_path, {"a": "", "b": ""}, _cfg(splits={"train": ["a.png"], "val": ["b"]})))
    assert ds.stems("train") == ["a"] and ds.stems("val") == ["b"]


def test_yaml_file_problems(tmp_path: Path) -> None:
    root = make_generic(tmp_path, {"a": ""})
    (root / "dataset.yaml").write_text("mpp: [0.5\n")
    with pytest.raises(InputError, match=r"dataset\.yaml: not valid YAML"):
        GenericDataset(root)
    (root / "dataset.yaml").write_text("- 0.5\n")
    with pytest.raises(InputError, match=r"dataset\.yaml: must be a YAML mapping"):
        GenericDataset(root)
    (root / "dataset.yaml").unlink()
    with pytest.raises(InputError, match=r"dataset\.yaml: missing"):
        GenericDataset(root)
    with pytest.raises(InputError, match="not a recognised dataset folder"):
        open_dataset(root)


def test_unknown_yaml_keys_warn(tmp_path: Path) -> None:
    root = make_generic(tmp_path, {"a": ""}, _cfg(split={"train": ["a"]}))
    with pytest.warns(UserWarning, match=r"unknown key\(s\) \['split'\]"):
        GenericDataset(root)


def test_missing_and_duplicate_files(tmp_path: Path) -> None:
    root = make_generic(tmp_path / "m", {"a": "", "b": None})
    with pytest.raises(InputError, match=r"points: no point file .* 1 image\(s\): \['b'\]; write an empty file"):
        GenericDataset(root)

    root = make_generic(tmp_path / "d", {"a": ""})
    Image.new("RGB", (4, 4)).save(root / "images" / "a.jpg")
    with pytest.raises(InputError, match=r"two image files for 'a': a\.jpg and a\.png"):
        GenericDataset(root)

    root = make_generic(tmp_path / "p", {"a": ""})
    (root / "points" / "a.geojson").write_text("[]")
    with pytest.raises(InputError, match="two point files for 'a'"):
        GenericDataset(root)

    root = make_generic(tmp_path / "o", {"a": ""})
    (root / "points" / "ghost.csv").write_text("")
    with pytest.warns(UserWarning, match=r"ignoring 1 point file\(s\) without an image, e\.g\. ghost\.csv"):
        assert GenericDataset(root).stems() == ["a"]

    root = make_generic(tmp_path / "e", {})
    with pytest.raises(InputError, match="no images"):
        GenericDataset(root)


def test_unknown_class_in_csv_names_file_and_class(tmp_path: Path) -> None:
    ds = GenericDataset(make_generic(tmp_path, {"a": "x,y,class\n1,1,neutrophil\n"}))
    with pytest.raises(InputError, match=r"a\.csv: unknown class name\(s\) \['neutrophil'\]"):
        ds.points("a")


def test_points_outside_the_image(tmp_path: Path) -> None:
    root = make_generic(tmp_path, {"a": "x,y,class\n1,1,stromal\n50,3,stromal\n3,-0.5,stromal\n"})
    with pytest.raises(InputError, match=r"2 point\(s\) of 'a' lie outside the 50x40 image"):
        GenericDataset(root).points("a")
    with pytest.warns(UserWarning, match="dropped"):
        p = GenericDataset(root, outside="drop").points("a")
    np.testing.assert_array_equal(p.xy, [[1, 1]])


def test_unreadable_image(tmp_path: Path) -> None:
    root = make_generic(tmp_path, {"a": ""})
    (root / "images" / "a.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(InputError, match=r"a\.png: not a readable image"):
        GenericDataset(root).load("a")


# -------------------------------------------------------------- QuPath GeoJSON
def _feature(geom: dict[str, Any], name: str | None = None, **props: Any) -> dict[str, Any]:
    p: dict[str, Any] = dict(props)
    if name is not None:
        p["classification"] = {"name": name, "color": [1, 2, 3]}
    return {"type": "Feature", "geometry": geom, "properties": p}


def test_qupath_geojson_points(tmp_path: Path) -> None:
    feats = [
        _feature({"type": "Point", "coordinates": [1.5, 2.5]}, "epithelial", objectType="detection",
                 measurements={"Detection score": 0.25}),
        _feature({"type": "MultiPoint", "coordinates": [[3, 4], [5, 6]]}, "stromal", objectType="annotation",
                 measurements=[{"name": "Detection score", "value": 0.5}]),
        _feature({"type": "Polygon", "coordinates": [[[10, 10], [14, 10], [14, 12], [10, 12], [10, 10]]]},
                 "inflammatory", objectType="cell", measurements={"Detection score": 1.0}),
    ]
    root = make_generic(tmp_path, {"a": None, "b": None})
    (root / "points" / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    (root / "points" / "b.geojson.gz").write_bytes(gzip.compress(json.dumps(feats).encode()))  # bare list, gzip
    ds = GenericDataset(root)
    for stem in "ab":
        p = ds.points(stem)
        np.testing.assert_allclose(p.xy, [[1.5, 2.5], [3, 4], [5, 6], [12, 11]])
        assert p.classes == ["epithelial", "stromal", "stromal", "inflammatory"]
        np.testing.assert_array_equal(p.scores, np.float32([0.25, 0.5, 0.5, 1.0]))


def test_qupath_geojson_unclassified_and_errors(tmp_path: Path) -> None:
    root = make_generic(tmp_path, {"a": None})
    path = root / "points" / "a.geojson"

    def write(feats: Any) -> GenericDataset:
        path.write_text(json.dumps(feats))
        return GenericDataset(root)

    p = write([_feature({"type": "Point", "coordinates": [1, 1]}), _feature({"type": "Point", "coordinates": [2, 2]},
                                                                            "stromal")]).points("a")
    assert p.class_ids.tolist() == [NO_CLASS, 2] and p.scores is None  # type: ignore[union-attr]
    assert len(write({"type": "FeatureCollection", "features": []}).points("a")) == 0
    path.write_text("")
    assert len(GenericDataset(root).points("a")) == 0
    with pytest.raises(InputError, match=r"a\.geojson: unknown class name\(s\) \['Tumor'\]"):
        write([_feature({"type": "Point", "coordinates": [1, 1]}, "Tumor")]).points("a")
    # a small unclassified polygon is a nucleus outline of unknown class (large ones are regions, skipped)
    small = write([_feature({"type": "Polygon", "coordinates": [[[0, 0], [9, 0], [9, 9], [0, 0]]]})]).points("a")
    assert small.class_ids.tolist() == [NO_CLASS]  # type: ignore[union-attr]
    with pytest.raises(InputError, match=r"feature 0: objectType 'tile'"):
        write([_feature({"type": "Point", "coordinates": [1, 1]}, "stromal", objectType="tile")]).points("a")
    with pytest.raises(InputError, match=r"feature 0: unsupported geometry type 'LineString'"):
        write([_feature({"type": "LineString", "coordinates": [[1, 1], [2, 2]]}, "stromal")]).points("a")
    with pytest.raises(InputError, match=r"a\.geojson: expected a GeoJSON FeatureCollection"):
        write({"type": "Point", "coordinates": [1, 1]}).points("a")
    with pytest.raises(InputError, match=r"feature 0 is not a GeoJSON Feature"):
        write([{"type": "Feature"}]).points("a")
    path.write_text("{not json")
    with pytest.raises(InputError, match=r"a\.geojson: not valid JSON"):
        GenericDataset(root).points("a")


def test_geojson_derived_class_names(tmp_path: Path) -> None:
    f = tmp_path / "p.geojson"
    f.write_text(json.dumps([{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2, 0]},
                              "properties": {"classification": {"names": ["Tumor", "Positive"]}}}]))
    g = read_geojson_points(f)
    assert g.names == ["Tumor: Positive"] and g.xy.tolist() == [[1.0, 2.0]]


# ------------------------------------------------------------ polygon centroids
def test_polygon_centroid_known_shapes() -> None:
    square = [[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]
    np.testing.assert_allclose(polygon_centroid([[square]]), [2, 2])
    np.testing.assert_allclose(polygon_centroid([[square[::-1]]]), [2, 2])  # orientation does not matter
    np.testing.assert_allclose(polygon_centroid([[[[0, 0], [3, 0], [0, 3]]]]), [1, 1])  # open ring, triangle
    hole = [[2, 0], [4, 0], [4, 4], [2, 4], [2, 0]]  # removing the right half leaves the left half
    np.testing.assert_allclose(polygon_centroid([[square, hole]]), [1, 2])
    big = [[10, 0], [14, 0], [14, 8], [10, 8], [10, 0]]  # area 32 vs 16: weights 1/3, 2/3
    np.testing.assert_allclose(polygon_centroid([[square], [big]]), [(2 * 16 + 12 * 32) / 48, (2 * 16 + 4 * 32) / 48])
    np.testing.assert_allclose(polygon_centroid([[[[1, 1], [3, 3], [1, 1]]]]), [2, 2])  # degenerate: vertex mean


@settings(max_examples=100, deadline=None)
@given(
    pts=st.lists(st.tuples(st.floats(-50, 50), st.floats(-50, 50)), min_size=3, max_size=8),
    t=st.tuples(st.floats(-1e5, 1e5), st.floats(-1e5, 1e5)),
)
def test_polygon_centroid_moves_with_translation(pts: list[tuple[float, float]], t: tuple[float, float]) -> None:
    ring = np.array(pts)
    x, y = ring[:, 0], ring[:, 1]
    area = abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2
    w, h = np.ptp(ring, axis=0)
    assume(area > 1e-2 and area > 1e-3 * w * h)  # well-conditioned polygons (degenerate ones: see above)
    shifted = ring + np.array(t)
    np.testing.assert_allclose(polygon_centroid([[shifted]]), polygon_centroid([[ring]]) + t, atol=1e-6)


# ---------------------------------------------------------------------- writers
def test_writers_build_a_readable_layout(tmp_path: Path) -> None:
    root = tmp_path / "new"
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (30, 20)).save(root / "images" / "001.png")
    Image.new("RGB", (30, 20)).save(root / "images" / "002.png")
    n = Nuclei([[1.25, 2.5], [29.5, 19.75]], scores=[0.5, 0.9], class_ids=[1, 0], class_names=("b", "a"))
    write_points_csv(n, root / "points" / "001.csv", classes=("a", "b"))
    write_points_csv(Nuclei.empty(("a", "b")), root / "points" / "002.csv")
    write_dataset_yaml(root, 0.25, ["a", "b"], colors=[(1, 2, 3), (4, 5, 6)],
                       splits={"train": ["001"], "val": [], "test": ["002"]}, image_mpp={"002": 0.5},
                       info={"name": "tiny"})
    ds = open_dataset(root)
    assert ds.classes == ("a", "b") and ds.colors == ((1, 2, 3), (4, 5, 6)) and ds.mpp == 0.25
    assert ds.stems("train") == ["001"] and ds.stems("test") == ["002"] and ds.mpp_of("002") == 0.5
    p = ds.points("001")
    np.testing.assert_array_equal(p.xy, n.xy)
    assert p.classes == n.classes == ["a", "b"]
    np.testing.assert_array_equal(p.scores, n.scores)
    assert len(ds.points("002")) == 0
    with pytest.raises(InputError, match="duplicate class name"):
        write_dataset_yaml(tmp_path / "x", 0.5, ["a", "a"])
    with pytest.raises(ResolutionError):
        write_dataset_yaml(tmp_path / "x", 40, ["a"])
    with pytest.raises(InputError, match="'c' is not one of"):
        write_points_csv(Nuclei([[0, 0]], class_ids=[0], class_names=("c",)), tmp_path / "x.csv", ("a", "b"))
