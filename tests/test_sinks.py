"""Output sinks: every sink with 0, 1 and several chunks; exact CSV round trip; QuPath GeoJSON
rules (plain and gzip); Parquet schema; summary counts and densities; overlay pixels; atomic
writes (abort and failed writes leave nothing); format names and output paths."""

from __future__ import annotations

import errno
import gzip
import io
import json
import sys
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from denuc.core.result import Nuclei
from denuc.errors import DenucError, InputError
from denuc.sinks import (
    ALWAYS,
    SINKS,
    CsvSink,
    GeoJsonSink,
    OutputInfo,
    OverlaySink,
    ParquetSink,
    Sink,
    SummarySink,
    output_paths,
    output_sinks,
    parse_formats,
    thumbnail_of,
)

CLS = ("lymphocyte", "tumor", "stromal")
COLORS = {"lymphocyte": (0, 160, 0), "tumor": (200, 0, 0), "stromal": (0, 90, 220)}
ALL: list[type[Sink]] = [CsvSink, GeoJsonSink, ParquetSink, SummarySink, OverlaySink]
W, H, MPP = 4000, 3000, 0.25


def info(tmp: Path, kind: str = "slide", rois: bool = True, **kw: Any) -> OutputInfo:
    base: dict[str, Any] = dict(thumbnail=np.full((300, 400, 3), 230, np.uint8), thumb_downsample=10.0,
                                tissue_area_um2=2e5, roi_areas_um2={"r1": 5e4, "r2": 0.0} if rois else None)
    base.update(kw)
    return OutputInfo("s1", tmp, kind, CLS, dict(COLORS), MPP, (W, H), **base)


def chunk(rng: np.random.Generator, n: int, rois: bool = True, det: bool = True) -> Nuclei:
    """``n`` classified nuclei (some unclassified) with awkward floats."""
    probs = rng.dirichlet(np.ones(3), n).astype(np.float32)
    ids = probs.argmax(1)
    ids[rng.random(n) < 0.1] = -1
    d = rng.random(n).astype(np.float32)
    xy = np.column_stack([rng.uniform(0, W, n), rng.uniform(0, H, n)])
    roi = np.array(["", "r1", "r2", "far, \"quoted\""], dtype=object)[rng.integers(0, 4, n)] if rois else None
    return Nuclei(xy, d * probs.max(1), ids, CLS, probs, MPP, det_scores=d if det else None, roi=roi)


def chunks(k: int, seed: int = 0, **kw: Any) -> list[Nuclei]:
    """0 chunks, 1 chunk, or ``k`` chunks of varied sizes with an empty one among them."""
    rng = np.random.default_rng(seed)
    sizes = {0: [], 1: [7]}.get(k, [5, 0, 11, 1, 3][:k])
    return [chunk(rng, n, **kw) for n in sizes]


def run(sinks: list[Sink], parts: list[Nuclei], summary: dict[str, Any] | None = None) -> list[Path]:
    for c in parts:
        for s in sinks:
            s.write(c)
    return [s.close(summary or {}) for s in sinks]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def expected(parts: list[Nuclei]) -> Nuclei:
    return Nuclei.concat(parts) if parts else chunk(np.random.default_rng(0), 0)


# ------------------------------------------------------------------ every sink
@pytest.mark.parametrize("k", [0, 1, 4])
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_every_sink_writes_only_its_final_file(tmp_path: Path, cls: type[Sink], k: int) -> None:
    sink = cls(info(tmp_path))
    [path] = run([sink], chunks(k))
    assert path == sink.path == tmp_path / f"s1{sink.suffix}" and path.stat().st_size > 0
    assert names(tmp_path) == [path.name]  # the temporary file is gone
    sink.abort()  # after close: nothing happens
    assert path.is_file()
    with pytest.raises(DenucError, match="already closed"):
        sink.write(chunks(1)[0])


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_abort_leaves_nothing(tmp_path: Path, cls: type[Sink]) -> None:
    sink = cls(info(tmp_path))
    for c in chunks(3):
        sink.write(c)
    sink.abort()
    sink.abort()
    assert names(tmp_path) == []
    with pytest.raises(DenucError, match="already aborted"):
        sink.close({})
    assert names(tmp_path) == []


