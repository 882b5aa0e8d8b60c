"""The analysed area: nuclei are reported only inside tissue ∩ ROI, every density is the count
over the area it was counted in, and the same pixels give the same results whatever the
container (pyramidal OME-TIFF, flat tiled TIFF, PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import tiny_detector_checkpoint
from PIL import Image

from denuc.core.result import Nuclei
from denuc.source.testslide import write_pyramidal_tiff

MPP = 0.5
W, H = 384, 320
TISSUE_X = 240  # tissue left of this column, glass right of it


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # random weights, low threshold: points everywhere, on glass too, so filtering shows
    return tiny_detector_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", score_threshold=0.2)


def tissue_image(seed: int = 0) -> np.ndarray:
    """Pink tissue with dark nuclei left of :data:`TISSUE_X`, white glass right of it."""
    rng = np.random.default_rng(seed)
    img = np.full((H, W, 3), 246, np.uint8)
    img[:, :TISSUE_X] = (225, 160, 200)
    for x, y in rng.uniform([8, 8], [TISSUE_X - 8, H - 8], size=(60, 2)).astype(int):
        img[y - 3:y + 4, x - 3:x + 4] = (80, 40, 130)
    return img


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pyramidal_tiff(tmp_path_factory.mktemp("s") / "s.tif", tissue_image(), MPP, tile=128,
                                downsamples=(1, 2), compression="none", flavor="generic")


@pytest.fixture(scope="module")
def everything(ckpt: Path, slide: Path,
               tmp_path_factory: pytest.TempPathFactory) -> tuple[Nuclei, dict]:  # type: ignore[type-arg]
    """Every nucleus of the slide (``--tissue none``)."""
    return detect(ckpt, slide, tmp_path_factory.mktemp("all"), "--tissue", "none")


def detect(ckpt: Path, src: Path, out: Path, *extra: str) -> tuple[Nuclei, dict]:  # type: ignore[type-arg]
    from denuc.cli import main

    assert main(["detect", str(src), "--out", str(out), "--detector", str(ckpt), "--device", "cpu",
                 "--runtime", "torch", "--no-overlay", "--tile-px", "512", *extra]) == 0
    from denuc.core.files import file_stem

    stem = file_stem(src)
    return Nuclei.read_csv(out / f"{stem}.csv"), json.loads((out / f"{stem}.summary.json").read_text())


def test_auto_tissue_reports_only_nuclei_in_tissue_and_divides_by_its_area(ckpt: Path, slide: Path, tmp_path: Path,
                                                                           everything: tuple  # type: ignore[type-arg]
                                                                           ) -> None:
    everything, s_all = everything
    assert (everything.xy[:, 0] > TISSUE_X + 16).sum() > 10  # the detector does fire on glass
    assert s_all["analysed_area_mm2"] == pytest.approx(W * H * MPP**2 / 1e6)
    assert s_all["density_per_mm2"] == pytest.approx(len(everything) / s_all["analysed_area_mm2"])

    got, s = detect(ckpt, slide, tmp_path / "auto")
    assert 0 < len(got) < len(everything)
    assert (got.xy[:, 0] < TISSUE_X + 45).all()  # mask edge: closing radius (40 µm) plus a thumbnail px
    assert s["nuclei"] == len(got) and s["areas"]["tissue"]["how"].startswith("auto mask on a 0.5 µm/px")
    true_area = TISSUE_X * H * MPP**2 / 1e6
    assert s["tissue_area_mm2"] == pytest.approx(true_area, rel=0.1)
    assert s["analysed_area_mm2"] == s["tissue_area_mm2"] == pytest.approx(s["areas"]["tissue"]["area_mm2"])
    assert s["density_per_mm2"] == pytest.approx(len(got) / s["tissue_area_mm2"])
    # every reported nucleus lies in the mask the run used, and every nucleus in it is reported
    from denuc.source import detect_tissue, open_source

    with open_source(slide) as src:
        thumb, ds = src.thumbnail(2048)
        mask = detect_tissue(thumb, ds, src.mpp)
    assert mask.contains(got.xy).all()
    assert len(got) == int(mask.contains(everything.xy).sum())


def test_mask_file_filters_nuclei_and_is_the_density_area(ckpt: Path, slide: Path, tmp_path: Path,
                                                         everything: tuple) -> None:  # type: ignore[type-arg]
    m = np.zeros((H // 4, W // 4), np.uint8)
    m[:, :25] = 255  # left 100 level-0 px
    Image.fromarray(m).save(tmp_path / "mask.png")
    everything, _ = everything
    got, s = detect(ckpt, slide, tmp_path / "o", "--tissue-mask", str(tmp_path / "mask.png"))
    assert len(got) == int((everything.xy[:, 0] < 100).sum()) > 0
    assert (got.xy[:, 0] < 100).all()
    assert s["tissue_area_mm2"] == pytest.approx(100 * H * MPP**2 / 1e6)
    assert s["density_per_mm2"] == pytest.approx(len(got) / s["tissue_area_mm2"])
    assert "mask file" in s["areas"]["tissue"]["how"]


def _roi_file(path: Path) -> Path:
    outer = [[24, 24], [216, 24], [216, 280], [24, 280], [24, 24]]
    hole = [[72, 72], [168, 72], [168, 168], [72, 168], [72, 72]]
    second = [[180, 190], [360, 190], [360, 300], [180, 300], [180, 190]]  # overlaps the first and the glass
    feats = [{"type": "Feature", "properties": {"name": "a"},
              "geometry": {"type": "Polygon", "coordinates": [outer, hole]}},
             {"type": "Feature", "properties": {"name": "b"}, "geometry": {"type": "Polygon", "coordinates": [second]}}]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return path


def test_roi_with_a_hole_densities_are_counts_over_roi_areas(ckpt: Path, slide: Path, tmp_path: Path,
                                                            everything: tuple) -> None:  # type: ignore[type-arg]
    import shapely

    roi = _roi_file(tmp_path / "roi.geojson")
    everything, _ = everything
    a_poly = shapely.Polygon([(24, 24), (216, 24), (216, 280), (24, 280)],
                             [[(72, 72), (168, 72), (168, 168), (72, 168)]])
    b_poly = shapely.difference(shapely.box(180, 190, 360, 300), a_poly)
    # --tissue none: ROI areas are the polygons' own (holes out, overlap to the first)
    got, s = detect(ckpt, slide, tmp_path / "none", "--tissue", "none", "--roi", str(roi))
    assert s["rois"]["a"]["area_mm2"] == pytest.approx(a_poly.area * MPP**2 / 1e6)
    assert s["rois"]["b"]["area_mm2"] == pytest.approx(b_poly.area * MPP**2 / 1e6)
    in_a = shapely.contains_xy(a_poly, everything.xy[:, 0], everything.xy[:, 1])
    assert s["rois"]["a"]["nuclei"] == int(in_a.sum()) > 0
    # with auto tissue: areas are ROI ∩ tissue, nuclei are in both, top level = sum of the regions
    got, s = detect(ckpt, slide, tmp_path / "auto", "--roi", str(roi))
    assert set(got.roi) <= {"a", "b"} and s["outside_rois"] == 0
    assert not shapely.contains_xy(shapely.box(72, 72, 168, 168), got.xy[:, 0], got.xy[:, 1]).any()  # hole
    for name in ("a", "b"):
        r = s["rois"][name]
        assert r["density_per_mm2"] == pytest.approx(r["nuclei"] / r["area_mm2"])
    assert s["rois"]["b"]["area_mm2"] < 0.6 * b_poly.area * MPP**2 / 1e6  # most of b is glass
    total = s["rois"]["a"]["area_mm2"] + s["rois"]["b"]["area_mm2"]
    assert s["analysed_area_mm2"] == pytest.approx(total) and s["analysed_area_mm2"] < s["tissue_area_mm2"]
    assert s["density_per_mm2"] == pytest.approx(len(got) / total)
    assert "holes" in s["areas"]["rois"]["a"]["how"] and "tissue" in s["areas"]["analysed"]["how"]


def test_same_pixels_in_any_container_give_the_same_points_tissue_and_stain(ckpt: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    img = tissue_image(seed=1)
    ome = write_pyramidal_tiff(tmp_path / "ome.ome.tif", img, MPP, tile=128, downsamples=(1, 2),
                               compression="none", flavor="ome")
    flat = write_pyramidal_tiff(tmp_path / "flat.tif", img, MPP, tile=128, downsamples=(1,), compression="none",
                                flavor="generic")
    png = tmp_path / "png.png"
    Image.fromarray(img).save(png)
    runs = [detect(ckpt, ome, tmp_path / "o1"), detect(ckpt, flat, tmp_path / "o2"),
            detect(ckpt, png, tmp_path / "o3", "--mpp", str(MPP))]
    ref, s_ref = runs[0]
    assert len(ref) > 0
    for got, s in runs[1:]:
        np.testing.assert_array_equal(got.xy, ref.xy)
        assert s["tissue_area_mm2"] == pytest.approx(s_ref["tissue_area_mm2"])
    # the stain estimate reads the same pixels whatever the container
    from types import SimpleNamespace

    from denuc.source import open_source
    from denuc.stream.job import _stain_estimate
    from denuc.tiles.plan import make_plan

    import denuc.stream.job as job

    def estimates() -> list:  # type: ignore[type-arg]
        est = []
        for path in (ome, flat, png):
            with open_source(path, mpp=MPP) as src:
                plan = make_plan(tuple(src.level_dimensions), tuple(src.level_downsamples), float(src.mpp),
                                 det_mpp=0.5, det_window=256, det_stride=192, det_margin=32, tile_px=128, enc_mpp=1.0,
                                 enc_window=224, enc_stride=224, max_work_pixels=2**28, name="x")
                runner = SimpleNamespace(classifier=SimpleNamespace(stain_norm="macenko"))
                est.append(_stain_estimate(src, runner, plan))
        return est

    est = estimates()  # small: the whole of level 0, the same pixels in every container
    for e in est[1:]:
        np.testing.assert_allclose(e.stains, est[0].stains)
        np.testing.assert_allclose(e.max_conc, est[0].max_conc)
    monkeypatch.setattr(job, "STAIN_WHOLE_PIXELS", 1000)  # big: crops at the encoder's mpp, from level 1 or 0
    est = estimates()
    for e in est[1:]:
        np.testing.assert_allclose(e.stains, est[0].stains, atol=2e-3)
        np.testing.assert_allclose(e.max_conc, est[0].max_conc, rtol=2e-3)


@pytest.mark.slow  # a subprocess: the warning's formatting is the CLI's, outside pytest's capture
def test_summary_records_the_runtime_that_ran_and_the_fallback_warning_is_one_line(ckpt: Path, slide: Path,
                                                                                   tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    import os
    import subprocess
    import sys

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the ONNX cache under it cannot be created: the export fails
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "DENUC_CACHE": str(blocker),
           "OMP_NUM_THREADS": "1"}
    env.pop("DENUC_RUNTIME", None)
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "denuc", "detect", str(slide), "--out", str(out), "--detector", str(ckpt),
                        "--device", "cpu", "--runtime", "auto", "--no-overlay", "--tile-px", "512", "--profile"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "s.summary.json").read_text())
    assert s["runtime"] == {"detector": "torch"} and s["models"]["detector"]["runtime"] == "torch"
    warn = [line for line in r.stderr.splitlines() if "ONNX Runtime failed" in line]
    assert len(warn) == 1 and warn[0].startswith("denuc detect: warning: detector: ONNX Runtime failed")
    assert "warnings.warn" not in r.stderr and ".py:" not in r.stderr  # no source lines
    # --profile: the main thread's shares and "other" add up to the wall, which is the summary's wall_s
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line[:1].isalpha()}
    assert float(rows["wall"][1]) == pytest.approx(s["wall_s"] * 1e3, abs=0.1)
    main = [k for k in ("plan", "tissue", "wait", "detect", "encode", "query", "classify", "write", "other")
            if k in rows]
    assert sum(float(rows[k][2].rstrip("%")) for k in main) == pytest.approx(100.0, abs=1.0)
    assert sum(v for k, v in s["timings_ms"].items() if k != "read") <= s["wall_s"] * 1e3


def test_in_memory_run_has_the_same_areas_and_densities(ckpt: Path, slide: Path, tmp_path: Path) -> None:
    from denuc.detect.api import Detector
    from denuc.stream.job import RunOptions, run_source
    from denuc.stream.runner import TileStream

    roi = _roi_file(tmp_path / "roi.geojson")
    _, s_file = detect(ckpt, slide, tmp_path / "o", "--roi", str(roi))
    det = Detector.load(ckpt, device="cpu", runtime="torch")
    res = run_source(TileStream(det, None, tile_px=512), slide, opts=RunOptions(roi=roi, progress=False))
    s = res.summary
    assert res.nuclei is not None and len(res.nuclei) == s_file["nuclei"] == s["nuclei"]
    for k in ("tissue_area_mm2", "analysed_area_mm2", "density_per_mm2"):
        assert s[k] == pytest.approx(s_file[k])
    for name in ("a", "b"):
        for k in ("area_mm2", "nuclei", "density_per_mm2"):
            assert s["rois"][name][k] == pytest.approx(s_file["rois"][name][k])
