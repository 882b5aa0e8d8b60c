"""Cells as data: the ``h5ad`` output (rows, positions and the features the head classified),
the ``density`` grid, tiled vs whole-image passes and resume after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from denuc.classify.head import HeadMeta, PointHead, load_head, save_head
from denuc.core.result import Nuclei
from denuc.encode import build_encoder
from denuc.encode.tiny import register_tiny
from denuc.sinks.anndata import read_h5ad_table
from denuc.source.testslide import write_pyramidal_tiff

pytest.importorskip("h5py")
pytestmark = pytest.mark.slow
register_tiny()
ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("a", "b", "c")


def blobs(h: int, w: int, n: int, seed: int = 0, r: float = 3.0) -> np.ndarray:
    """An H&E-like image with ``n`` dark nuclei of radius ``r`` px at random places."""
    rng = np.random.default_rng(seed)
    img = np.empty((h, w, 3), np.float32)
    img[:] = (235, 200, 220)
    yy, xx = np.mgrid[0:h, 0:w]
    for x, y in rng.uniform([8, 8], [w - 8, h - 8], size=(n, 2)):
        a = np.exp(-((xx + 0.5 - x) ** 2 + (yy + 0.5 - y) ** 2) / (2 * (r / 1.5) ** 2))[..., None]
        img = img * (1 - a) + rng.uniform([40, 20, 90], [120, 80, 160]) * a
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from model_fixtures import tiny_detector_checkpoint

    root = tmp_path_factory.mktemp("cells")
    det = tiny_detector_checkpoint(root / "det.safetensors", score_threshold=0.44)  # random: ~100 points
    enc = build_encoder("tiny-uni", weights="random")
    torch.manual_seed(0)
    head = PointHead(enc.dim, len(CLASSES))
    torch.nn.init.normal_(head.net[1].weight, std=3.0)  # random, but its probabilities differ between nuclei
    meta = HeadMeta(classes=list(CLASSES), colors=[[255, 0, 0], [0, 0, 255], [0, 160, 0]], encoder=enc.name,
                    weights_hash=enc.weights_hash, weights_source=enc.weights_ref, dim=enc.dim, mpp=0.5,
                    window=64, stride=48, align="center", input_size=enc.input_size)
    save_head(root / "head.safetensors", head, meta)
    img = blobs(384, 400, 40, seed=3)
    slide = write_pyramidal_tiff(root / "planted.tif", img, 0.5, tile=128, downsamples=(1, 2), compression="none",
                                 flavor="generic")
    from PIL import Image

    Image.fromarray(img).save(root / "planted.png")
    s = {"root": root, "det": det, "head": root / "head.safetensors", "slide": slide, "png": root / "planted.png"}
    s["tiled"] = root / "tiled"
    s["whole"] = root / "whole"
    assert predict(s, [str(slide), "--out", str(s["tiled"]), "--tile-px", "96", "--format", "csv,h5ad",
                       "--embeddings", "float32", "--density-grid", "40"]) == 0
    assert predict(s, [str(s["png"]), "--out", str(s["whole"]), "--mpp", "0.5", "--format", "h5ad",
                       "--embeddings", "float32"]) == 0
    return s


def model_args(s: dict[str, Any]) -> list[str]:
    return ["--detector", str(s["det"]), "--encoder", "tiny-uni", "--weights", "random", "--head", str(s["head"]),
            "--runtime", "torch", "--device", "cpu", "--no-overlay", "--tissue", "none"]


def predict(s: dict[str, Any], argv: list[str]) -> int:
    from denuc.cli import main

    return main(["predict", *argv, *model_args(s)])


def order(xy: np.ndarray) -> np.ndarray:
    return np.lexsort(xy.T[::-1])


def test_h5ad_rows_positions_and_features_are_what_the_head_classified(setup: dict[str, Any]) -> None:
    out = setup["tiled"]
    csv = Nuclei.read_csv(out / "planted.csv", class_names=CLASSES)
    got = read_h5ad_table(out / "planted.h5ad")
    summary = json.loads((out / "planted.summary.json").read_text())
    assert summary["tiles"]["selected"] >= 4 and len(csv) > 10  # really tiled, and nuclei to check
    obs = got["obs"]
    assert list(obs.index) == [str(i) for i in range(len(csv))]
    assert list(obs["class"].astype(str)) == csv.classes  # same rows, same order
    assert csv.probs is not None and csv.probs.std(0).max() > 1e-3  # the probabilities differ between nuclei
    np.testing.assert_array_equal(got["spatial"], csv.xy)  # obsm['spatial'] = CSV (x, y), level-0 px
    np.testing.assert_array_equal(obs["score"].to_numpy(), csv.scores)
    np.testing.assert_array_equal(obs[[f"prob_{c}" for c in CLASSES]].to_numpy(), csv.probs)
    x = got["X_denuc"]
    assert x is not None and x.dtype == np.float32 and x.shape == (len(csv), 32)
    head, _, _ = load_head(setup["head"])
    with torch.inference_mode():
        p = torch.softmax(head(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(p, csv.probs, atol=1e-6)  # head(X_denuc) gives the written probabilities
    u = got["uns"]["denuc"]
    assert u["encoder"] == "tiny-uni" and u["embeddings"] == "float32" and u["working_mpp"] == pytest.approx(0.5)
    assert u["mpp"] == pytest.approx(0.5) and u["taps"] and len(u["head_sha256"]) == 64
    assert u["summary"]["tiles"] == summary["tiles"]


def test_tile_column_holds_plan_indices_whose_cores_hold_the_nuclei(setup: dict[str, Any]) -> None:
    """obs['tile'] is the plan index of the tile whose core owns each nucleus: the cores in
    uns are the plan's, every nucleus lies in its own tile's core and strictly inside no other.
    (The kill-and-resume test below compares whole obs tables, tile included, between a run in
    chunks of 8 tiles and a resumed one in chunks of 1: the ids depend on neither.)"""
    from denuc.detect.api import Detector
    from denuc.source import open_source
    from denuc.stream.runner import TileStream

    got = read_h5ad_table(setup["tiled"] / "planted.h5ad")
    tiles = got["obs"]["tile"].to_numpy()
    u = got["uns"]["denuc"]["tiles"]
    with open_source(setup["slide"]) as src:
        plan = TileStream(Detector.load(setup["det"], device="cpu"), tile_px=96).plan(src)
    cores = plan.core_boxes_level0()
    np.testing.assert_array_equal(u["core_level0"], cores)
    assert list(u["grid"]) == [plan.xs.count, plan.ys.count] and plan.count >= 4
    assert tiles.dtype.kind == "i" and len(tiles) == len(got["spatial"])
    assert tiles.min() >= 0 and tiles.max() < plan.count
    assert len(np.unique(tiles)) >= 2  # nuclei from several tiles
    x, y = got["spatial"].T
    own = cores[tiles]
    assert ((x >= own[:, 0]) & (x <= own[:, 2]) & (y >= own[:, 1]) & (y <= own[:, 3])).all()
    strictly = ((x[:, None] > cores[None, :, 0]) & (x[:, None] < cores[None, :, 2])
                & (y[:, None] > cores[None, :, 1]) & (y[:, None] < cores[None, :, 3]))  # (N, T)
    strictly[np.arange(len(tiles)), tiles] = False
    assert not strictly.any()
    whole = read_h5ad_table(setup["whole"] / "planted.h5ad")  # one tile
    assert set(whole["obs"]["tile"]) == {0} and list(whole["uns"]["denuc"]["tiles"]["grid"]) == [1, 1]


def test_h5ad_tile_column_needs_tile_ids_in_range() -> None:
    from denuc.errors import InputError
    from denuc.sinks import OutputInfo
    from denuc.sinks.anndata import AnnDataSink

    def sink(tmp: Path) -> AnnDataSink:
        info = OutputInfo("s", tmp, "image", ("x",), {}, 0.5, (100, 100),
                          sink_options={"tile_cores": np.array([[0, 0, 50, 100], [50, 0, 100, 100.0]]),
                                        "tile_grid": (2, 1)})
        return AnnDataSink(info)

    import tempfile

    with tempfile.TemporaryDirectory() as d:
        pts = Nuclei(np.array([[10.0, 10.0], [60.0, 10.0]]), class_ids=np.array([0, 0]), class_names=("x",))
        for bad in (None, np.array([0, 2]), np.array([0])):
            chunk = pts.select(slice(None))
            if bad is not None:
                chunk.meta["tile"] = bad
            with pytest.raises(InputError, match="tile"):
                sink(Path(d)).write(chunk)
        s = sink(Path(d))
        pts.meta["tile"] = np.array([0, 1])
        s.write(pts)
        s.write(Nuclei.empty(("x",)))  # an empty chunk needs no tile ids
        got = read_h5ad_table(s.close({}))
        assert list(got["obs"]["tile"]) == [0, 1]


def test_h5ad_opens_with_anndata(setup: dict[str, Any]) -> None:
    ad = pytest.importorskip("anndata", reason="pip install 'denuc[anndata]' (the dev extra installs it)")
    a = ad.read_h5ad(setup["tiled"] / "planted.h5ad")
    csv = Nuclei.read_csv(setup["tiled"] / "planted.csv", class_names=CLASSES)
    assert a.n_obs == len(csv) and a.obsm["X_denuc"].shape == (len(csv), 32)
    np.testing.assert_array_equal(a.obsm["spatial"], csv.xy)
    assert list(a.obs["class"].astype(str)) == [CLASSES[k] for k in csv.class_ids]
    probs = a.obs[[f"prob_{c}" for c in CLASSES]].to_numpy()
    np.testing.assert_allclose(probs, csv.probs, atol=1e-6)
    assert a.uns["denuc"]["encoder"] == "tiny-uni"


def test_tiled_slide_and_whole_image_give_the_same_table(setup: dict[str, Any]) -> None:
    whole = setup["whole"]
    a, b = read_h5ad_table(setup["tiled"] / "planted.h5ad"), read_h5ad_table(whole / "planted.h5ad")
    assert json.loads((whole / "planted.summary.json").read_text())["tiles"]["selected"] == 1
    ia, ib = order(a["spatial"]), order(b["spatial"])
    np.testing.assert_array_equal(a["spatial"][ia], b["spatial"][ib])
    assert list(a["obs"]["class"].astype(str).to_numpy()[ia]) == list(b["obs"]["class"].astype(str).to_numpy()[ib])
    np.testing.assert_allclose(a["X_denuc"][ia], b["X_denuc"][ib], atol=1e-4)
    np.testing.assert_allclose(a["obs"]["score"].to_numpy()[ia], b["obs"]["score"].to_numpy()[ib], atol=1e-5)


def test_embeddings_float16_by_default_and_none_leaves_them_out(setup: dict[str, Any]) -> None:
    ref = read_h5ad_table(setup["tiled"] / "planted.h5ad")
    half, none = setup["root"] / "half", setup["root"] / "none"
    args = [str(setup["slide"]), "--tile-px", "96", "--format", "h5ad"]
    assert predict(setup, [*args, "--out", str(half)]) == 0
    assert predict(setup, [*args, "--out", str(none), "--embeddings", "none"]) == 0
    h, n = read_h5ad_table(half / "planted.h5ad"), read_h5ad_table(none / "planted.h5ad")
    assert h["X_denuc"].dtype == np.float16 and h["uns"]["denuc"]["embeddings"] == "float16"
    np.testing.assert_array_equal(h["X_denuc"], ref["X_denuc"].astype(np.float16))  # the float32 values, rounded
    assert n["X_denuc"] is None and n["uns"]["denuc"]["embeddings"] == "none"
    np.testing.assert_array_equal(n["spatial"], ref["spatial"])


def test_density_grid_counts_sum_to_the_nuclei_of_the_analysed_area(setup: dict[str, Any]) -> None:
    out = setup["tiled"]
    csv = Nuclei.read_csv(out / "planted.csv", class_names=CLASSES)
    doc = json.loads((out / "planted.density.geojson").read_text())
    cells = [f["properties"]["measurements"] for f in doc["features"]]
    assert doc["grid_um"] == 40 and (doc["rows"], doc["cols"]) == (5, 5)  # 384 x 400 px at 0.5 µm/px, 80 px cells
    assert sum(m["Num nuclei"] for m in cells) == len(csv)  # an image: its whole area is analysed
    for k, c in enumerate(CLASSES):
        assert sum(m[f"Num {c}"] for m in cells) == int((csv.class_ids == k).sum())
    assert sum(m["Area µm^2"] for m in cells) == pytest.approx(384 * 400 * 0.25)
    # each nucleus lies in its cell: recount from the CSV
    g = 40 / 0.5
    cell = {f["id"]: f["properties"]["measurements"]["Num nuclei"] for f in doc["features"]}
    ij = np.floor(csv.xy[:, ::-1] / g).astype(int)
    for (i, j), n in zip(*np.unique(ij, axis=0, return_counts=True), strict=True):
        assert cell[f"cell-{i}-{j}"] == n
    m = cells[0]
    assert m["Density nuclei per mm^2"] == pytest.approx(m["Num nuclei"] / (m["Area µm^2"] / 1e6), rel=1e-3)
    for c in CLASSES:
        assert (out / f"planted.density.{c}.png").is_file()


def test_density_grid_is_counted_over_tissue_only() -> None:
    from denuc.sinks import OutputInfo
    from denuc.sinks.density import DensitySink

    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half is tissue, 10 px per mask pixel
    info = OutputInfo("s", Path("/nonexistent"), "slide", ("x",), {}, 0.5, (100, 100), tissue_mask=mask,
                      tissue_downsample=10.0, sink_options={"density_grid_um": 25})
    s = DensitySink(info)  # 50 px cells: 2 x 2
    area = s.area_um2()
    np.testing.assert_allclose(area, [[625.0, 0.0], [625.0, 0.0]])
    with pytest.raises(Exception, match="larger --density-grid"):
        DensitySink(OutputInfo("s", Path("/x"), "slide", ("x",), {}, 0.25, (400_000, 400_000),
                               sink_options={"density_grid_um": 1}))


def test_kill_mid_slide_then_rerun_gives_the_same_h5ad(setup: dict[str, Any]) -> None:
    out = setup["root"] / "killed"
    argv = ["predict", str(setup["slide"]), "--out", str(out), "--tile-px", "96", "--format", "csv,h5ad",
            "--embeddings", "float32", "--density-grid", "40", "--chunk-tiles", "1", *model_args(setup)]
    code = ("import sys; from denuc.encode.tiny import register_tiny; register_tiny(); from denuc.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", code, *argv, "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=lambda: os.nice(5))  # lower priority than this watcher: the kill is prompt
    journal = out / ".planted.partial"
    deadline = time.time() + 600  # generous: the worker's start-up alone is slow on a loaded machine
    while time.time() < deadline and len(list(journal.glob("chunk-*.npz"))) < 2 and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is None:  # (a run that ended already is reported below)
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
    done_before = len(list(journal.glob("chunk-*.npz")))
    assert done_before >= 2 and not (out / "planted.h5ad").exists()
    from denuc.cli import main

    assert main(argv) == 0
    assert json.loads((out / "planted.summary.json").read_text())["resumed_tiles"] >= done_before
    a, b = read_h5ad_table(setup["tiled"] / "planted.h5ad"), read_h5ad_table(out / "planted.h5ad")
    np.testing.assert_array_equal(a["spatial"], b["spatial"])
    np.testing.assert_array_equal(a["X_denuc"], b["X_denuc"])
    assert a["obs"].equals(b["obs"])
    da = json.loads((setup["tiled"] / "planted.density.geojson").read_text())
    db = json.loads((out / "planted.density.geojson").read_text())
    assert da["features"] == db["features"]


def embed(s: dict[str, Any], argv: list[str]) -> int:
    from denuc.cli import main

    return main(["embed", *argv, "--encoder", "tiny-uni", "--weights", "random", "--head", str(s["head"]),
                 "--runtime", "torch", "--device", "cpu"])


def test_embed_at_given_points_gives_the_features_of_a_predict_run(setup: dict[str, Any]) -> None:
    whole = setup["root"] / "whole-emb"
    assert predict(setup, [str(setup["png"]), "--out", str(whole), "--mpp", "0.5", "--format", "csv,h5ad",
                           "--embeddings", "float32"]) == 0
    ref = read_h5ad_table(whole / "planted.h5ad")
    out = setup["root"] / "emb"
    assert embed(setup, [str(setup["png"]), "--points", str(whole / "planted.csv"), "--mpp", "0.5",
                         "--out", str(out), "--embeddings", "float32"]) == 0
    got = read_h5ad_table(out / "planted.h5ad")
    np.testing.assert_array_equal(got["spatial"], ref["spatial"])  # the given points, in their order
    np.testing.assert_allclose(got["X_denuc"], ref["X_denuc"], atol=1e-4)
    assert list(got["obs"]["class"]) == list(ref["obs"]["class"])
    assert list(got["obs"]["label"]) == list(ref["obs"]["class"].astype(str))  # the CSV's own classes
    assert got["uns"]["denuc"]["working_mpp"] == pytest.approx(0.5)


def test_embed_reads_qupath_points_and_refuses_points_outside(setup: dict[str, Any],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from denuc.pipeline import DeNuC

    gj = setup["root"] / "pts.geojson"
    feats = [{"type": "Feature", "geometry": {"type": "Point", "coordinates": xy},
              "properties": {"objectType": "detection", **({"classification": {"name": c}} if c else {})}}
             for xy, c in (([20.5, 30.5], "tumour"), ([100.0, 50.0], None), ([200.0, 300.0], "lymph"))]
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    model = DeNuC.load(detector=object(), encoder="tiny-uni", weights="random", head=setup["head"], device="cpu",
                       runtime="torch")  # type: ignore[arg-type]
    nuc = model.embed(setup["png"], gj, mpp=0.5)
    assert nuc.features is not None and nuc.features.shape == (3, 32)
    assert list(nuc.meta["labels"]) == ["tumour", "", "lymph"]
    img = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(setup["png"]).convert("RGB"))
    direct = model.classify(img, 0.5, Nuclei(np.array([[20.5, 30.5], [100.0, 50.0], [200.0, 300.0]])),
                            features=True)
    np.testing.assert_array_equal(nuc.features, direct.features)
    gj.write_text(json.dumps({"type": "FeatureCollection", "features": feats[:1] + [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5000.0, 1.0]}, "properties": {}}]}))
    out = setup["root"] / "emb-bad"
    assert embed(setup, [str(setup["png"]), "--points", str(gj), "--mpp", "0.5", "--out", str(out)]) == 2
    assert "outside" in capsys.readouterr().err
    assert not list(out.glob("*.h5ad"))


def test_detect_writes_h5ad_without_features(setup: dict[str, Any]) -> None:
    from denuc.cli import main

    out = setup["root"] / "det-only"
    assert main(["detect", str(setup["png"]), "--out", str(out), "--mpp", "0.5", "--format", "csv,h5ad",
                 "--detector", str(setup["det"]), "--runtime", "torch", "--device", "cpu", "--no-overlay"]) == 0
    got = read_h5ad_table(out / "planted.h5ad")
    csv = Nuclei.read_csv(out / "planted.csv")
    assert got["X_denuc"] is None and got["uns"]["denuc"]["embeddings"] == "none"
    np.testing.assert_array_equal(got["spatial"], csv.xy)
    assert len(csv) > 10


def test_density_grid_area_is_tissue_and_roi() -> None:
    """With ROIs a cell's area is tissue ∩ ROIs: a square ROI over the top-left cell only leaves
    the other tissue cell with no analysed area (the counts hold only nuclei inside the ROI)."""
    import shapely

    from denuc.sinks import OutputInfo
    from denuc.sinks.density import DensitySink
    from denuc.source.area import AnalysedArea
    from denuc.source.roi import RegionsOfInterest
    from denuc.source.tissue import TissueMask

    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True  # left half is tissue, 10 px per mask pixel
    roi = RegionsOfInterest([shapely.box(0, 0, 50, 50)], ["a"])
    area = AnalysedArea(TissueMask(mask=mask, downsample=10.0, method="auto"), roi, (100, 100), 0.5)
    info = OutputInfo("s", Path("/nonexistent"), "slide", ("x",), {}, 0.5, (100, 100), tissue_mask=mask,
                      tissue_downsample=10.0, analysed_mask=area.mask(), sink_options={"density_grid_um": 25})
    got = DensitySink(info).area_um2()
    np.testing.assert_allclose(got, [[625.0, 0.0], [0.0, 0.0]])
    assert got.sum() == pytest.approx(area.analysed_area_um2)


# --------------------------------------------------------------------------- spatialdata
def roi_with_hole(path: Path) -> Path:
    """A QuPath GeoJSON of one region with a hole over the left part of the planted slide
    (400 x 384 px; the random detector's points lie along its edges, the hole cuts some off)."""
    outer = [[0.0, 0.0], [250.0, 0.0], [250.0, 384.0], [0.0, 384.0], [0.0, 0.0]]
    hole = [[100.0, 8.0], [200.0, 8.0], [200.0, 16.0], [100.0, 16.0], [100.0, 8.0]]
    feat = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [outer, hole]},
            "properties": {"objectType": "annotation", "name": "ring"}}
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [feat]}))
    return path


