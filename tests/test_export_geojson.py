"""QuPath GeoJSON export of Nuclei: structure QuPath reads, atomic/gzip writing, lossless round trip."""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import numpy as np
import pytest

from denuc.core.result import NO_CLASS, Nuclei
from denuc.data.readers.generic import geojson_to_nuclei
from denuc.errors import InputError
from denuc.export.geojson import nuclei_to_geojson, write_geojson

CLASSES = ("tumor", "lymphocyte", "other")


def _nuclei() -> Nuclei:
    probs = np.array([[0.9, 0.05, 0.05], [0.1, 0.7, 0.2], [0.3, 0.3, 0.4]], dtype=np.float32)
    return Nuclei([[10.5, 3.25], [1234567.125, 0.0], [7.0, 8.0]], scores=[0.9, 0.123456789, 1.0],
                  class_ids=[0, 1, NO_CLASS], class_names=CLASSES, probs=probs, name="img")


def test_feature_structure_is_what_qupath_reads() -> None:
    gj = nuclei_to_geojson(_nuclei(), colors={"tumor": (255, 0, 0)})
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 3
    f0, f1, f2 = gj["features"]
    assert f0["type"] == "Feature"
    assert f0["geometry"] == {"type": "Point", "coordinates": [10.5, 3.25]}  # x = column first
    assert f0["properties"]["objectType"] == "detection" and "objectType" not in f0
    assert f0["properties"]["classification"] == {"name": "tumor", "color": [255, 0, 0]}
    # no det_scores: the scores are the detector's own, and there is no combined score
    assert f0["properties"]["measurements"] == {"Detection score": 0.9, "Class probability": 0.9, "Prob tumor": 0.9,
                                                "Prob lymphocyte": 0.05, "Prob other": 0.05}
    assert f1["properties"]["measurements"]["Class probability"] == 0.7
    assert "Class probability" not in f2["properties"]["measurements"]  # no class, no class probability
    assert f1["properties"]["classification"]["name"] == "lymphocyte"
    assert f1["properties"]["classification"]["color"] != [255, 0, 0]  # default palette for the others
    assert "classification" not in f2["properties"]  # unclassified
    ids = [f["id"] for f in gj["features"]]
    assert len(set(ids)) == 3 and all(str(uuid.UUID(i)) == i for i in ids)
    json.dumps(gj, allow_nan=False)  # plain JSON types only


def test_detection_score_is_the_detectors_and_the_csv_score_is_named_apart() -> None:
    n = _nuclei()
    n.det_scores = np.array([0.5, 0.25, 0.75], dtype=np.float32)
    n.scores = n.det_scores * n.probs.max(1)
    gj = nuclei_to_geojson(n)
    m0 = gj["features"][0]["properties"]["measurements"]
    assert list(m0)[:3] == ["Detection score", "Class probability", "Score (detection x class)"]
    assert m0["Detection score"] == 0.5 and m0["Class probability"] == 0.9
    assert np.float32(m0["Score (detection x class)"]) == n.scores[0] == np.float32(0.5) * np.float32(0.9)
    m2 = gj["features"][2]["properties"]["measurements"]
    assert m2["Detection score"] == 0.75 and "Class probability" not in m2 and m2["Prob other"] == 0.4


def test_uuid4_strings_are_distinct_version_4() -> None:
    from denuc.export.geojson import uuid4_strings

    ids = uuid4_strings(500)
    assert len(set(ids)) == 500 and uuid4_strings(0) == []
    assert all(uuid.UUID(i).version == 4 and str(uuid.UUID(i)) == i for i in ids)


def test_points_without_scores_or_classes() -> None:
    gj = nuclei_to_geojson(Nuclei([[1, 2]]))
    props = gj["features"][0]["properties"]
    assert props == {"objectType": "detection"}
    assert nuclei_to_geojson(Nuclei.empty()) == {"type": "FeatureCollection", "features": []}


def test_colour_arguments() -> None:
    n = Nuclei([[1, 2], [3, 4]], class_ids=[0, 1], class_names=("a", "b"))
    gj = nuclei_to_geojson(n, colors=[(1, 2, 3), (4, 5, 6)])
    assert [f["properties"]["classification"]["color"] for f in gj["features"]] == [[1, 2, 3], [4, 5, 6]]
    with pytest.raises(InputError, match="1 colours for 2 classes"):
        nuclei_to_geojson(n, colors=[(1, 2, 3)])
    with pytest.raises(InputError, match="colour must be"):
        nuclei_to_geojson(n, colors={"a": (1, 2)})


@pytest.mark.parametrize("name", ["out.geojson", "out.geojson.gz"])
def test_write_and_read_back_exactly(tmp_path: Path, name: str) -> None:
    n = _nuclei()
    p = write_geojson(n, tmp_path / "sub" / name)
    raw = p.read_bytes()
    if name.endswith(".gz"):
        raw = gzip.decompress(raw)
    assert json.loads(raw)["type"] == "FeatureCollection"
    assert [f.name for f in p.parent.iterdir()] == [name]  # atomic: no temp file left
    back = geojson_to_nuclei(p, CLASSES)
    np.testing.assert_array_equal(back.xy, n.xy)
    np.testing.assert_array_equal(back.class_ids, n.class_ids)
    np.testing.assert_array_equal(back.scores, n.scores)  # float32 scores survive bit for bit
    assert back.name == "out"


def test_combined_score_reads_back_as_score(tmp_path: Path) -> None:
    """With det_scores, the CSV score is "Score (detection x class)", and the reader takes it."""
    n = _nuclei()
    n.det_scores = np.array([0.5, 0.25, 0.75], dtype=np.float32)
    back = geojson_to_nuclei(write_geojson(n, tmp_path / "d.geojson"), CLASSES)
    np.testing.assert_array_equal(back.scores, n.scores)


def test_nan_scores_are_refused(tmp_path: Path) -> None:
    n = Nuclei([[1, 2]], scores=[np.nan])
    with pytest.raises(InputError, match=r"bad\.geojson: cannot write GeoJSON, scores contain NaN"):
        write_geojson(n, tmp_path / "bad.geojson")
    assert not (tmp_path / "bad.geojson").exists()