class FullDisk(io.FileIO):
    """A file that fails with ENOSPC once more than ``limit`` bytes were written."""

    limit = 0

    def write(self, b: Any) -> int:
        if self.tell() + len(memoryview(b)) > self.limit:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(b)


@pytest.mark.parametrize("limit", [0, 300])
@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.__name__)
def test_a_failing_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                cls: type[Sink], limit: int) -> None:
    def open_full(self: Sink) -> Any:
        FullDisk.limit = limit
        self._fh = FullDisk(self._tmp, "wb")
        return self._fh

    monkeypatch.setattr(Sink, "_open_tmp", open_full)
    with pytest.raises(OSError, match="No space left"):
        s = cls(info(tmp_path))
        run([s], chunks(4) + chunks(1, seed=1) * 20)
    assert names(tmp_path) == []


def test_an_unwritable_folder_fails_at_open_naming_the_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    for cls in ALL:
        with pytest.raises(InputError, match=rf"{blocker}/s1.*: cannot write"):
            cls(info(blocker))
    assert names(tmp_path) == ["file"]


def test_output_sinks_aborts_the_opened_ones_when_one_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Sink, info: OutputInfo) -> None:
        raise InputError("broken")

    monkeypatch.setattr(SummarySink, "__init__", broken)
    with pytest.raises(InputError, match="broken"):
        output_sinks(info(tmp_path), ["csv", "geojson"])
    assert names(tmp_path) == []


def test_chunks_must_match_the_output(tmp_path: Path) -> None:
    other = Nuclei([[1.0, 2.0]], [0.5], [0], ("nucleus",))
    with pytest.raises(InputError, match=r"s1\.csv: a chunk has classes \['nucleus'\]"):
        CsvSink(info(tmp_path)).write(other)
    with pytest.raises(InputError, match="opened without ROIs"):
        CsvSink(info(tmp_path, rois=False)).write(chunks(1)[0])
    s = CsvSink(info(tmp_path))
    s.write(chunks(1)[0])
    with pytest.raises(InputError, match=r"carries \{score, prob_\*\} but the first one carried \{score, det_score"):
        s.write(chunks(1, det=False)[0])
    assert names(tmp_path) == []  # each failure aborted its output
    CsvSink(info(tmp_path)).write(Nuclei.empty(("nucleus",)))  # an empty chunk of other classes is fine


# ------------------------------------------------------------------ CSV
@pytest.mark.parametrize("k", [0, 1, 4])
def test_csv_round_trip_through_read_csv_is_exact(tmp_path: Path, k: int) -> None:
    parts = chunks(k)
    [p] = run([CsvSink(info(tmp_path))], parts)
    header = p.read_text().splitlines()[0]
    cols = ["x", "y", "x_um", "y_um", "class", "score", "det_score", *(f"prob_{c}" for c in CLS), "roi"]
    assert header == ",".join(cols if k else cols[:5] + ["roi"])  # no nuclei: no chunk told the fields
    back = Nuclei.read_csv(p, CLS)
    want = expected(parts)
    np.testing.assert_array_equal(back.xy, want.xy)  # float64 bit for bit
    np.testing.assert_array_equal(back.class_ids, want.class_ids)
    if k:
        for a in ("scores", "det_scores", "probs"):
            np.testing.assert_array_equal(getattr(back, a), getattr(want, a))  # float32 bit for bit
        assert back.roi.tolist() == want.roi.tolist()
        df = pd.read_csv(p, keep_default_na=False, float_precision="round_trip")
        np.testing.assert_allclose(df["x_um"], want.xy[:, 0] * MPP, rtol=0, atol=0)
        assert df["y_um"].tolist() == (want.xy[:, 1] * MPP).tolist()
    else:
        assert len(back) == 0


def test_csv_matches_nuclei_to_csv_text(tmp_path: Path) -> None:
    """Same numbers as Nuclei.to_csv writes, column for column."""
    parts = chunks(4)
    [p] = run([CsvSink(info(tmp_path))], parts)
    ours = pd.read_csv(p, dtype=str, keep_default_na=False)  # x_um, y_um included: to_csv writes them too
    ref_path = expected(parts).to_csv(tmp_path / "ref" / "ref.csv")
    ref = pd.read_csv(ref_path, dtype=str, keep_default_na=False)
    pd.testing.assert_frame_equal(ours, ref)


