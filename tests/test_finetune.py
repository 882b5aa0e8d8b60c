"""``denuc finetune`` end to end on a tiny synthetic dataset: a loadable model folder, a dataset
without val, resume after interruptions, bad input refused before any slow work (leaving no
--out), model folder loading, and the help text of the training commands."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from synthetic import make_points_dataset, tiny_start_detector

import denuc.train.finetune as ft
from denuc.classify.head import load_head
from denuc.cli import main as cli_main
from denuc.encode.tiny import register_tiny
from denuc.errors import ModelError
from denuc.modeldir import is_model_dir, load_model_dir

register_tiny()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ft")
    ds = make_points_dataset(root / "ds")
    return {"ds": ds, "start": tiny_start_detector(ds, root / "start"), "cache": root / "cache"}


def _argv(data: dict[str, Path], ds: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", str(ds), "--out", str(out), "--init", str(data["start"]), "--epochs", "3", "--batch-size", "4",
            "--encoder", "tiny-uni", "--weights", "random", "--cache-dir", str(data["cache"]), "--no-progress",
            "--threads", "1", *extra]


def _run(data: dict[str, Path], ds: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str
         ) -> tuple[int, str, str]:
    rc = cli_main(_argv(data, ds, out, *extra))
    got = capsys.readouterr()
    return rc, got.out, got.err


# ------------------------------------------------------------------ end to end
@pytest.mark.slow
def test_finetune_writes_a_loadable_model_folder_that_finds_the_planted_nuclei(
        data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    rc, log, err = _run(data, data["ds"], out, capsys)
    assert rc == 0, err
    for stage in ("[1/4] detector", "[2/4] select", "[3/4] head", "[4/4] report"):
        assert stage in log
    assert is_model_dir(out)
    m = load_model_dir(out)
    assert m.detector == out / "detector.safetensors" and m.head == out / "head.safetensors"
    assert m.classes == ("dark", "light") and m.encoder == "tiny-uni" and m.weights == "random" and m.mpp == 0.5
    assert 0.1 <= m.thresholds["detection"] <= 0.7
    for f in ("report.json", "report.md", "detector_curves.png", "head_curves.png", "reliability.png"):
        assert (out / "report" / f).is_file(), f
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["pipeline"]["detection"]["f1"] > 0.8  # the planted nuclei are found ...
    assert rep["pipeline"]["mean_class_f1"] > 0.8  # ... and told apart (chance: about 0.5)
    assert rep["detector"]["chosen"] in ("fine-tuned", "start") and "fine_tuned" in rep["detector"]
    gp = rep["head"]["gt_points"]
    assert np.array(gp["confusion"]).shape == (2, 2) and set(gp["per_class"]) == {"dark", "light"}
    assert all({"precision", "recall", "f1"} <= set(v) for v in gp["per_class"].values())
    cal = rep["head"]["calibration"]
    assert cal["ece_after"] <= cal["ece_before"] + 1e-9 and cal["temperature"] == rep["head"]["temperature"]
    md = (out / "report" / "report.md").read_text()
    assert "Confusion matrix" in md and "ECE" in md and "reliability.png" in md
    # compared with the shipped model on the same val images (other classes: detection only)
    assert rep["shipped"]["model"] == "brca-m2c" and rep["shipped"]["classes_compared"] is False
    assert 0 <= rep["shipped"]["detection"]["f1"] <= 1 and "Compared with the shipped model" in md
    # the head applies its calibration temperature when loaded
    head, meta, _ = load_head(m.head)
    assert head.temperature == pytest.approx(meta.temperature) and meta.temperature != 1.0
    # the detector's threshold is the one chosen on val; it states no TTA thresholds of another dataset
    from denuc.detect.checkpoint import read_meta

    dm = read_meta(m.detector)
    assert dm["config"]["score_threshold"] == pytest.approx(m.thresholds["detection"]) and "tta_thresholds" not in dm
    assert not (out / "train" / "detector" / "state.pt").exists()  # finished: only best + log are kept
    # the folder works as a model: detect and classify a test image
    from denuc.data.base import open_dataset
    from denuc.pipeline import DeNuC

    ds = open_dataset(data["ds"])
    stem = ds.stems("test")[0]
    model = DeNuC.load(detector=m.detector, head=m.head, encoder="tiny-uni", weights="random", device="cpu")
    res = model(ds.read_image(stem), ds.mpp, name=stem)
    assert len(res) >= 0.7 * len(ds.points(stem)) and set(res.class_names) == {"dark", "light"}
    # the default head recipe (auto): both candidates trained and scored on val, the better one kept
    cands = rep["head"]["candidates"]
    assert set(cands) == {"shipped", "paper"} and rep["head"]["preset"] == "auto"
    best = max(cands, key=lambda k: (cands[k], k == "shipped"))
    assert rep["head"]["recipe"] == best and yaml.safe_load((out / "model.yaml").read_text())["head_recipe"] == best
    kept = out / "train" / "head" / f"{best}.safetensors"
    assert kept.read_bytes() == m.head.read_bytes()
    assert rep["head"]["val_scores"]["select"] == pytest.approx(cands[best]) and "(kept)" in md
    # running the finished command again does nothing
    rc, log, _ = _run(data, data["ds"], out, capsys)
    assert rc == 0 and log.count("finished before, skipped") == 4


@pytest.mark.slow
def test_dataset_without_val_holds_back_train_images_for_detector_and_head(
        data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nv = make_points_dataset(tmp_path / "noval", n_images=12, with_val=False, seed=3)
    out = tmp_path / "m"
    rc, log, err = _run(data, nv, out, capsys, "--epochs", "1", "--head-epochs", "5", "--head-preset", "shipped")
    assert rc == 0, err
    assert "no val split in" in log and "held back as val" in log
    rep = json.loads((out / "report" / "report.json").read_text())
    assert rep["val_images"] == 1 and rep["held_back_val"] == ["noval"]  # round(0.1 * 11) = 1 image
    det_log = [json.loads(x) for x in (out / "train" / "detector" / "log.jsonl").read_text().splitlines()]
    assert "val_f1" in det_log[0]  # the detector chose its epoch on the held-back image too
    _, meta, _ = load_head(out / "head.safetensors")
    assert meta.train["val_images"] == 1 and meta.train["train_images"] == 10
    assert "held back" in yaml.safe_load((out / "model.yaml").read_text())["val"]
    assert "held back" in (out / "report" / "report.md").read_text()


# ------------------------------------------------------------------ resume
@pytest.mark.slow
def test_an_interrupted_finetune_resumes_where_it_stopped(data: dict[str, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "r"
    # 1) the detector stage stops after its first epoch (as if killed after it)
    rc, log, _ = _run(data, data["ds"], out, capsys, "--stop-after", "1", "--head-epochs", "5")
    assert rc == 0 and "stopped early" in log and not is_model_dir(out)
    assert (out / "train" / "detector" / "state.pt").is_file()
    # 2) the rerun continues the detector from epoch 1, then the head stage is interrupted
    calls = {"n": 0}
    real_head = ft.stage_head

    def interrupted(*a: object, **k: object) -> object:
        calls["n"] += 1
        raise KeyboardInterrupt

    monkeypatch.setattr(ft, "stage_head", interrupted)
    rc, log, err = _run(data, data["ds"], out, capsys, "--head-epochs", "5")
    assert rc == 130 and calls["n"] == 1 and "resumed from" in log and "at epoch 1" in log
    epochs = [json.loads(x)["epoch"] for x in (out / "train" / "detector" / "log.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    done = json.loads((out / "train" / "finetune.json").read_text())["done"]
    assert set(done) == {"detector", "select"} and not is_model_dir(out)
    # 3) the next rerun skips the finished stages and completes
    monkeypatch.setattr(ft, "stage_head", real_head)
    rc, log, _ = _run(data, data["ds"], out, capsys, "--head-epochs", "5")
    assert rc == 0 and "[1/4] detector: finished before, skipped" in log and "[2/4] select: finished before" in log
    assert is_model_dir(out)
    # a rerun with other settings is refused, naming the change; --overwrite starts again
    rc, _, err = _run(data, data["ds"], out, capsys, "--head-epochs", "6")
    assert rc == 2 and "head_epochs: 5 -> 6" in err and "keeps the finished detector stages" in err
    # with only head settings changed, --overwrite keeps the detector stages and trains the head again
    det_bytes = (out / "detector.safetensors").read_bytes()
    rc, log, err = _run(data, data["ds"], out, capsys, "--head-epochs", "6", "--head-preset", "shipped", "--overwrite")
    assert rc == 0, err
    assert "keeping the finished detector stages" in log and "[1/4] detector: finished before, skipped" in log
    assert (out / "detector.safetensors").read_bytes() == det_bytes and not (out / "train" / "head").exists()
    _, hm, _ = load_head(out / "head.safetensors")
    assert hm.train["epochs"] == 6 and is_model_dir(out)
    assert yaml.safe_load((out / "model.yaml").read_text())["head_recipe"] == "shipped"


def test_overwrite_keeps_the_detector_stages_only_when_head_settings_alone_changed(tmp_path: Path) -> None:
    old = ft.FinetuneSettings(datasets=[str(tmp_path / "ds")], out=str(tmp_path / "o"))
    out = Path(old.out)
    files = ["detector.safetensors", "head.safetensors", "model.yaml", "train/detector/best.safetensors",
             "train/head/paper.safetensors", "report/report.md"]

    def make() -> None:
        for f in files:
            (out / f).parent.mkdir(parents=True, exist_ok=True)
            (out / f).write_text(f)
        state = {"format": ft.STATE_FORMAT, "settings": ft.run_settings(old),
                 "done": {k: {} for k in ("detector", "select", "head", "report")}}
        (out / "train" / "finetune.json").write_text(json.dumps(state))

    make()
    log: list[str] = []
    head_changed = ft.FinetuneSettings(**{**vars(old), "head_preset": "paper", "overwrite": True})
    st = ft.prepare_out(head_changed, log.append)
    assert set(st["done"]) == {"detector", "select"} and st["settings"]["head_preset"] == "paper"
    assert sorted(f for f in files if (out / f).exists()) == ["detector.safetensors", "train/detector/best.safetensors"]
    make()
    det_changed = ft.FinetuneSettings(**{**vars(old), "head_preset": "paper", "lr": 1e-4, "overwrite": True})
    st = ft.prepare_out(det_changed, log.append)
    assert st["done"] == {} and not any((out / f).exists() for f in files)
    make()
    with pytest.raises(ft.InputError, match="it deletes the run's files"):
        ft.prepare_out(ft.FinetuneSettings(**{**vars(old), "epochs": 3}), log.append)
    same = ft.FinetuneSettings(**{**vars(old), "overwrite": True})  # nothing changed: --overwrite starts again
    assert ft.prepare_out(same, log.append)["done"] == {} and not (out / "detector.safetensors").exists()


# ------------------------------------------------------------------ bad input
def _generic_variant(src: Path, dst: Path, *, classes: list[str] | None = None, relabel: dict[str, str] | None = None,
                     empty: bool = False, mpp: object = "keep", outside: bool = False) -> Path:
    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "dataset.yaml").read_text())
    if classes is not None:
        cfg["classes"] = classes
    if mpp != "keep":
        if mpp is None:
            del cfg["mpp"]
        else:
            cfg["mpp"] = mpp
    (dst / "dataset.yaml").write_text(yaml.safe_dump(cfg))
    for f in sorted((dst / "points").glob("*.csv")):
        rows = f.read_text().splitlines()
        if empty:
            rows = rows[:1]
        for old, new in (relabel or {}).items():
            rows = [r.replace(f",{old}", f",{new}") for r in rows]
        if outside and f.stem == cfg["splits"]["train"][0]:
            rows.append("500.0,5.0,dark")
        f.write_text("\n".join(rows) + "\n")
    return dst


@pytest.mark.parametrize("variant, extra, match", [
    ({"relabel": {"light": "dark"}}, [], "only class 'dark' has training points"),
    ({"classes": ["dark", "light", "necrosis"]}, [], "class(es) ['necrosis'] have no training point"),
    ({"empty": True}, [], "training point files are empty"),
    ({"mpp": 0.05}, [], "mpp too small"),
    ({"mpp": 40}, [], "magnification"),
    ({"mpp": None}, [], "--data-mpp"),
    ({"outside": True}, [], "--outside drop"),
    ({}, ["--val-fraction", "0"], "val share"),
    ({}, ["--init", "nowhere.safetensors"], "not found"),
    ({}, ["--encoder", "no-such-encoder"], "no-such-encoder"),
])
def test_bad_input_is_refused_before_slow_work_and_leaves_no_out(
        data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        variant: dict[str, object], extra: list[str], match: str) -> None:
    def no_slow_work(*a: object, **k: object) -> object:
        raise AssertionError("slow work started")

    monkeypatch.setattr(ft, "stage_detector", no_slow_work)
    ds = _generic_variant(data["ds"], tmp_path / "bad", **variant)  # type: ignore[arg-type]
    out = tmp_path / "deep" / "out"
    rc, _, err = _run(data, ds, out, capsys, *extra)
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists() and not out.parent.exists()


def test_no_dataset_and_used_out_folders_are_refused(data: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _run(data, tmp_path / "missing", tmp_path / "o", capsys)
    assert rc == 2 and "does not exist" in err and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit):  # no dataset at all: argparse's usage error
        cli_main(["finetune", "--out", str(tmp_path / "o")])
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    rc, _, err = _run(data, data["ds"], busy, capsys)
    assert rc == 2 and "holds other files" in err and (busy / "notes.txt").read_text() == "mine"


def test_a_dataset_without_mpp_trains_with_data_mpp(data: dict[str, Path], tmp_path: Path) -> None:
    from denuc.data.base import open_training_dataset
    from denuc.errors import InputError, ResolutionError

    ds = _generic_variant(data["ds"], tmp_path / "nompp", mpp=None)
    with pytest.raises(ResolutionError, match="--data-mpp 0.5"):
        open_training_dataset(ds)
    assert open_training_dataset(ds, mpp=0.5).mpp == 0.5
    with pytest.raises(InputError, match="says mpp 0.5 µm/px but --data-mpp is 0.25"):
        open_training_dataset(data["ds"], mpp=0.25)
    plan = ft.inspect_data(ft.FinetuneSettings(datasets=[str(ds)], out="x", data_mpp=0.5), log=lambda m: None)
    assert plan.classes == ("dark", "light") and plan.nn_um[0] is not None and 3 < plan.nn_um[0] < 50


# ------------------------------------------------------------------ model folders
def test_load_model_dir_errors_name_the_problem(data: dict[str, Path], tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    assert not is_model_dir(d)
    with pytest.raises(ModelError, match="no model.yaml"):
        load_model_dir(d)
    with pytest.raises(ModelError, match="does not exist"):
        load_model_dir(tmp_path / "nope")
    (d / "model.yaml").write_text("detector: [unclosed\n")
    with pytest.raises(ModelError, match="not valid YAML") as e:
        load_model_dir(d)
    assert len(str(e.value).splitlines()) == 1
    (d / "model.yaml").write_text("- a list\n")
    with pytest.raises(ModelError, match="mapping"):
        load_model_dir(d)
    (d / "model.yaml").write_text(yaml.safe_dump({"detector": "det.safetensors", "head": "head.safetensors"}))
    with pytest.raises(ModelError, match=r"missing key\(s\) \['classes', 'mpp'\]"):
        load_model_dir(d)
    doc = {"detector": "det.safetensors", "head": "head.safetensors", "classes": ["a", "b"], "mpp": 0.25}
    (d / "model.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ModelError, match="detector file .*det.safetensors does not exist"):
        load_model_dir(d)
    shutil.copy(data["start"], d / "det.safetensors")
    with pytest.raises(ModelError, match="head file"):
        load_model_dir(d)
    (d / "head.safetensors").write_bytes(b"")
    (d / "model.yaml").write_text(yaml.safe_dump({**doc, "mpp": 40}))
    with pytest.raises(ModelError, match="magnification"):
        load_model_dir(d)
    (d / "model.yaml").write_text(yaml.safe_dump({**doc, "format": "denuc-model/9"}))
    with pytest.raises(ModelError, match="denuc-model/9"):
        load_model_dir(d)
    (d / "model.yaml").write_text(yaml.safe_dump(doc))
    m = load_model_dir(d)
    assert m.encoder is None and m.weights is None and m.classes == ("a", "b") and m.mpp == 0.25


# ------------------------------------------------------------------ help text
@pytest.mark.parametrize("command", ["train-detector", "train-head", "finetune"])
def test_every_option_has_help_showing_its_default_and_booleans_have_no_form(command: str) -> None:
    import importlib

    from denuc.cli import COMMANDS

    p = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[command]).configure(p)
    for a in p._actions:
        if a.help == argparse.SUPPRESS or isinstance(a, argparse._HelpAction):
            continue
        name = a.option_strings[0] if a.option_strings else a.dest
        assert a.help and len(a.help) > 20, name
        assert "default" in a.help or "(required)" in a.help, name
        if isinstance(a, argparse.BooleanOptionalAction) or a.nargs == 0:
            assert isinstance(a, argparse.BooleanOptionalAction), f"{name}: a store_true flag"
        assert a.nargs != "?", f"{name}: optional-value flag (use --x / --no-x)"
