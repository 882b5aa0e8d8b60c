"""The cohort runner behind `denuc predict` / `denuc detect` / `predict_many`: outputs that never
stand in for a failed run or for a run with other settings (fingerprint, commit marker, stale
temp files), per-input ROI folders, --mpp-default, stems of multi-part suffixes, option checks.

All on the tiny random detector and 96 x 128 px images, in this process."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import noise_images
from PIL import Image

from denuc.cli import main


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    return noise_images(tmp_path / "in", 2, "c")


def _detect(inputs: Path | str, out: Path, ckpt: Path, *extra: str) -> int:
    return main(["detect", str(inputs), "--out", str(out), "--detector", str(ckpt), "--device", "cpu",
                 "--runtime", "torch", "--no-overlay", "--no-progress", *extra])


def _summary(out: Path, stem: str) -> dict:  # type: ignore[type-arg]
    return json.loads((out / f"{stem}.summary.json").read_text())


def _visible(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if not p.name.startswith(".")}


def test_rerun_with_other_settings_is_refused_naming_the_changes(images: Path, tmp_path: Path, tiny_ckpt: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert _detect(images, out, tiny_ckpt, "--mpp", "0.5", "--tta", "2") == 0
    before = (out / "c0.csv").read_bytes()
    assert _summary(out, "c0")["fingerprint"]["tta"] == 2
    capsys.readouterr()
    assert _detect(images, out, tiny_ckpt, "--mpp", "0.25") == 1  # other mpp, no TTA: refused, not skipped
    err = capsys.readouterr().err
    assert "mpp 0.5 -> 0.25, tta 2 -> 1" in err and "--overwrite" in err
    assert "2 of 2 input(s) failed; nothing was written" in err
    assert (out / "c0.csv").read_bytes() == before  # the old outputs are kept, untouched
    assert _detect(images, out, tiny_ckpt, "--mpp", "0.5", "--tta", "2") == 0  # same settings: skipped
    assert "skipping 2 input(s) already done" in capsys.readouterr().out
    assert _detect(images, out, tiny_ckpt, "--mpp", "0.25", "--overwrite") == 0
    fp = _summary(out, "c0")["fingerprint"]
    assert fp["mpp"] == 0.25 and fp["tta"] == 1 and fp["mpp_source"] == "--mpp"


def test_partial_chunks_with_other_settings_are_refused(images: Path, tmp_path: Path, tiny_ckpt: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from denuc.sinks.tabular import CsvSink

    calls = [0]
    orig = CsvSink._write

    def second_chunk_fails(self, chunk):  # type: ignore[no-untyped-def]
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("stopped after the first chunk")
        return orig(self, chunk)

    monkeypatch.setattr(CsvSink, "_write", second_chunk_fails)
    out = tmp_path / "o"
    arr = np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    Image.fromarray(arr).save(images / "c0.png")  # 2 x 3 tiles of 192 px
    small = ("--tile-px", "192", "--chunk-tiles", "1")
    assert _detect(images / "c0.png", out, tiny_ckpt, "--mpp", "0.5", *small) == 1
    assert list((out / ".c0.partial").glob("chunk-*.npz"))  # the first chunk is in the journal
    monkeypatch.setattr(CsvSink, "_write", orig)
    capsys.readouterr()
    assert _detect(images / "c0.png", out, tiny_ckpt, "--mpp", "0.25", *small) == 1
    err = capsys.readouterr().err
    assert "finished chunks of c0" in err and "mpp 0.5 -> 0.25" in err
    assert _detect(images / "c0.png", out, tiny_ckpt, "--mpp", "0.25", "--overwrite", *small) == 0
    assert _summary(out, "c0")["resumed_tiles"] == 0 and not (out / ".c0.partial").exists()


@pytest.mark.parametrize("where", ["csv-write", "summary-close"])
def test_a_failure_mid_write_leaves_no_output_and_is_not_listed(images: Path, tmp_path: Path, tiny_ckpt: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str], where: str) -> None:
    from denuc.sinks.summary import SummarySink
    from denuc.sinks.tabular import CsvSink

    cls, name = (CsvSink, "_write") if where == "csv-write" else (SummarySink, "_finish")
    orig = getattr(cls, name)

    def disk_full_on_c0(self, arg):  # type: ignore[no-untyped-def]
        if self.info.stem == "c0":
            assert self._fh is not None
            self._fh.write(b"half a line")  # some bytes reached the disk, then it filled up
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(self, arg)

    monkeypatch.setattr(cls, name, disk_full_on_c0)
    out = tmp_path / "o"
    assert _detect(images, out, tiny_ckpt, "--mpp", "0.5", "--format", "csv,geojson") == 1
    err = capsys.readouterr().err
    assert f"1 of 2 input(s) failed; 1 written to {out}" in err
    assert not [p for p in out.iterdir() if p.name.startswith("c0")]  # neither final nor temp files
    assert not list(out.glob(".c0.*.tmp"))
    assert {"c1.csv", "c1.geojson", "c1.summary.json"} <= _visible(out)
    assert main(["summarize", str(out)]) == 0
    rows = (out / "summary.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["c1"]
    monkeypatch.setattr(cls, name, orig)
    assert _detect(images, out, tiny_ckpt, "--mpp", "0.5", "--format", "csv,geojson") == 0  # the rerun finishes c0
    assert (out / "c0.summary.json").is_file()


def test_temp_files_of_dead_processes_are_removed_on_rerun(images: Path, tmp_path: Path, tiny_ckpt: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "o"
    (out / ".c0.partial").mkdir(parents=True)
    left = [out / f".c0.csv.{dead.pid}.tmp", out / f".c0.summary.json.{dead.pid}.tmp",
            out / ".c0.partial" / f".chunk-000000.npz.{dead.pid}.tmp.npz"]
    live = out / f".c0.geojson.{os.getppid()}.tmp"  # a live process's: kept
    other = out / f".c1x.csv.{dead.pid}.tmp"  # not an output of an input of this run: kept
    for p in [*left, live, other]:
        p.write_bytes(b"partial")
    assert _detect(images / "c0.png", out, tiny_ckpt, "--mpp", "0.5") == 0
    assert not any(p.exists() for p in left)
    assert live.exists() and other.exists()


def test_a_finished_inputs_journal_left_by_a_killed_process_goes_unless_its_owner_lives(
        images: Path, tmp_path: Path, tiny_ckpt: Path) -> None:
    # killed after its outputs were in place and before it removed its resume journal
    from denuc.cohort.claims import try_claim

    out = tmp_path / "o"
    assert _detect(images, out, tiny_ckpt, "--mpp", "0.5") == 0
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "summary.csv"}  # (rebuilt each run)
    for stem in ("c0", "c1"):
        (out / f".{stem}.partial").mkdir()
        (out / f".{stem}.partial" / "plan.json").write_text("{}")
    live = try_claim(out, "c1")  # c1's owner is alive (this process): its journal stays
    assert live is not None
    try:
        assert _detect(images, out, tiny_ckpt, "--mpp", "0.5") == 0
        assert not (out / ".c0.partial").exists()
        assert (out / ".c1.partial" / "plan.json").is_file()
    finally:
        live.release()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name in written} == written  # nothing redone
    from denuc.stream.job import drop_dead_journal

    drop_dead_journal(out, "c1", stale_after=600)  # the owner is gone now
    assert not (out / ".c1.partial").exists() and not (out / ".c1.claim").exists()


def test_roi_folder_is_matched_by_stem_and_inputs_without_one_are_reported(images: Path, tmp_path: Path,
                                                                           tiny_ckpt: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    rois = tmp_path / "rois"
    rois.mkdir()
    square = [[10, 10], [60, 10], [60, 60], [10, 60], [10, 10]]
    feature = {"type": "Feature", "properties": {"name": "tumour"},
               "geometry": {"type": "Polygon", "coordinates": [square]}}
    (rois / "c0.png.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    out = tmp_path / "o"
    assert _detect(images, out, tiny_ckpt, "--mpp", "0.5", "--roi", str(rois)) == 1
    cap = capsys.readouterr()
    assert "1 input(s) have no ROI / tissue mask file and are not processed: c1.png" in cap.out
    assert "c1.png: no ROI file for it in" in cap.err and "1 of 2 input(s) failed; 1 written" in cap.err
    s = _summary(out, "c0")
    assert list(s["rois"]) == ["tumour"] and s["fingerprint"]["roi"] == "c0.png.geojson"
    assert not (out / "c1.csv").exists()


def test_mpp_default_fills_only_inputs_without_one(tmp_path: Path, tiny_ckpt: Path) -> None:
    from denuc.source.testslide import write_pyramidal_tiff

    d = tmp_path / "in"
    d.mkdir()
    img = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(img).save(d / "plain.png")
    write_pyramidal_tiff(d / "scan.ome.tif", img, 0.5, tile=64, downsamples=(1,), compression="none", flavor="ome")
    out = tmp_path / "o"
    assert _detect(d, out, tiny_ckpt, "--mpp-default", "0.25") == 0
    assert {"plain.csv", "scan.csv"} <= _visible(out) and "scan.ome.csv" not in _visible(out)  # x.ome.tif -> x
    p, s = _summary(out, "plain"), _summary(out, "scan")
    assert (p["mpp"], p["mpp_source"]) == (0.25, "--mpp-default")
    assert s["mpp"] == 0.5 and s["mpp_source"] != "--mpp-default"
    assert main(["summarize", str(out), "--inputs", str(_list(tmp_path, d / "scan.ome.tif"))]) == 0
    assert [r.split(",")[0] for r in (out / "summary.csv").read_text().splitlines()[1:]] == ["scan"]


def _list(tmp_path: Path, *paths: Path) -> Path:
    f = tmp_path / "list.txt"
    f.write_text("# inputs\n" + "".join(f"{p}\n" for p in paths))
    return f


def test_summarize_keeps_the_old_inputs_spelling_with_a_note(images: Path, tmp_path: Path, tiny_ckpt: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    assert _detect(images, out, tiny_ckpt, "--mpp", "0.5") == 0
    capsys.readouterr()
    assert main(["summarize", str(out), "--inputs", str(images / "c1.png"), "c9"]) == 0
    assert "deprecated" in capsys.readouterr().err
    assert [r.split(",")[0] for r in (out / "summary.csv").read_text().splitlines()[1:]] == ["c1", "c9"]


def test_model_folder_with_separate_models_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for flag in ("--head", "--detector", "--encoder", "--weights"):
        assert main(["predict", str(tmp_path), "--out", str(tmp_path / "o"), "--model", str(tmp_path),
                     flag, "x"]) == 2
        err = capsys.readouterr().err
        assert f"--model {tmp_path} replaces {flag}" in err
    assert main(["detect", str(tmp_path), "--out", str(tmp_path / "o"), "--model", "consep", "--detector", "x"]) == 2
    assert "--model consep replaces --detector" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_predict_has_the_detector_threshold(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from denuc.cli import build_parser
    from denuc.pipeline import DeNuC

    args = build_parser().parse_args(["predict", "x.png", "--out", "o", "--threshold", "0.4"])
    assert args.threshold == 0.4
    seen = {}

    def fake_load(cls, *a, **kw):  # type: ignore[no-untyped-def]
        seen.update(kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(DeNuC, "load", classmethod(fake_load))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    assert main(["predict", str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), "--mpp", "0.5",
                 "--threshold", "0.4"]) == 130
    assert seen["threshold"] == 0.4
    assert main(["predict", str(tmp_path / "x.png"), "--out", str(tmp_path / "o"), "--threshold", "1.5"]) == 2


def test_python_detect_cohort_is_the_cli_engine(images: Path, tmp_path: Path, tiny_ckpt: Path) -> None:
    from denuc.detect.api import Detector
    from denuc.stream.job import RunOptions

    det = Detector.load(tiny_ckpt, device="cpu", runtime="torch")
    out = tmp_path / "o"
    res = det.detect_cohort(images, out, mpp=0.5, opts=RunOptions(overlay=False, progress=False))  # one folder
    assert [(r.stem, r.status) for r in res.results] == [("c0", "done"), ("c1", "done")] and res.ok
    assert (out / "summary.csv").is_file()
    assert res.results[0].summary["nuclei"] == len((out / "c0.csv").read_text().splitlines()) - 1
    again = det.detect_cohort([images], out, mpp=0.5, opts=RunOptions(overlay=False, progress=False))
    assert [r.status for r in again.results] == ["skipped", "skipped"]
    changed = det.detect_cohort([images], out, mpp=0.25, opts=RunOptions(overlay=False, progress=False))
    assert not changed.ok and "mpp 0.5 -> 0.25" in (changed.results[0].error or "")


def test_a_redo_that_fails_before_writing_keeps_the_finished_outputs(images: Path, tmp_path: Path, tiny_ckpt: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from denuc.sinks.tabular import CsvSink

    out = tmp_path / "o"
    assert _detect(images / "c0.png", out, tiny_ckpt, "--mpp", "0.5") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fails(self, chunk):  # type: ignore[no-untyped-def]
        raise RuntimeError("failed while computing")

    monkeypatch.setattr(CsvSink, "_write", fails)
    assert _detect(images / "c0.png", out, tiny_ckpt, "--mpp", "0.25", "--overwrite") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")} == before
