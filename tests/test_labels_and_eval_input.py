"""QuPath cells and region annotations in GeoJSON labels; class-agnostic predictions in evaluate."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from denuc.core.result import NO_CLASS, Nuclei
from denuc.data.geojson_points import (
    REGION_AREA_PX2_DEFAULT,
    REGION_AREA_UM2,
    read_geojson_points,
    region_area_px2,
)
from denuc.data.readers.generic import GenericDataset, geojson_to_nuclei
from denuc.errors import InputError
from denuc.evaluate import evaluate
from denuc.evaluate.matching import match

CLASSES = ["tumor", "lymphocyte"]


def _square(x0: float, y0: float, side: float) -> dict[str, Any]:
    return {"type": "Polygon", "coordinates": [[[x0, y0], [x0 + side, y0], [x0 + side, y0 + side],
                                                [x0, y0 + side], [x0, y0]]]}


def _feature(geom: dict[str, Any], name: str | None = None, **top: Any) -> dict[str, Any]:
    props: dict[str, Any] = {"objectType": top.pop("objectType", "annotation")}
    if name is not None:
        props["classification"] = {"name": name, "color": [200, 0, 0]}
    return {"type": "Feature", "geometry": geom, "properties": props, **top}


def _dataset(root: Path, feats: list[dict[str, Any]], mpp: float = 0.5, size: int = 200) -> GenericDataset:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "points").mkdir(exist_ok=True)
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(root / "images" / "a.png")
    (root / "points" / "a.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    (root / "dataset.yaml").write_text(yaml.safe_dump({"mpp": mpp, "classes": CLASSES}))
    return GenericDataset(root)


# ------------------------------------------------------------ 1. QuPath cell objects
def test_qupath_cell_uses_the_nucleus_geometry(tmp_path: Path) -> None:
    cell = _feature({"type": "Polygon", "coordinates": [[[40, 40], [80, 40], [80, 60], [40, 60], [40, 40]]]},
                    "tumor", objectType="cell", nucleusGeometry=_square(42, 42, 8))
    detection = _feature(_square(100, 100, 6), "lymphocyte", objectType="detection")  # StarDist-style outline
    ds = _dataset(tmp_path, [cell, detection])
    p = ds.points("a")
    np.testing.assert_allclose(p.xy, [[46, 46], [103, 103]])  # nucleus centre, not the cell's (60, 50)
    assert p.classes == ["tumor", "lymphocyte"]
    g = read_geojson_points(tmp_path / "points" / "a.geojson")
    np.testing.assert_allclose(g.area, [64.0, 36.0])  # the nucleus polygon's area, not the cell's
    cell["nucleusGeometry"] = None  # null = no nucleus geometry: the cell outline's centroid
    np.testing.assert_allclose(_dataset(tmp_path, [cell]).points("a").xy, [[60, 50]])
    cell["nucleusGeometry"] = "oops"
    with pytest.raises(InputError, match=r"feature 0: 'nucleusGeometry' must be"):
        _dataset(tmp_path, [cell]).points("a")


# ------------------------------------------------------------ 2. region annotations
def test_region_annotations_are_skipped_with_one_warning(tmp_path: Path) -> None:
    feats = [
        _feature(_square(0, 0, 180), "Tumor"),  # a classified QuPath region; class not in the vocabulary
        _feature(_square(10, 150, 45), "Stroma"),  # 2025 px² = 506 µm² at 0.5 µm/px: a region
        _feature({"type": "MultiPoint", "coordinates": [[10, 20], [30, 40]]}, "lymphocyte"),
        _feature(_square(60, 60, 40), "tumor", objectType="detection"),  # 1600 px² = 400 µm²: still a nucleus
    ]
    with pytest.warns(UserWarning, match=r"a\.geojson: skipped 2 polygon\(s\) larger than 1600 px² "
                                         r"\(400 µm² at 0.5 µm/px\).*\['Stroma', 'Tumor'\]") as rec:
        p = _dataset(tmp_path, feats).points("a")
    assert sum("skipped" in str(w.message) for w in rec) == 1
    np.testing.assert_allclose(p.xy, [[10, 20], [30, 40], [80, 80]])
    assert p.classes == ["lymphocyte", "lymphocyte", "tumor"]
    # the bound is physical: at 0.25 µm/px the 45 px square is 127 µm², a nucleus (and 'Stroma' is unknown)
    with pytest.raises(InputError, match=r"unknown class name\(s\) \['Stroma'\]"), \
            pytest.warns(UserWarning, match="skipped 1 polygon"):
        _dataset(tmp_path / "fine", feats, mpp=0.25).points("a")
    assert region_area_px2(0.5) == REGION_AREA_UM2 / 0.25 and region_area_px2(None) == REGION_AREA_PX2_DEFAULT


def test_unclassified_polygons_follow_the_same_size_rule(tmp_path: Path) -> None:
    feats = [
        _feature(_square(0, 0, 150)),  # an unclassified region outline (e.g. the labelled area)
        _feature(_square(20, 20, 8), objectType="detection"),  # an unclassified nucleus outline
        _feature({"type": "Point", "coordinates": [5, 5]}, "tumor"),
    ]
    with pytest.warns(UserWarning, match=r"skipped 1 polygon.*\['\(unclassified\)'\]"):
        p = _dataset(tmp_path, feats).points("a")
    np.testing.assert_allclose(p.xy, [[24, 24], [5, 5]])
    assert p.class_ids.tolist() == [NO_CLASS, 0]  # type: ignore[union-attr]
    # without an mpp (direct call) the px default applies: 6400 px² (400 µm² at 0.25 µm/px)
    feats[0] = _feature(_square(0, 0, 79))  # 6241 px²: kept at unknown mpp
    path = tmp_path / "points" / "a.geojson"
    path.write_text(json.dumps(feats))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(geojson_to_nuclei(path, CLASSES)) == 3
    feats[0] = _feature(_square(0, 0, 81))  # 6561 px²: a region
    path.write_text(json.dumps(feats))
    with pytest.warns(UserWarning, match="mpp unknown"):
        n = len(geojson_to_nuclei(path, CLASSES))
    assert n == 2


# ------------------------------------------------------------ 3. class-agnostic predictions
def _gt(root: Path) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "points").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "images" / "s1.png")
    (root / "points" / "s1.csv").write_text("x,y,class\n5,5,tumor\n20,20,lymphocyte\n30,10,tumor\n")
    (root / "dataset.yaml").write_text(yaml.safe_dump({"mpp": 0.5, "classes": CLASSES}))
    return root


def test_detect_output_scores_detection_against_a_classified_gt(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from denuc.detect.model import DetectorConfig
    from denuc.evaluate import cli

    assert DetectorConfig().class_names == ("nucleus",)  # the name denuc detect writes
    gt = _gt(tmp_path / "gt")
    det = tmp_path / "det"
    det.mkdir()
    (det / "s1.csv").write_text("x,y,class,score\n5,6,nucleus,0.9\n20,20,nucleus,0.8\n38,38,nucleus,0.4\n")
    rep = evaluate(gt, det, radius_px=3.0)
    assert (rep.detection.tp, rep.detection.n_pred, rep.detection.n_gt) == (2, 3, 3)
    assert rep.class_agnostic and rep.to_dict()["class_agnostic"] is True
    assert rep.classes["tumor"].n_pred == 0 and rep.classes["tumor"].n_gt == 2
    assert "n/a" in rep.table() and "class-agnostic" in rep.table()
    # the same as a file without a class column
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "s1.csv").write_text("x,y,score\n5,6,0.9\n20,20,0.8\n38,38,0.4\n")
    assert evaluate(gt, plain, radius_px=3.0).to_dict() == rep.to_dict()
    # the CLI (denuc evaluate GT --pred DET)
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    assert cli.main(parser.parse_args([str(gt), "--pred", str(det), "--radius-px", "3"])) == 0
    out = capsys.readouterr().out
    assert "detection" in out and "n/a" in out
    # a mapping of Detector-style Nuclei works the same way
    pred = Nuclei(np.array([[5.0, 6.0], [20, 20], [38, 38]]), np.float32([0.9, 0.8, 0.4]),
                  np.zeros(3, np.int64), ("nucleus",), mpp=0.5)
    gmap = {"s1": GenericDataset(gt).points("s1")}
    assert evaluate(gmap, {"s1": pred}, radius_px=3.0).detection.tp == 2
    # classified predictions are still classified
    (det / "s1.csv").write_text("x,y,class\n5,6,tumor\n20,20,lymphocyte\n")
    rep2 = evaluate(gt, det, radius_px=3.0)
    assert not rep2.class_agnostic and rep2.classes["tumor"].tp == 1 and "n/a" not in rep2.table()


def test_nucleus_mixed_with_classes_or_unknown_names_is_an_error(tmp_path: Path) -> None:
    gt = _gt(tmp_path / "gt")
    det = tmp_path / "det"
    det.mkdir()
    (det / "s1.csv").write_text("x,y,class\n5,6,nucleus\n20,20,tumor\n")
    with pytest.raises(InputError, match=r"s1\.csv: mixes the class-agnostic name 'nucleus'.*\['tumor'\]"):
        evaluate(gt, det, radius_px=3.0)
    (det / "s1.csv").write_text("x,y,class\n5,6,nucleus\n20,20,zebra\n")
    with pytest.raises(InputError, match=r"s1\.csv: unknown class name\(s\) \['nucleus', 'zebra'\]"):
        evaluate(gt, det, radius_px=3.0)
    mixed = Nuclei(np.array([[5.0, 6.0], [20, 20]]), None, np.array([0, 1]), ("nucleus", "tumor"), mpp=0.5)
    with pytest.raises(InputError, match="mixes the class-agnostic name"):
        evaluate({"s1": GenericDataset(gt).points("s1")}, {"s1": mixed}, radius_px=3.0)


def test_nucleus_is_a_real_class_when_the_gt_has_it(tmp_path: Path) -> None:
    gt = {"im": Nuclei(np.array([[0.0, 0.0], [9, 9]]), None, np.array([0, 1]), ("nucleus", "other"), mpp=0.5)}
    pred = {"im": Nuclei(np.array([[0.0, 0.0]]), None, np.array([0]), ("nucleus",), mpp=0.5)}
    rep = evaluate(gt, pred, radius_px=1.0)
    assert not rep.class_agnostic and rep.classes["nucleus"].tp == 1


# ------------------------------------------------------------ 4. hungarian distance ties
def test_hungarian_ties_keep_the_count_and_are_reproducible() -> None:
    # a prediction equidistant to two GTs: one pair, the same one on every call
    p, g = np.array([[0.0, 0.0]]), np.array([[3.0, 0.0], [-3.0, 0.0]])
    first = match("hungarian", p, None, g, 6.0)
    assert len(first[0]) == 1
    for _ in range(3):
        again = match("hungarian", p, None, g, 6.0)
        assert first[0].tolist() == again[0].tolist() and first[1].tolist() == again[1].tolist()