def test_csv_of_detection_only_chunks(tmp_path: Path) -> None:
    i = OutputInfo("d", tmp_path, "image", ("nucleus",), {}, 0.5, (100, 80))
    n = Nuclei([[1.5, 2.0], [99.25, 0.0]], [0.9, 0.25], [0, 0], ("nucleus",))
    [p] = run([CsvSink(i)], [Nuclei.empty(("nucleus",)), n])
    assert p.read_text().splitlines() == ["x,y,x_um,y_um,class,score", "1.5,2.0,0.75,1.0,nucleus,0.9",
                                          "99.25,0.0,49.625,0.0,nucleus,0.25"]
    back = Nuclei.read_csv(p)
    assert back.class_names == ("nucleus",) and back.det_scores is None and back.probs is None


# ------------------------------------------------------------------ GeoJSON
def read_geojson(p: Path) -> dict[str, Any]:
    raw = p.read_bytes()
    if p.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    return json.loads(raw)


@pytest.mark.parametrize("kind, suffix", [("slide", ".geojson.gz"), ("image", ".geojson")])
@pytest.mark.parametrize("k", [0, 1, 4])
def test_geojson_follows_qupaths_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str, suffix: str,
                                      k: int) -> None:
    monkeypatch.setattr("denuc.sinks.geojson.BATCH", 4)  # chunks are written in several batches
    parts = chunks(k)
    sink = GeoJsonSink(info(tmp_path, kind))
    [p] = run([sink], parts)
    assert p.name == f"s1{suffix}" and sink.suffix == suffix
    gj = read_geojson(p)
    want = expected(parts)
    assert set(gj) == {"type", "features"} and gj["type"] == "FeatureCollection"
    feats = gj["features"]
    assert len(feats) == len(want) == sink.features
    ids = [f["id"] for f in feats]
    assert len(set(ids)) == len(ids) and all(uuid.UUID(i).version == 4 for i in ids)
    for f, (x, y), cid in zip(feats, want.xy.tolist(), want.class_ids.tolist()):
        assert f["type"] == "Feature" and set(f) == {"type", "id", "geometry", "properties"}
        g = f["geometry"]
        assert g["type"] == "Point" and len(g["coordinates"]) == 2 and g["coordinates"] == [x, y]
        props = f["properties"]
        assert props["objectType"] == "detection"
        if cid >= 0:
            assert props["classification"] == {"name": CLS[cid], "color": list(COLORS[CLS[cid]])}
        else:
            assert "classification" not in props
        m = props["measurements"]
        assert all(isinstance(v, float) for v in m.values())
        assert {"Detection score", "Score (detection x class)", *(f"Prob {c}" for c in CLS)} <= set(m)
        assert ("Class probability" in m) == (cid >= 0)
    if k:
        m0 = feats[0]["properties"]["measurements"]
        assert np.float32(m0["Detection score"]) == want.det_scores[0]  # the detector's own confidence
        assert np.float32(m0["Score (detection x class)"]) == want.scores[0]
        from denuc.data.readers.generic import geojson_to_nuclei

        back = geojson_to_nuclei(p, CLS)  # DeNuC's own reader gets the CSV's values back
        np.testing.assert_array_equal(back.xy, want.xy)
        np.testing.assert_array_equal(back.class_ids, want.class_ids)
        np.testing.assert_array_equal(back.scores, want.scores)


