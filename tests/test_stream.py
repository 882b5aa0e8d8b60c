"""The tile stream end to end: slides and images through one path, exact level-0 points,
each nucleus once across tiles, resume after a crash, concurrent runs, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial import cKDTree

from model_fixtures import tiny_detector_checkpoint
from synthetic import planted_nuclei_image as blobs

from denuc.core.result import Nuclei
from denuc.detect.api import Detector
from denuc.source.testslide import write_pyramidal_tiff

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

#: The detector every CLI call here uses: a random-weight ``tiny`` one (0.5 µm/px, points all over
#: the image, so every tile border is crossed); the stream's invariants hold for any detector.
_DET: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tiny_detector_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", score_threshold=0.3)
    _DET[:] = [path]
    return path


@pytest.fixture(scope="module")
def detector(tiny_ckpt: Path) -> Detector:
    return Detector.load(tiny_ckpt, device="cpu")


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    img, pts = blobs(520, 640, 60, seed=3)
    path = write_pyramidal_tiff(tmp_path_factory.mktemp("slide") / "planted.tif", img, 0.25, tile=256,
                                downsamples=(1, 4), compression="none", flavor="generic")
    return path, img, pts


def _sorted(xy: np.ndarray) -> np.ndarray:
    return xy[np.lexsort(xy.T[::-1])]


def _detect(argv: list[str]) -> int:
    from denuc.cli import main

    return main(["detect", *argv, *([] if "--detector" in argv else ["--detector", str(_DET[0])])])


def test_pyramidal_slide_gives_the_whole_image_points_exactly_once(slide, detector: Detector, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, img, pts = slide
    ref = detector.detect(img, 0.25)  # one whole-image pass in memory
    out = tmp_path / "out"
    assert _detect([str(path), "--out", str(out), "--tile-px", "192", "--format", "csv,geojson"]) == 0
    got = Nuclei.read_csv(out / "planted.csv")
    summary = json.loads((out / "planted.summary.json").read_text())
    assert summary["tiles"]["selected"] >= 4  # really tiled
    assert "resolution" in summary["mpp_source"].lower() or "tiff" in summary["mpp_source"].lower()
    assert summary["mpp"] == pytest.approx(0.25)
    assert len(ref) > 100  # points all over the image, across every tile border
    np.testing.assert_array_equal(_sorted(got.xy), _sorted(ref.xy))  # identical to the whole pass, level-0 px
    assert len(cKDTree(got.xy).query_pairs(4.0)) == 0  # none twice across tile borders
    import gzip

    gj = json.loads(gzip.decompress((out / "planted.geojson.gz").read_bytes()))
    assert len(gj["features"]) == len(got)


def test_other_resolution_is_resampled_exactly_as_a_whole_pass(tmp_path: Path) -> None:
    img, _ = blobs(150, 210, 10, seed=5, r=2.5)  # nuclei of a 0.5 µm/px scan
    path = write_pyramidal_tiff(tmp_path / "half.tif", img, 0.5, tile=128, downsamples=(1, 2), compression="none",
                                flavor="aperio")
    ckpt = tiny_detector_checkpoint(tmp_path / "tiny025.safetensors", score_threshold=0.3, mpp=0.25)
    ref = Detector.load(ckpt, device="cpu").detect(img, 0.5)  # upsampled to the detector's 0.25 µm/px
    out = tmp_path / "o"
    # every tile (the random detector also finds points on glass, which a whole pass keeps)
    assert _detect([str(path), "--out", str(out), "--tile-px", "192", "--tissue", "none", "--detector", str(ckpt)]) == 0
    got = Nuclei.read_csv(out / "half.csv")

    assert len(got) == len(ref) > 100
    np.testing.assert_allclose(_sorted(got.xy), _sorted(ref.xy), atol=1e-9)


def test_no_tissue_gives_empty_outputs_and_a_summary_saying_so(tmp_path: Path) -> None:
    white = np.full((600, 800, 3), 245, np.uint8)
    path = write_pyramidal_tiff(tmp_path / "glass.tif", white, 0.25, tile=256, downsamples=(1, 4),
                                compression="jpeg", flavor="aperio")
    out = tmp_path / "o"
    assert _detect([str(path), "--out", str(out)]) == 0
    s = json.loads((out / "glass.summary.json").read_text())
    assert s["tiles"]["selected"] == 0 and s.get("no_tissue") is True
    assert Nuclei.read_csv(out / "glass.csv").xy.shape == (0, 2)


def test_missing_mpp_is_one_line_naming_the_file_and_leaves_nothing(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    img, _ = blobs(200, 200, 5)
    path = write_pyramidal_tiff(tmp_path / "nompp.tif", img, None, tile=128, downsamples=(1,), compression="none",
                                flavor="generic")
    out = tmp_path / "o"
    assert _detect([str(path), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert any(str(path) in line and "--mpp" in line for line in err)
    assert not [p for p in out.iterdir() if not p.name.startswith(".")]  # no partial output
    assert not list(out.glob(".*.partial"))
    assert _detect([str(path), "--out", str(out), "--mpp", "0.25"]) == 0  # --mpp supplies it


def _run_cli(args: list[str], nice: int = 0) -> subprocess.Popen[bytes]:
    """``python -m denuc ARGS --detector <tiny>`` in a new process, ``nice`` below this one."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}  # same thread count as this process: same floats
    return subprocess.Popen([sys.executable, "-m", "denuc", *args, "--detector", str(_DET[0])], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=(lambda: os.nice(nice)) if nice else None)