@pytest.fixture(scope="module")
def sdata_run(setup: dict[str, Any]) -> dict[str, Any]:
    pytest.importorskip("spatialdata", reason="pip install 'denuc[spatialdata]' (the dev extra installs it)")
    roi = roi_with_hole(setup["root"] / "ring.geojson")
    out = setup["root"] / "sdata"
    argv = [str(setup["slide"]), "--out", str(out), "--tile-px", "96", "--format", "csv,h5ad,spatialdata",
            "--embeddings", "float32", "--roi", str(roi)]
    assert predict(setup, argv) == 0
    return {"out": out, "argv": argv, "roi": roi}


def test_spatialdata_store_holds_the_points_the_linked_table_and_the_shapes(setup: dict[str, Any],
                                                                             sdata_run: dict[str, Any]) -> None:
    import shapely
    import spatialdata
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import get_transformation

    from denuc.source.roi import load_rois

    out = sdata_run["out"]
    sd = spatialdata.read_zarr(out / "planted.zarr")
    csv = Nuclei.read_csv(out / "planted.csv", class_names=CLASSES)
    h5 = read_h5ad_table(out / "planted.h5ad")
    assert len(csv) > 10
    pts = sd.points["nuclei"].compute()
    np.testing.assert_array_equal(pts[["x", "y"]].to_numpy(), csv.xy)  # level-0 px, the CSV's order
    table = sd.tables["table"]
    assert list(table.obs["class"].astype(str)) == csv.classes  # the CSV's rows, in order
    for c in h5["obs"].columns:  # the h5ad's obs, tile included
        np.testing.assert_array_equal(table.obs[c].to_numpy(), h5["obs"][c].to_numpy())
    np.testing.assert_array_equal(table.obsm["spatial"], csv.xy)
    np.testing.assert_array_equal(table.obsm["X_denuc"], h5["X_denuc"])
    region, region_key, instance_key = get_table_keys(table)
    assert region == "nuclei" and set(table.obs[region_key]) == {"nuclei"}
    _, joined = spatialdata.join_spatialelement_table(sdata=sd, spatial_element_names="nuclei", table_name="table",
                                                      how="left", match_rows="left")
    np.testing.assert_array_equal(joined.obs[instance_key].to_numpy(), pts.index.to_numpy())
    np.testing.assert_array_equal(joined.obsm["spatial"], pts[["x", "y"]].to_numpy())  # row i is point i
    mpp = json.loads((out / "planted.summary.json").read_text())["mpp"]
    for name in ("global", "micrometers"):
        m = get_transformation(sd.points["nuclei"], to_coordinate_system=name).to_affine_matrix(
            input_axes=("x", "y"), output_axes=("x", "y"))
        np.testing.assert_allclose(m, np.diag([1.0, 1.0, 1.0]) if name == "global" else np.diag([mpp, mpp, 1.0]))
    assert table.uns["denuc"]["slide"] == str(setup["slide"]) == sd.attrs["denuc"]["slide"]
    assert table.uns["denuc"]["encoder"] == "tiny-uni"
    roi = sd.shapes["rois"]
    given = load_rois(sdata_run["roi"]).geoms[0]
    assert list(roi["name"]) == ["ring"] and shapely.equals(roi.geometry.iloc[0], given)
    assert len(roi.geometry.iloc[0].interiors) == 1  # the hole is kept
    assert not shapely.contains_xy(shapely.Polygon(given.interiors[0]), csv.xy[:, 0], csv.xy[:, 1]).any()
    tissue = sd.shapes["tissue"]  # --tissue none: the whole slide
    assert shapely.union_all(tissue.geometry.to_numpy()).area == pytest.approx(400 * 384)