def test_geojson_gzip_is_reproducible_apart_from_ids(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    pa, pb = (run([GeoJsonSink(info(d))], chunks(4))[0] for d in (a, b))
    assert pa.read_bytes()[:10] == pb.read_bytes()[:10]  # no time stamp in the header
    ga, gb = read_geojson(pa), read_geojson(pb)
    for f in ga["features"] + gb["features"]:
        f.pop("id")
    assert ga == gb


def test_geojson_refuses_nan_scores_and_leaves_nothing(tmp_path: Path) -> None:
    bad = chunks(1)[0]
    bad.scores[0] = np.nan
    s = GeoJsonSink(info(tmp_path))
    s.write(chunks(1, seed=3)[0])
    with pytest.raises(InputError, match=r"s1\.geojson\.gz: cannot write GeoJSON, scores contain NaN"):
        s.write(bad)
    assert names(tmp_path) == []


# ------------------------------------------------------------------ Parquet
@pytest.mark.parametrize("k", [0, 1, 4])
def test_parquet_columns_types_and_round_trip(tmp_path: Path, k: int) -> None:
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    parts = chunks(k)
    [p] = run([ParquetSink(info(tmp_path))], parts)
    f = pq.ParquetFile(p)
    assert f.metadata.num_row_groups == sum(1 for c in parts if len(c))  # one per chunk with nuclei
    t = f.read()
    want = expected(parts)
    cols = ["x", "y", "x_um", "y_um", "class", "score", "det_score", *(f"prob_{c}" for c in CLS), "roi"]
    assert t.column_names == (cols if k else cols[:5] + ["roi"])
    types = dict(zip(t.column_names, t.schema.types))
    assert types["x"] == pa.float64() and types["y_um"] == pa.float64() and types["roi"] == pa.string()
    assert types["class"] == pa.dictionary(pa.int32(), pa.string())
    meta = json.loads(t.schema.metadata[b"denuc"])
    assert meta["mpp"] == MPP and meta["class_names"] == list(CLS) and meta["size"] == [W, H]
    assert t.num_rows == len(want)
    np.testing.assert_array_equal(t["x"].to_numpy(), want.xy[:, 0])
    np.testing.assert_array_equal(t["y_um"].to_numpy(), want.xy[:, 1] * MPP)
    classes = t["class"].to_pylist()
    assert classes == [CLS[i] if i >= 0 else None for i in want.class_ids]
    if k:
        assert all(types[c] == pa.float32() for c in cols[5:-1])
        np.testing.assert_array_equal(t["prob_tumor"].to_numpy(), want.probs[:, 1])
        np.testing.assert_array_equal(t["det_score"].to_numpy(), want.det_scores)
        assert t["roi"].to_pylist() == [r or None for r in want.roi]
        back = Nuclei.from_pandas(pd.read_parquet(p), CLS)  # pandas reads it back as Nuclei
        np.testing.assert_array_equal(back.class_ids, want.class_ids)
        np.testing.assert_array_equal(back.scores, want.scores)
        assert back.roi.tolist() == want.roi.tolist()


def test_parquet_without_pyarrow_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(InputError, match=r"pip install denuc\[parquet\]"):
        ParquetSink(info(tmp_path))
    with pytest.raises(InputError, match=r"pip install denuc\[parquet\]"):
        parse_formats("csv,parquet")
    assert names(tmp_path) == []


# ------------------------------------------------------------------ spatialdata
def test_spatialdata_without_the_extra_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from denuc.sinks.spatialdata import SpatialDataSink

    monkeypatch.setitem(sys.modules, "spatialdata", None)
    with pytest.raises(InputError, match=r"pip install 'denuc\[spatialdata\]'"):
        SpatialDataSink(info(tmp_path, rois=False))
    with pytest.raises(InputError, match=r"pip install 'denuc\[spatialdata\]'"):
        parse_formats("csv,spatialdata")
    assert names(tmp_path) == []


@pytest.mark.parametrize("k", [0, 1, 4])
def test_spatialdata_store_of_chunks_with_tissue_shapes(tmp_path: Path, k: int) -> None:
    """The store holds the chunks' points in order, a linked table and the tissue mask as
    polygons (two parts, one with a hole); only the final folder is left."""
    sd = pytest.importorskip("spatialdata", reason="pip install 'denuc[spatialdata]'")
    import shapely

    from denuc.sinks.spatialdata import SpatialDataSink

    mask = np.zeros((30, 40), bool)  # 100 level-0 px per mask pixel: 4000 x 3000 px
    mask[5:25, 5:20] = True
    mask[10:15, 10:15] = False  # a hole
    mask[5:10, 30:35] = True  # a second part
    parts = chunks(k, rois=False)
    [path] = run([SpatialDataSink(info(tmp_path, rois=False, tissue_mask=mask, tissue_downsample=100.0))], parts,
                 {"input": "/slides/s1.svs"})
    assert path == tmp_path / "s1.zarr" and path.is_dir() and names(tmp_path) == ["s1.zarr"]
    store = sd.read_zarr(path)
    want = expected(parts)
    np.testing.assert_array_equal(store.points["nuclei"].compute()[["x", "y"]].to_numpy().reshape(-1, 2), want.xy)
    table = store.tables["table"]
    assert table.n_obs == len(want) and list(table.obs["class"].astype(str)) == want.classes
    assert list(table.obs["instance_id"]) == list(range(len(want))) and table.uns["denuc"]["slide"] == "/slides/s1.svs"
    geoms = store.shapes["tissue"].geometry.to_numpy()
    assert len(geoms) == 2 and sorted(len(g.interiors) for g in geoms) == [0, 1]
    assert shapely.union_all(geoms).area == pytest.approx(mask.sum() * 100.0**2)
    assert "rois" not in store.shapes


def test_spatialdata_abort_leaves_nothing(tmp_path: Path) -> None:
    pytest.importorskip("spatialdata", reason="pip install 'denuc[spatialdata]'")
    from denuc.sinks.spatialdata import SpatialDataSink

    sink = SpatialDataSink(info(tmp_path, rois=False))
    for c in chunks(3, rois=False):
        sink.write(c)
    assert names(tmp_path)  # the temporary table
    sink.abort()
    assert names(tmp_path) == []


def test_spatialdata_is_imported_only_when_its_format_is_opened() -> None:
    """Importing the sinks and the CLI and choosing other formats loads no spatialdata module (a
    fresh interpreter, so that other tests' imports do not count)."""
    import os
    import subprocess

    code = ("import sys; import denuc.cli, denuc.sinks; denuc.sinks.parse_formats('csv,h5ad'); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] in ('spatialdata', 'zarr', 'dask', 'geopandas')))")
    src = str(Path(__file__).resolve().parents[1] / "src")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": src})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "[]"


def test_dead_temporary_folders_are_removed(tmp_path: Path) -> None:
    from denuc.core.files import remove_dead_temps

    dead = tmp_path / ".s1.zarr.999999999.tmp"  # a pid above any pid_max: its writer is gone
    (dead / "points").mkdir(parents=True)
    (dead / "points" / "part.parquet").write_bytes(b"x")
    (tmp_path / ".s1.zarr.999999999.tmp.h5ad").write_bytes(b"x")
    assert sorted(p.name for p in remove_dead_temps(tmp_path, ["s1.zarr"])) == [
        ".s1.zarr.999999999.tmp", ".s1.zarr.999999999.tmp.h5ad"]
    assert names(tmp_path) == []


# ------------------------------------------------------------------ summary
def read_summary(p: Path) -> dict[str, Any]:
    text = p.read_text()
    doc = json.loads(text)
    assert text == json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=False) + "\n"  # sorted, indented
    return doc


