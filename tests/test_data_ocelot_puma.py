"""OCELOT 2023 and PUMA readers on tiny folders written in their published formats."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from dataset_fixtures import (
    OCELOT_SAMPLES,
    OCELOT_SIZE,
    PUMA_IMAGES,
    PUMA_NUCLEI,
    PUMA_SIZE,
    make_ocelot,
    make_puma,
    puma_feature,
    square,
)

from denuc.data.base import open_dataset
from denuc.data.readers.ocelot import OCELOT_CLASSES, Ocelot
from denuc.data.readers.puma import PUMA_TYPES, Puma
from denuc.errors import DenucError, InputError, ResolutionError


# ----------------------------------------------------------------------- OCELOT
def test_ocelot_reads_the_published_layout(tmp_path: Path) -> None:
    ds = open_dataset(make_ocelot(tmp_path / "ocelot"))
    assert isinstance(ds, Ocelot) and ds.format_name == "ocelot"
    assert ds.classes == OCELOT_CLASSES == ("background_cell", "tumor_cell")
    assert ds.stems("train") == ["001", "002"] and ds.stems("val") == ["003"] and ds.stems("test") == ["004"]
    assert ds.stems(None) == ["001", "002", "003", "004"]
    for sid, (subset, mpp, _) in OCELOT_SAMPLES.items():
        assert ds.mpp_of(sid) == mpp and ds.split_of(sid) == subset
    assert ds.mpp == float(np.median([m for _, m, _ in OCELOT_SAMPLES.values()]))
    s = ds.load("001")
    assert s.image.shape == (OCELOT_SIZE, OCELOT_SIZE, 3) and s.mpp == OCELOT_SAMPLES["001"][1]
    np.testing.assert_array_equal(s.points.xy, [[10, 20], [30, 40], [63, 5]])  # x, y as in the CSV
    assert s.points.classes == ["background_cell", "tumor_cell", "tumor_cell"]  # labels 1 = BC, 2 = TC
    assert s.points.mpp == OCELOT_SAMPLES["001"][1]
    assert len(ds.points("003")) == 0  # empty CSV = zero cells
    assert ds.image_path("004").relative_to(ds.root).as_posix() == "images/test/cell/004.jpg"


def test_ocelot_bad_labels_and_outside_points(tmp_path: Path) -> None:
    ds = Ocelot(make_ocelot(tmp_path, {"001": ("train", 0.2, "1,2,3\n")}))
    with pytest.raises(InputError, match=r"001\.csv: unknown label\(s\) \[3\.0\]"):
        ds.points("001")
    ds = Ocelot(make_ocelot(tmp_path / "b", {"001": ("train", 0.2, "1,2\n")}))
    with pytest.raises(InputError, match=r"001\.csv: every line must be 'x,y,label'"):
        ds.points("001")
    ds = Ocelot(make_ocelot(tmp_path / "c", {"001": ("train", 0.2, f"1,2,1\n{OCELOT_SIZE},2,2\n")}))
    with pytest.raises(InputError, match="outside"):
        ds.points("001")
    with pytest.warns(UserWarning, match="dropped"):
        assert len(Ocelot(ds.root, outside="drop").points("001")) == 1
    ds = Ocelot(make_ocelot(tmp_path / "d", {"001": ("train", 0.2, "x,y,label\n4,5,2\n")}))
    assert ds.points("001").classes == ["tumor_cell"]  # a header line is tolerated


def test_ocelot_missing_parts(tmp_path: Path) -> None:
    root = make_ocelot(tmp_path / "a")
    for f in (root / "images" / "test").rglob("*"):
        if f.is_file():
            f.unlink()
    for d in sorted((root / "images" / "test").rglob("*"), reverse=True):
        d.rmdir()
    (root / "images" / "test").rmdir()
    with pytest.warns(UserWarning, match=r"subset\(s\) \['test'\]"):
        ds = Ocelot(root)
    assert ds.stems("test") == [] and ds.stems(None) == ["001", "002", "003"]

    root = make_ocelot(tmp_path / "b")
    (root / "images" / "train" / "cell" / "002.jpg").unlink()
    with pytest.raises(InputError, match=r"cell: image of sample '002' \(002\.jpg\) is missing"):
        Ocelot(root)

    root = make_ocelot(tmp_path / "c")
    (root / "annotations" / "val" / "cell" / "003.csv").unlink()
    with pytest.raises(InputError, match=r"003\.csv: annotation file is missing"):
        Ocelot(root).points("003")


@pytest.mark.parametrize(
    "edit, err, match",
    [
        (lambda m: m.pop("sample_pairs"), InputError, "'sample_pairs'"),
        (lambda m: m["sample_pairs"]["001"].update(subset="training"), InputError, "subset 'training'"),
        (lambda m: m["sample_pairs"]["001"]["cell"].pop("resized_mpp_x"), InputError, "missing 'resized_mpp_x'"),
        (lambda m: m["sample_pairs"]["001"]["cell"].update(resized_mpp_x=40), ResolutionError, "resized_mpp_x"),
        (lambda m: m["sample_pairs"]["001"]["cell"].update(resized_mpp_y=0.3), InputError, "non-square"),
    ],
)
def test_ocelot_bad_metadata(tmp_path: Path, edit, err: type[Exception], match: str) -> None:  # type: ignore[no-untyped-def]
    root = make_ocelot(tmp_path)
    meta = json.loads((root / "metadata.json").read_text())
    edit(meta)
    (root / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(err, match=match):
        Ocelot(root)
    (root / "metadata.json").write_text("{")
    with pytest.raises(InputError, match=r"metadata\.json: cannot read"):
        Ocelot(root)


# ------------------------------------------------------------------------- PUMA
def _puma_rois() -> dict[str, list]:
    # one nucleus of every type in ROI 001: a 2 px square at (4 i, 4 i), centroid (4 i + 1, 4 i + 1)
    rois = {"training_set_primary_roi_001": [puma_feature(t, [square(4 * i, 4 * i, 2)]) for i, t in
                                             enumerate(PUMA_TYPES)]}
    # ROI 002: a polygon with a hole and a MultiPolygon (area weighted)
    rois["training_set_metastatic_roi_002"] = [
        puma_feature("nuclei_tumor", [square(10, 10, 4), [[12, 10], [14, 10], [14, 14], [12, 14], [12, 10]]]),
        puma_feature("nuclei_plasma_cell", multi=[[square(20, 20, 2)], [square(30, 20, 4)]]),
    ]
    rois["training_set_metastatic_roi_003"] = []
    return rois


def test_puma_paper_mapping_and_centroids(tmp_path: Path) -> None:
    ds = open_dataset(make_puma(tmp_path, _puma_rois()))
    assert isinstance(ds, Puma) and ds.format_name == "puma" and ds.mapping_name == "paper"
    assert ds.classes == ("tumor", "lymphocyte", "other") and ds.mpp == 0.25
    assert ds.stems(None) == ["training_set_metastatic_roi_002", "training_set_metastatic_roi_003",
                              "training_set_primary_roi_001"]
    assert ds.stems("train") == [] and ds.split_of("training_set_primary_roi_001") is None
    p = ds.points("training_set_primary_roi_001")
    np.testing.assert_allclose(p.xy, [[4 * i + 1, 4 * i + 1] for i in range(10)])
    expected = ["tumor", "lymphocyte"] + ["other"] * 8  # plasma cells -> other in the paper mapping
    assert p.classes == expected
    q = ds.points("training_set_metastatic_roi_002")
    np.testing.assert_allclose(q.xy, [[11, 12], [(21 * 4 + 32 * 16) / 20, (21 * 4 + 22 * 16) / 20]])
    assert q.classes == ["tumor", "other"]
    assert len(ds.points("training_set_metastatic_roi_003")) == 0
    s = ds.load("training_set_primary_roi_001")
    assert s.image.shape == (PUMA_SIZE, PUMA_SIZE, 3) and s.mpp == 0.25  # RGBA TIFF -> RGB


def test_puma_challenge_mapping_mpp_and_splits(tmp_path: Path) -> None:
    root = make_puma(tmp_path, _puma_rois())
    (root / "splits.yaml").write_text(yaml.safe_dump({"train": ["training_set_primary_roi_001"],
                                                      "test": ["training_set_metastatic_roi_002.tif"]}))
    ds = open_dataset(root, "puma", mapping="challenge", mpp=0.23)
    assert ds.classes == ("tumor", "tils", "other") and ds.mpp == 0.23
    assert ds.points("training_set_primary_roi_001").classes == ["tumor", "tils", "tils"] + ["other"] * 7
    assert ds.stems("train") == ["training_set_primary_roi_001"]
    assert ds.stems("test") == ["training_set_metastatic_roi_002"]
    assert ds.stems(None)[-1] == "training_set_metastatic_roi_003"  # in no split, still listed
    other = tmp_path / "my_splits.yaml"
    other.write_text(yaml.safe_dump({"splits": {"val": ["training_set_metastatic_roi_003"]}}))
    ds2 = Puma(root, splits=other)
    assert ds2.stems("val") == ["training_set_metastatic_roi_003"] and ds2.stems("train") == []


def test_puma_errors(tmp_path: Path) -> None:
    root = make_puma(tmp_path / "a", {"r1": [puma_feature("nuclei_mitosis", [square(1, 1, 2)])]})
    with pytest.raises(InputError, match=r"r1_nuclei\.geojson: unknown nucleus type\(s\) \['nuclei_mitosis'\]"):
        Puma(root).points("r1")
    with pytest.raises(DenucError, match="unknown PUMA class mapping 'tils'; known: challenge, paper"):
        Puma(root, mapping="tils")
    with pytest.raises(ResolutionError, match="PUMA mpp"):
        Puma(root, mpp=40)
    (root / "splits.yaml").write_text(yaml.safe_dump({"train": ["r9"]}))
    with pytest.raises(InputError, match=r"splits\.yaml: split\(s\) name 1 image\(s\) that do not exist: \['r9'\]"):
        Puma(root)
    with pytest.raises(InputError, match=r"nope\.yaml: splits file does not exist"):
        Puma(root, splits=tmp_path / "nope.yaml")

    root = make_puma(tmp_path / "b", {"r1": [], "r2": []})
    (root / PUMA_NUCLEI / "r2_nuclei.geojson").unlink()
    with pytest.raises(InputError, match=r"no <stem>_nuclei\.geojson for 1 ROI\(s\): \['r2'\]"):
        Puma(root)
    (root / PUMA_IMAGES / "r2.tif").unlink()
    (root / PUMA_IMAGES / "r1.tif").write_bytes(b"II*\x00broken")
    with pytest.raises(InputError, match=r"r1\.tif: "):
        Puma(root).load("r1")

    root = make_puma(tmp_path / "c", {"r1": [puma_feature("nuclei_tumor", [square(40, 40, 20)])]})
    with pytest.raises(InputError, match="outside"):
        Puma(root).points("r1")
