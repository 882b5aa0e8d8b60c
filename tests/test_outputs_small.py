"""Smaller output fixes: truncated slide headers, DeNuC.load of a model folder, detect's help."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from denuc.errors import InputError, ModelError


@pytest.mark.parametrize("keep", [4, 8, 100])
def test_slide_cut_inside_its_header_says_truncated(tmp_path: Path, keep: int) -> None:
    from denuc.source import open_source
    from denuc.source.testslide import write_pyramidal_tiff

    img = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    whole = write_pyramidal_tiff(tmp_path / "a.svs", img, 0.25, tile=128, downsamples=(1, 2), flavor="aperio")
    cut = tmp_path / "cut.svs"
    cut.write_bytes(whole.read_bytes()[:keep])
    with pytest.raises(InputError) as e:
        open_source(cut)
    msg = str(e.value)
    assert msg.startswith(f"{cut}: cannot open slide: the file is truncated") and "IndexError" not in msg


def test_load_takes_a_model_folder_first(tmp_path: Path) -> None:
    from denuc.pipeline import DeNuC

    (tmp_path / "mymodel").mkdir()
    with pytest.raises(ModelError, match="not a model folder"):  # read as a model folder, not a detector file
        DeNuC.load(tmp_path / "mymodel", device="cpu")


def test_detect_help_lists_the_columns_detect_writes(capsys: pytest.CaptureFixture[str]) -> None:
    from denuc.cli import main

    with pytest.raises(SystemExit):
        main(["detect", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "prob_" not in text and "x,y,x_um,y_um,class (always nucleus),score,det_score, and roi with --roi" in text
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    assert "prob_<class>" in " ".join(capsys.readouterr().out.split())


def test_summary_json_is_valid_for_areas(tmp_path: Path) -> None:
    """The ``areas`` block is plain JSON (strings with µm and ∩ survive)."""
    from denuc.sinks.summary import plain_json
    from denuc.source.area import AnalysedArea
    from denuc.source.tissue import TissueMask

    m = np.zeros((10, 10), bool)
    m[2:8, 2:8] = True
    a = AnalysedArea(TissueMask(m, 10.0, "auto"), None, (100, 100), 0.5)
    doc = json.loads(json.dumps(plain_json(a.describe()), ensure_ascii=False))
    assert doc["tissue"]["area_mm2"] == pytest.approx(36 * 100 * 0.25 / 1e6)
    assert doc["analysed"]["area_mm2"] == doc["tissue"]["area_mm2"]
    assert doc["tissue"]["how"] == "auto mask on a 5 µm/px thumbnail (10 x 10 px)"


def test_roi_outlines_include_holes(tmp_path: Path) -> None:
    from denuc.source import load_rois

    outer = [[0, 0], [100, 0], [100, 100], [0, 100], [0, 0]]
    hole = [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]
    p = tmp_path / "r.geojson"
    p.write_text(json.dumps({"type": "Feature", "properties": {"name": "a"},
                             "geometry": {"type": "Polygon", "coordinates": [outer, hole]}}))
    rings = load_rois(p).outlines()
    assert len(rings) == 2 and {tuple(r.min(0)) for r in rings} == {(0.0, 0.0), (40.0, 40.0)}