def test_summary_counts_densities_rois_and_run_facts(tmp_path: Path) -> None:
    parts = chunks(4)
    run_facts = {"mpp_source": "metadata", "level": np.int64(0), "timings": {"detect_s": np.float32(1.5)},
                 "models": [{"path": Path("/m/det.safetensors"), "sha256": "ab"}], "nan": float("nan")}
    [p] = run([SummarySink(info(tmp_path))], parts, run_facts)
    s = read_summary(p)
    want = expected(parts)
    ids, roi = want.class_ids, want.roi
    counts = {c: int((ids == j).sum()) for j, c in enumerate(CLS)}
    assert s["nuclei"] == len(want) == 17 and s["counts"] == counts and s["unclassified"] == int((ids < 0).sum())
    assert s["tissue_area_mm2"] == 0.2 and s["no_tissue"] is False
    assert s["density_per_mm2"] == pytest.approx(17 / 0.2)
    assert s["class_density_per_mm2"] == {c: pytest.approx(n / 0.2) for c, n in counts.items()}
    assert (s["mpp"], s["size"], s["kind"], s["stem"], s["class_names"]) == (MPP, [W, H], "slide", "s1", list(CLS))
    r1 = s["rois"]["r1"]
    n1 = int((roi == "r1").sum())
    assert r1["nuclei"] == n1 and r1["area_mm2"] == 0.05 and r1["density_per_mm2"] == pytest.approx(n1 / 0.05)
    assert r1["counts"]["tumor"] == int(((roi == "r1") & (ids == 1)).sum())
    assert s["rois"]["r2"]["area_mm2"] == 0.0 and s["rois"]["r2"]["density_per_mm2"] is None  # no area: no density
    assert s["rois"]['far, "quoted"']["area_mm2"] is None  # a name the chunks carry but the info lacks
    assert s["outside_rois"] == int((roi == "").sum())
    assert sum(v["nuclei"] for v in s["rois"].values()) + s["outside_rois"] == 17
    assert s["level"] == 0 and s["timings"] == {"detect_s": 1.5} and s["mpp_source"] == "metadata"
    assert s["models"] == [{"path": "/m/det.safetensors", "sha256": "ab"}] and s["nan"] is None


