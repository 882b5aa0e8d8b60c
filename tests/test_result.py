"""The Nuclei result type: construction checks, select/concat, rescale, CSV/npz/pandas round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from denuc.core.result import NO_CLASS, Nuclei
from denuc.errors import InputError, ResolutionError

CLASSES = ("lymphocyte", "tumor", "stromal")


def _full(n: int = 5, seed: int = 0) -> Nuclei:
    rng = np.random.default_rng(seed)
    probs = rng.random((n, 3)).astype(np.float32)
    probs /= probs.sum(1, keepdims=True)
    ids = rng.integers(-1, 3, n)
    return Nuclei(rng.random((n, 2)) * 1000, rng.random(n), ids, CLASSES, probs, 0.5, (1000, 1200), "img")


def _assert_same(a: Nuclei, b: Nuclei) -> None:
    np.testing.assert_array_equal(a.xy, b.xy)
    for k in ("scores", "class_ids", "probs"):
        va, vb = getattr(a, k), getattr(b, k)
        assert (va is None) == (vb is None), k
        if va is not None:
            np.testing.assert_array_equal(va, vb, err_msg=k)
    assert a.class_names == b.class_names


# ---------------------------------------------------------------- construction
def test_types_are_normalised() -> None:
    n = Nuclei([[1, 2], [3, 4]], scores=[0.5, 1], class_ids=[0, 1], class_names=["a", "b"])
    assert n.xy.dtype == np.float64 and n.xy.shape == (2, 2)
    assert n.scores is not None and n.scores.dtype == np.float32
    assert n.class_ids is not None and n.class_ids.dtype == np.int64
    assert n.class_names == ("a", "b")
    assert n.classes == ["a", "b"]
    assert list(n.x) == [1, 3] and list(n.y) == [2, 4]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"xy": np.zeros((3, 3))}, r"\(N, 2\)"),
        ({"xy": np.zeros(4)}, r"\(N, 2\)"),
        ({"xy": [[0.0, np.nan]]}, "NaN"),
        ({"xy": [[0.0, np.inf]]}, "NaN or infinite"),
        ({"xy": np.zeros((2, 2)), "scores": [1.0]}, "1 scores for 2 points"),
        ({"xy": np.zeros((2, 2)), "class_ids": [0, 0, 0], "class_names": ("a",)}, "3 class ids"),
        ({"xy": np.zeros((2, 2)), "class_ids": [0, 1], "class_names": ("a",)}, r"\[-1, 0\]"),
        ({"xy": np.zeros((2, 2)), "class_ids": [0, -2], "class_names": ("a",)}, r"\[-1, 0\]"),
        ({"xy": np.zeros((2, 2)), "probs": np.zeros((2, 3)), "class_names": ("a", "b")}, r"probs must be \(2, 2\)"),
        ({"xy": np.zeros((2, 2)), "probs": np.zeros((0,)), "class_names": ("a", "b")}, r"probs must be \(2, 2\)"),
        ({"xy": np.zeros((1, 2)), "mpp": 0.0}, "positive"),
        ({"xy": np.zeros((1, 2)), "mpp": float("nan")}, "positive"),
    ],
)
def test_bad_shapes_and_values_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=match):
        Nuclei(**kwargs)


def test_empty() -> None:
    e = Nuclei.empty(CLASSES, mpp=0.5)
    assert len(e) == 0 and e.xy.shape == (0, 2) and e.class_names == CLASSES and e.mpp == 0.5
    assert Nuclei([], probs=np.zeros((0, 3)), class_names=CLASSES).probs.shape == (0, 3)  # type: ignore[union-attr]


def test_classes_of_unclassified_points_are_empty_strings() -> None:
    n = Nuclei([[0, 0], [1, 1]], class_ids=[NO_CLASS, 1], class_names=("a", "b"))
    assert n.classes == ["", "b"]
    assert Nuclei([[0, 0]]).classes == [""]


# ------------------------------------------------------------- select / concat
def test_select_mask_and_index() -> None:
    n = _full(6)
    mask = np.array([True, False, True, False, False, True])
    s = n.select(mask)
    assert len(s) == 3
    np.testing.assert_array_equal(s.xy, n.xy[mask])
    np.testing.assert_array_equal(s.probs, n.probs[mask])  # type: ignore[index]
    assert (s.mpp, s.image_size, s.name, s.class_names) == (n.mpp, n.image_size, n.name, n.class_names)
    t = n.select([5, 0])
    np.testing.assert_array_equal(t.scores, n.scores[[5, 0]])  # type: ignore[index]
    np.testing.assert_array_equal(t.class_ids, n.class_ids[[5, 0]])  # type: ignore[index]


def test_concat_round_trips_a_split() -> None:
    n = _full(7)
    parts = [n.select(slice(0, 3)), n.select(slice(3, 3)), n.select(slice(3, 7))]
    _assert_same(Nuclei.concat(parts), n)
    assert len(Nuclei.concat([])) == 0


def test_concat_accepts_bare_empty_parts() -> None:
    n = _full(4)
    out = Nuclei.concat([Nuclei.empty(CLASSES, mpp=0.5), n])
    _assert_same(out, n)


def test_concat_rejects_mismatches() -> None:
    a = _full(3)
    with pytest.raises(InputError, match="different class names"):
        Nuclei.concat([a, Nuclei([[0, 0]], class_ids=[0], class_names=("x",), mpp=0.5)])
    with pytest.raises(InputError, match="different mpp"):
        Nuclei.concat([a, Nuclei([[0, 0]], class_ids=[0], class_names=CLASSES, mpp=0.25)])
    with pytest.raises(InputError, match="only some have scores"):
        Nuclei.concat([a, Nuclei([[0, 0]], class_ids=[0], class_names=CLASSES, probs=np.ones((1, 3)), mpp=0.5)])


def test_with_classes_reorders_ids() -> None:
    n = Nuclei([[0, 0], [1, 1], [2, 2]], class_ids=[0, 2, -1], class_names=("a", "b", "c"))
    m = n.with_classes(("c", "a", "b", "d"))
    assert m.classes == ["a", "c", ""]
    with pytest.raises(InputError, match="'b' is not one of"):
        n.with_classes(("a", "c"))


# --------------------------------------------------------------- geometry
def test_rescale_scales_coordinates_and_size() -> None:
    n = Nuclei([[10.0, 20.0], [0.5, 0.25]], mpp=0.5, image_size=(100, 80))
    r = n.rescale(0.25)
    np.testing.assert_array_equal(r.xy, n.xy * 2)
    assert r.mpp == 0.25 and r.image_size == (200, 160)
    with pytest.raises(ResolutionError, match="mpp is unknown"):
        Nuclei([[0, 0]]).rescale(0.5)
    for bad in (0, -0.5, float("nan"), float("inf"), None, "x", True):
        with pytest.raises(ResolutionError, match="target mpp"):
            n.rescale(bad)  # type: ignore[arg-type]


def test_rescaled_image_size_is_the_resampled_images() -> None:
    """Odd sizes: the same floor rule as denuc.data.resample (103 px at 0.25 -> 51 px at 0.5)."""
    from denuc.data.resample import resample, resample_factor

    for h, w, src, dst in ((103, 77, 0.25, 0.5), (1, 9, 0.25, 1.0), (98, 99, 0.5, 0.3)):
        img = np.zeros((h, w, 3), np.uint8)
        size = Nuclei([[0.0, 0.0]], mpp=src, image_size=(h, w)).rescale(dst).image_size
        assert size == resample(img, resample_factor(src, dst)).shape[:2]


@settings(max_examples=200, deadline=None)
@given(
    xy=st.lists(
        st.tuples(st.floats(0, 2e5, allow_nan=False), st.floats(0, 2e5, allow_nan=False)), min_size=0, max_size=20
    ),
    src=st.floats(0.05, 20.0),
    dst=st.floats(0.05, 20.0),
)
def test_rescale_there_and_back_is_the_identity(xy: list[tuple[float, float]], src: float, dst: float) -> None:
    n = Nuclei(np.array(xy, dtype=np.float64).reshape(-1, 2), mpp=src)
    back = n.rescale(dst).rescale(src)
    assert back.mpp == src
    # exact scale up to float rounding: a few ulps of the largest coordinate
    np.testing.assert_allclose(back.xy, n.xy, rtol=1e-12, atol=1e-9)


def test_shift_and_inside() -> None:
    n = Nuclei([[0.0, 0.0], [9.99, 4.0], [10.0, 1.0], [-0.01, 2.0], [3.0, 5.0]])
    assert n.inside(5, 10).tolist() == [True, True, False, False, False]
    s = n.shift(2.0, -1.0)
    np.testing.assert_array_equal(s.xy, n.xy + [2.0, -1.0])
    np.testing.assert_array_equal(n.xy[0], [0.0, 0.0])  # original untouched


# ----------------------------------------------------------- persistence
def test_csv_round_trip_is_lossless(tmp_path: Path) -> None:
    n = _full(9)
    n.xy[0] = [123456.789012345, 0.1 + 0.2]  # many significant digits (slide-sized coordinates)
    p = n.to_csv(tmp_path / "sub" / "pts.csv")
    assert p.read_text().splitlines()[0] == "x,y,x_um,y_um,class,score,prob_lymphocyte,prob_tumor,prob_stromal"
    back = Nuclei.read_csv(p, CLASSES, mpp=0.5)
    _assert_same(back, n)
    assert Nuclei.read_csv(p, CLASSES).mpp == 0.5  # mpp comes back from x_um / x
    assert back.mpp == 0.5 and back.name == "pts"
    assert not list((tmp_path / "sub").glob("*.tmp"))  # atomic write leaves no temp file


def test_csv_without_class_names_takes_the_vocabulary_from_the_prob_columns(tmp_path: Path) -> None:
    """predict output where a class got no point: all probability columns still come back."""
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], np.float32)
    n = Nuclei([[1.5, 2.25], [3.0, 4.0]], np.array([0.9, 0.8], np.float32), np.array([0, 1]),
               ("lymphocyte", "tumor", "stromal"), probs)
    back = Nuclei.read_csv(n.to_csv(tmp_path / "p.csv"))
    assert back.class_names == ("lymphocyte", "tumor", "stromal") and back.classes == ["lymphocyte", "tumor"]
    np.testing.assert_array_equal(back.probs, probs)


def test_csv_unclassified_points_round_trip(tmp_path: Path) -> None:
    n = Nuclei([[1, 2], [3, 4]], class_ids=[0, NO_CLASS], class_names=("a", "b"))
    p = n.to_csv(tmp_path / "p.csv")
    assert Nuclei.read_csv(p, ("a", "b")).class_ids.tolist() == [0, NO_CLASS]  # type: ignore[union-attr]
    inferred = Nuclei.read_csv(p)
    assert inferred.class_names == ("a",) and inferred.classes == ["a", ""]
    plain = Nuclei([[1, 2]]).to_csv(tmp_path / "q.csv")  # no classes at all: empty class column
    assert Nuclei.read_csv(plain).classes == [""]


def test_csv_empty_and_header_only_mean_zero_nuclei(tmp_path: Path) -> None:
    (tmp_path / "e.csv").write_text("")
    (tmp_path / "h.csv").write_text("x,y,class\n")
    for f in ("e.csv", "h.csv"):
        assert len(Nuclei.read_csv(tmp_path / f, CLASSES)) == 0


def test_csv_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y,class\n1,2,neutrophil\n")
    with pytest.raises(InputError, match=r"bad\.csv: unknown class name\(s\) \['neutrophil'\]"):
        Nuclei.read_csv(bad, CLASSES)
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match=r"bad\.csv: missing column\(s\) \['x', 'y'\]"):
        Nuclei.read_csv(bad)
    bad.write_text("x,y\n1,\n")
    with pytest.raises(InputError, match=r"bad\.csv: x/y contain NaN"):
        Nuclei.read_csv(bad)
    bad.write_text("x,y\n1,abc\n")
    with pytest.raises(InputError, match=r"bad\.csv: x/y must be numbers"):
        Nuclei.read_csv(bad)
    with pytest.raises(InputError, match=r"nope\.csv: no such point file"):
        Nuclei.read_csv(tmp_path / "nope.csv")


def test_npz_round_trip(tmp_path: Path) -> None:
    n = _full(11)
    back = Nuclei.load(n.save(tmp_path / "n.npz"))
    _assert_same(back, n)
    assert (back.mpp, back.image_size, back.name) == (n.mpp, n.image_size, n.name)
    bare = Nuclei.load(Nuclei([[1.0, 2.0]]).save(tmp_path / "b.npz"))
    assert bare.scores is None and bare.class_ids is None and bare.mpp is None and bare.image_size is None


def test_pandas_round_trip() -> None:
    n = _full(8)
    df = n.to_pandas()
    assert list(df.columns[:4]) == ["x", "y", "class", "score"]
    _assert_same(Nuclei.from_pandas(df, CLASSES), n)


def test_portable_meta_cuts_local_paths_to_names() -> None:
    from denuc.core.files import portable_meta

    meta = {"datasets": ["/home/me/data/brca-m2c", "rel/ocelot"], "val_f1": 0.9,
            "train": {"out": "/tmp/runs/x", "init": "", "dataset": "C:/data/puma", "lr": 1e-3,
                      "nested": [{"source_checkpoint": "/a/b/best.safetensors"}]}}
    out = portable_meta(meta)
    assert out == {"datasets": ["brca-m2c", "ocelot"], "val_f1": 0.9,
                   "train": {"out": "x", "init": "", "dataset": "puma", "lr": 1e-3,
                             "nested": [{"source_checkpoint": "b/best.safetensors"}]}}
    assert meta["datasets"][0] == "/home/me/data/brca-m2c"  # input untouched
    assert portable_meta({"init": "C:\\runs\\det\\best.safetensors", "out": "/"}) == {
        "init": "det/best.safetensors", "out": ""}