def test_kill_mid_slide_then_rerun_equals_an_uninterrupted_run(slide, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _, _ = slide
    opts = ["--tile-px", "64", "--chunk-tiles", "1"]
    full = tmp_path / "full"
    assert _detect([str(path), "--out", str(full), *opts]) == 0
    out = tmp_path / "o"
    proc = _run_cli(["detect", str(path), "--out", str(out), *opts, "--workers", "1"], nice=5)
    journal = out / ".planted.partial"
    deadline = time.time() + 600  # generous: the worker's start-up alone is slow on a loaded machine
    while time.time() < deadline and proc.poll() is None and not list(journal.glob("chunk-*.npz")):
        time.sleep(0.01)
    if proc.poll() is None:  # (a worker that ended already is reported below)
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    done_before = len(list(journal.glob("chunk-*.npz")))
    assert done_before >= 1 and not (out / "planted.csv").exists()  # killed mid-slide
    assert _detect([str(path), "--out", str(out), *opts]) == 0
    a = Nuclei.read_csv(full / "planted.csv")
    b = Nuclei.read_csv(out / "planted.csv")
    np.testing.assert_array_equal(_sorted(a.xy), _sorted(b.xy))
    s = json.loads((out / "planted.summary.json").read_text())
    assert s["resumed_tiles"] >= done_before
    assert not journal.exists() and not list(out.glob(".*.claim"))


def test_two_runs_on_one_out_folder_share_the_inputs(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    inputs.mkdir()
    for k in range(4):
        img, _ = blobs(160, 200, 6, seed=k)
        write_pyramidal_tiff(inputs / f"s{k}.tif", img, 0.25, tile=128, downsamples=(1,), compression="none",
                             flavor="generic")
    out = tmp_path / "o"
    procs = [_run_cli(["detect", str(inputs), "--out", str(out)]) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
    for k in range(4):
        n = Nuclei.read_csv(out / f"s{k}.csv")
        assert len(n) >= 5
        assert json.loads((out / f"s{k}.summary.json").read_text())["tiles"]["selected"] >= 1
    assert not list(out.glob(".*.claim")) and not list(out.glob(".*.partial"))
    assert (out / "summary.csv").is_file()


def _square(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def test_roi_with_a_hole_keeps_only_nuclei_inside_and_names_them(slide, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path, _, _ = slide
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"objectType": "annotation", "name": "bed"},
         "geometry": {"type": "Polygon", "coordinates": [_square(0, 0, 400, 400), _square(100, 100, 300, 300)]}},
        {"type": "Feature", "properties": {"classification": {"name": "margin"}},
         "geometry": {"type": "Polygon", "coordinates": [_square(450, 0, 640, 520)]}}]}))
    full, out = tmp_path / "full", tmp_path / "roi"
    assert _detect([str(path), "--out", str(full), "--tile-px", "192"]) == 0
    assert _detect([str(path), "--out", str(out), "--tile-px", "192", "--roi", str(roi), "--format", "csv,parquet"]) == 0
    a = Nuclei.read_csv(full / "planted.csv")
    b = Nuclei.read_csv(out / "planted.csv")
    x, y = a.xy[:, 0], a.xy[:, 1]
    in_bed = (x < 400) & (y < 400) & ~((x >= 100) & (x < 300) & (y >= 100) & (y < 300))
    in_margin = (x >= 450) & (y < 520)
    assert 0 < len(b) == int(in_bed.sum() + in_margin.sum())
    assert b.roi is not None and set(b.roi) <= {"bed", "margin"}
    bx, by = b.xy[:, 0], b.xy[:, 1]
    assert not ((bx >= 100) & (bx < 300) & (by >= 100) & (by < 300)).any()  # the hole
    np.testing.assert_array_equal(b.roi == "bed", bx < 400)
    s = json.loads((out / "planted.summary.json").read_text())
    assert s["rois"]["bed"]["nuclei"] == int(in_bed.sum()) and s["rois"]["margin"]["nuclei"] == int(in_margin.sum())
    import pandas as pd

    pq = pd.read_parquet(out / "planted.parquet")
    assert len(pq) == len(b) and set(pq["roi"]) == set(b.roi)