@pytest.mark.parametrize("area, no_tissue", [(0.0, True), (None, False)])
def test_summary_without_nuclei_or_tissue_is_valid(tmp_path: Path, area: float | None, no_tissue: bool) -> None:
    [p] = run([SummarySink(info(tmp_path, tissue_area_um2=area, roi_areas_um2=None))], [Nuclei.empty(CLS)])
    s = read_summary(p)
    assert s["nuclei"] == 0 and s["counts"] == dict.fromkeys(CLS, 0) and s["no_tissue"] is no_tissue
    assert s["tissue_area_mm2"] == area and s["density_per_mm2"] is None
    assert s["class_density_per_mm2"] == dict.fromkeys(CLS) and s["rois"] is None and s["outside_rois"] is None


def test_summary_keeps_its_facts_over_clashing_run_keys(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"run summary keys \['nuclei'\] clash"):
        [p] = run([SummarySink(info(tmp_path))], chunks(1), {"nuclei": -1, "extra": 1})
    s = read_summary(p)
    assert s["nuclei"] == 7 and s["extra"] == 1


# ------------------------------------------------------------------ overlay
def test_overlay_rings_nuclei_in_class_colours_outlines_the_area_and_counts_in_a_legend(tmp_path: Path) -> None:
    mask = np.zeros((30, 40), bool)
    mask[5:25, 5:35] = True  # tissue at 100 level-0 px per mask px
    ring = np.array([[1000.0, 1000.0], [2000.0, 1000.0], [2000.0, 2000.0], [1000.0, 2000.0]])
    hole = np.array([[1300.0, 1300.0], [1700.0, 1300.0], [1700.0, 1700.0], [1300.0, 1700.0]])
    i = info(tmp_path, tissue_mask=mask, tissue_downsample=100.0, roi_outlines=[ring, hole])
    n = Nuclei([[1504.0, 1209.0], [2555.5, 1780.0], [3000.0, 2500.0]], [0.9, 0.8, 0.7], [1, 2, -1], CLS)
    sink = OverlaySink(i)
    assert sink.radius == 3  # 2.5 µm per canvas px: a 4 µm nucleus plus a px
    [p] = run([sink], [Nuclei.empty(CLS), n])
    full = np.asarray(Image.open(p).convert("RGB"))
    assert full.shape[0] > 300 and full.shape[1] == 400  # the legend strip below the picture
    img = full[:300]  # the picture keeps the thumbnail's size and geometry
    assert tuple(img[120, 153]) == COLORS["tumor"] and tuple(img[117, 150]) == COLORS["tumor"]  # ring of radius 3
    assert tuple(img[120, 150]) == (230, 230, 230) and tuple(img[121, 151]) == (230, 230, 230)  # nucleus left visible
    assert tuple(img[178, 258]) == COLORS["stromal"]
    assert tuple(img[250, 303]) == (64, 64, 64)  # unclassified
    assert tuple(img[50, 200]) == (0, 0, 0) and tuple(img[150, 50]) == (0, 0, 0)  # tissue outline
    assert tuple(img[150, 100]) == (255, 255, 0) and tuple(img[200, 150]) == (255, 255, 0)  # ROI ring
    assert tuple(img[150, 130]) == (255, 255, 0)  # and its hole
    assert tuple(img[10, 10]) == (230, 230, 230) and tuple(img[230, 320]) == (230, 230, 230)  # untouched
    assert [t for t, _, _ in sink.legend_entries()] == ["lymphocyte: 0", "tumor: 1", "stromal: 1", "unclassified: 1",
                                                        "tissue outline", "regions of interest (and holes)"]
    legend = full[300:].reshape(-1, 3)
    assert (legend == COLORS["tumor"]).all(axis=1).any() and (legend == (255, 255, 0)).all(axis=1).any()


