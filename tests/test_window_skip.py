"""Detector windows far from the tissue are not run: the points in the tissue are those of the
run over every window, and a slide with tissue in one corner costs a fraction of the windows.

Tiny random detector (PyTorch), a synthetic image and a pyramidal test slide."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from model_fixtures import tiny_detector_checkpoint
from synthetic import planted_nuclei_image

from denuc.core.result import Nuclei
from denuc.detect.api import Detector
from denuc.detect.windows import SKIP_NMS_LINKS
from denuc.merge.tiling import window_grid


@pytest.fixture(scope="module")
def det(tmp_path_factory: pytest.TempPathFactory) -> Detector:
    ckpt = tiny_detector_checkpoint(tmp_path_factory.mktemp("skip") / "tiny.safetensors", score_threshold=0.3)
    return Detector.load(ckpt, device="cpu", runtime="torch")


def _counting(det: Detector, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the windows the detector's network runs on."""
    seen: list[int] = []
    inner = det.runner

    def run(x: torch.Tensor) -> Any:
        seen.append(int(x.shape[0]))
        return inner(x)

    monkeypatch.setattr(det, "runner", run)
    return seen


def test_windows_away_from_the_regions_are_not_run_and_points_in_them_are_unchanged(
        det: Detector, monkeypatch: pytest.MonkeyPatch) -> None:
    img, _ = planted_nuclei_image(700, 900, 60, seed=1)
    full = det.detect_works([img])[0]
    assert len(full.xy) > 30

    def left(boxes: np.ndarray) -> np.ndarray:  # the region: columns [0, 300)
        return boxes[:, 0] < 300

    seen = _counting(det, monkeypatch)
    part = det.detect_works([img], regions=[left])[0]
    n_all = len(window_grid(700, 900, 256, 192))
    assert 0 < sum(seen) < n_all  # windows were skipped
    inside = full.xy[:, 0] < 300 - 256 - SKIP_NMS_LINKS * det.model.config.nms_radius_px  # well inside
    got = {tuple(p) for p in part.xy}
    assert inside.any() and all(tuple(p) in got for p in full.xy[inside])
    # and every point that comes out of both runs in the region has the same score
    k = {tuple(p): s for p, s in zip(full.xy, full.scores, strict=True)}
    assert all(k[tuple(p)] == s for p, s in zip(part.xy, part.scores, strict=True) if tuple(p) in k)


def test_no_region_runs_nothing_and_none_runs_everything(det: Detector, monkeypatch: pytest.MonkeyPatch) -> None:
    img, _ = planted_nuclei_image(300, 300, 8, seed=2)
    seen = _counting(det, monkeypatch)
    empty = det.detect_works([img], regions=[lambda b: np.zeros(len(b), bool)])[0]
    assert len(empty.xy) == 0 and sum(seen) == 0
    both = det.detect_works([img, img], regions=[None, lambda b: np.ones(len(b), bool)])
    np.testing.assert_array_equal(both[0].xy, both[1].xy)
    assert sum(seen) == 2 * 4  # 300 px: 2 x 2 windows each


def test_a_slide_with_tissue_in_one_corner_gives_the_points_of_every_window(tmp_path: Path, det: Detector,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the stream: the tissue (auto mask) covers a corner of a mostly empty slide; the
    points equal a run whose detector does not skip windows, with far fewer windows run."""
    from denuc.cli import main
    from denuc.source.testslide import write_pyramidal_tiff

    canvas = np.full((640, 768, 3), 242, np.uint8)
    tissue, _ = planted_nuclei_image(220, 260, 25, seed=3)
    canvas[20:240, 30:290] = tissue
    slide = write_pyramidal_tiff(tmp_path / "corner.tif", canvas, 0.5, tile=128, downsamples=(1, 2),
                                 compression="none", flavor="generic")
    ckpt = tmp_path / "d.safetensors"
    tiny_detector_checkpoint(ckpt, score_threshold=0.3)
    args = ["detect", str(slide), "--detector", str(ckpt), "--device", "cpu", "--runtime", "torch", "--no-overlay",
            "--no-progress", "--tile-px", "256"]
    import denuc.detect.windows as windows

    orig = windows.normalise
    crops: list[int] = []

    def counting(batch: np.ndarray, *a: Any, **k: Any) -> Any:
        crops.append(len(batch))
        return orig(batch, *a, **k)

    monkeypatch.setattr(windows, "normalise", counting)
    assert main([*args, "--out", str(tmp_path / "skip")]) == 0
    n_skip, crops[:] = sum(crops), []
    monkeypatch.setattr(Detector, "skips_windows", False)
    assert main([*args, "--out", str(tmp_path / "all")]) == 0
    assert 0 < n_skip < sum(crops)  # the windows on glass next to the tissue are not run
    a = Nuclei.read_csv(tmp_path / "skip" / "corner.csv")
    b = Nuclei.read_csv(tmp_path / "all" / "corner.csv")
    assert len(b) > 5
    np.testing.assert_array_equal(a.xy, b.xy)
    np.testing.assert_array_equal(a.scores, b.scores)
    sa, sb = (json.loads((tmp_path / d / "corner.summary.json").read_text()) for d in ("skip", "all"))
    assert sa["nuclei"] == sb["nuclei"]