@pytest.mark.parametrize("content, match", [
    ({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
                                                  "geometry": {"type": "Point", "coordinates": [1, 2]}}]}, "polygon"),
    ({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {}, "geometry": {
        "type": "Polygon", "coordinates": [_square(5000, 5000, 6000, 6000)]}}]}, "outside"),
])
def test_bad_roi_is_one_line_naming_the_file_with_no_partial_output(slide, tmp_path: Path, content: dict, match: str,  # type: ignore[no-untyped-def,type-arg]
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = slide
    roi = tmp_path / "bad.geojson"
    roi.write_text(json.dumps(content))
    out = tmp_path / "o"
    assert _detect([str(path), "--out", str(out), "--roi", str(roi)]) == 1
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "error" in x and "bad.geojson" in x)
    assert match in line.lower() and "Traceback" not in err
    assert not list(out.iterdir())


def test_truncated_slide_is_one_line_and_the_others_go_on(slide, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    path, _, _ = slide
    d = tmp_path / "in"
    d.mkdir()
    data = path.read_bytes()
    (d / "cut.tif").write_bytes(data[: len(data) // 2])
    img, _ = blobs(120, 150, 4)
    write_pyramidal_tiff(d / "ok.tif", img, 0.25, tile=128, downsamples=(1,), compression="none", flavor="generic")
    out = tmp_path / "o"
    assert _detect([str(d), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert any("cut.tif" in x and "error" in x for x in err.splitlines()) and "Traceback" not in err
    assert (out / "ok.csv").is_file() and not list(out.glob("cut.*"))
    assert "1 of 2 input(s) failed; 1 written" in err


def test_tiny_and_gray_images_are_processed_with_a_warning(tmp_path: Path) -> None:
    from PIL import Image

    d = tmp_path / "in"
    d.mkdir()
    Image.new("RGB", (1, 1), (200, 100, 200)).save(d / "dot.png")
    Image.new("L", (64, 64), 128).save(d / "gray.png")
    with pytest.warns(UserWarning) as rec:
        assert _detect([str(d), "--out", str(tmp_path / "o"), "--mpp", "0.5"]) == 0
    text = " ".join(str(w.message) for w in rec)
    assert "dot.png" in text and "gray.png" in text and "grayscale" in text.lower()
    assert (tmp_path / "o" / "dot.csv").is_file() and (tmp_path / "o" / "gray.csv").is_file()


def test_python_api_streams_a_slide_and_matches_the_cli(tmp_path: Path) -> None:
    from denuc.encode import build_encoder
    from denuc.encode.tiny import register_tiny
    from denuc.pipeline import DeNuC
    from denuc.stream.job import RunOptions
    from denuc.train.head import HeadTrainConfig
    from denuc.train.head_run import train_head
    from synthetic import make_blob_dataset

    register_tiny()
    img, _ = blobs(256, 320, 12, seed=3)  # a smaller slide than the others': every point is encoded
    path = write_pyramidal_tiff(tmp_path / "planted.tif", img, 0.25, tile=128, downsamples=(1, 4),
                                compression="none", flavor="generic")
    ds = make_blob_dataset(tmp_path / "blobs", n_images=4)
    enc = build_encoder("tiny-uni", weights="random")
    head = tmp_path / "head.safetensors"
    train_head(ds, enc, head, cache_dir=tmp_path / "cache", config=HeadTrainConfig(epochs=2), window=64,
               log=lambda m: None)
    # 128 px detector windows (stride 64), so that this small slide makes several tiles
    model = DeNuC.load(_DET[0], encoder="tiny-uni", head=head, weights="random", device="cpu", detector_window=128)
    whole = model(img, mpp=0.25)  # the array as one image
    every = RunOptions(tissue="none")  # every tile: the random detector also finds points on glass
    nuc, summary = model.predict_slide(path, tile_px=64, opts=every)  # the slide file, tiled
    assert summary["tiles"]["selected"] >= 4 and nuc.mpp == pytest.approx(0.25)
    ia, ib = np.lexsort(whole.xy.T[::-1]), np.lexsort(nuc.xy.T[::-1])
    np.testing.assert_array_equal(whole.xy[ia], nuc.xy[ib])
    assert whole.probs is not None and nuc.probs is not None
    np.testing.assert_allclose(whole.probs[ia], nuc.probs[ib], atol=1e-5)
    chunks = list(model.iter_slide(path, tile_px=64, opts=every))
    assert sum(len(c) for c in chunks) == len(nuc) and len(chunks) >= 1
    # a slide with no tissue: an empty result with zero counts, not a crash
    glass = write_pyramidal_tiff(tmp_path / "glass.tif", np.full((256, 320, 3), 245, np.uint8), 0.25, tile=128,
                                 downsamples=(1, 4), compression="none", flavor="generic")
    empty, s = model.predict_slide(glass, tile_px=64)
    assert len(empty) == 0 and s["tiles"]["selected"] == 0 and s["nuclei"] == 0
    assert set(s["counts"].values()) == {0}