def test_overlay_without_thumbnail_and_thumbnail_of(tmp_path: Path) -> None:
    i = OutputInfo("big", tmp_path, "slide", CLS, {}, 0.25, (10000, 5000))
    [p] = run([OverlaySink(i)], [Nuclei([[9999.0, 4999.0]], class_ids=[0], class_names=CLS)])
    img = np.asarray(Image.open(p))[:1024]
    assert img.shape == (1024, 2048, 3) and tuple(img[1023, 2043]) == (0, 160, 0)  # ring (radius 4) at the corner
    thumb, ds = thumbnail_of(np.zeros((3000, 1000, 3), np.uint8))
    assert thumb.shape == (2048, 683, 3) and ds == pytest.approx(3000 / 2048)
    small = np.ones((10, 20, 3), np.uint8)
    t, d = thumbnail_of(small)
    assert d == 1.0 and np.array_equal(t, small)


def test_overlay_refuses_a_bad_roi_outline(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="ROI outline 0 must be a"):
        OverlaySink(info(tmp_path, roi_outlines=[np.zeros((3, 3))])).close({})
    assert names(tmp_path) == []


# ------------------------------------------------------------------ formats and paths
def test_parse_formats() -> None:
    assert parse_formats("geojson, CSV,parquet,csv") == ("geojson", "csv", "parquet")
    with pytest.raises(InputError, match=r"unknown format\(s\) \['tsv'\]; choose from csv, geojson, parquet"):
        parse_formats("csv,tsv")
    with pytest.raises(InputError, match="give one or more of"):
        parse_formats(" , ")


@pytest.mark.parametrize("kind", ["slide", "image"])
@pytest.mark.parametrize("overlay", [True, False])
def test_output_paths_are_what_the_sinks_write(tmp_path: Path, kind: str, overlay: bool) -> None:
    formats = ("geojson", "csv", "parquet")
    paths = output_paths("s1", tmp_path, kind, formats, overlay)
    sinks = output_sinks(info(tmp_path, kind), formats, overlay)
    assert [type(s) for s in sinks] == [SINKS[f] for f in formats] + [c for c in ALWAYS if overlay or c is not OverlaySink]
    assert paths == [s.path for s in sinks]
    assert run(sinks, chunks(1)) == paths and names(tmp_path) == sorted(p.name for p in paths)
    assert {p.name for p in paths} >= {"s1.csv", "s1.parquet", "s1.summary.json"}
    assert ("s1.overlay.png" in names(tmp_path)) is overlay
    assert (f"s1{'.geojson.gz' if kind == 'slide' else '.geojson'}") in names(tmp_path)


def test_output_info_checks_its_fields(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="kind must be one of"):
        info(tmp_path, "tile")
    with pytest.raises(InputError, match="thumbnail must be an"):
        info(tmp_path, thumbnail=np.zeros((4, 4), np.uint8))
    with pytest.raises(InputError, match="mpp must be a positive"):
        OutputInfo("s", tmp_path, "image", CLS, {}, 0.0, (4, 4))
    i = OutputInfo("s", tmp_path, "image", CLS, {"tumor": (1, 2, 3)}, 0.5, (4, 4))
    assert i.colors["tumor"] == (1, 2, 3) and set(i.colors) == set(CLS)  # others from the default palette
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OutputInfo("s", str(tmp_path), "image", CLS, {}, 0.5, (4, 4))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 12), seed=st.integers(0, 2**31 - 1), header=st.booleans())
def test_csv_text_is_what_pandas_writes(n: int, seed: int, header: bool) -> None:
    """The CSV sink's own writer gives pandas' bytes (as :meth:`Nuclei.to_csv` writes) for the
    column kinds it meets: float64 and float32 of any magnitude, NaN, ints, names with commas
    and quotes, empty names."""
    from denuc.sinks.tabular import csv_text

    rng = np.random.default_rng(seed)
    mag = 10.0 ** rng.integers(-8, 9, n)
    x = rng.standard_normal(n) * mag
    if n:
        x[rng.integers(0, n)] = np.nan
    names = np.array(["tumor", 'a "quoted", name', "", "x,y", "lymphocyte"], dtype=object)
    cols = {"x": x, "p": (rng.random(n) * mag).astype(np.float32), "k": rng.integers(-5, 5, n),
            "class": names[rng.integers(0, len(names), n)], "whole": np.round(rng.random(n) * 100)}
    assert csv_text(cols, header) == pd.DataFrame(cols).to_csv(index=False, header=header)