def test_spatialdata_rerun_is_skipped_a_failed_store_leaves_nothing_and_resumes(
        setup: dict[str, Any], sdata_run: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    import spatialdata

    from denuc.sinks.spatialdata import SpatialDataSink

    out, argv = sdata_run["out"], sdata_run["argv"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert predict(setup, argv) == 0  # finished with the same settings: skipped
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    again = setup["root"] / "sdata-again"
    argv2 = [again if a == str(out) else a for a in argv] + ["--chunk-tiles", "1"]
    argv2 = [str(a) for a in argv2]
    real = SpatialDataSink._write_store

    def half_then_fail(self: SpatialDataSink, summary: dict[str, Any]) -> None:
        real(self, summary)  # the temporary store is complete ...
        raise OSError("disk full")  # ... but the close fails

    monkeypatch.setattr(SpatialDataSink, "_write_store", half_then_fail)
    assert predict(setup, argv2) != 0
    assert sorted(p.name for p in again.iterdir()) == [".planted.partial"]  # no output, no temporary left
    monkeypatch.setattr(SpatialDataSink, "_write_store", real)
    assert predict(setup, argv2) == 0
    assert json.loads((again / "planted.summary.json").read_text())["resumed_tiles"] > 0
    a, b = spatialdata.read_zarr(out / "planted.zarr"), spatialdata.read_zarr(again / "planted.zarr")
    np.testing.assert_array_equal(a.points["nuclei"].compute().to_numpy(), b.points["nuclei"].compute().to_numpy())
    assert a.tables["table"].obs.equals(b.tables["table"].obs)
    np.testing.assert_array_equal(a.tables["table"].obsm["X_denuc"], b.tables["table"].obsm["X_denuc"])
    assert sorted(p.name for p in again.iterdir() if p.name.startswith(".")) == []
