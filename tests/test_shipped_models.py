"""Shipped models per tissue: the registry (``denuc models``, ``--model NAME``), and the
comparison with the shipped model that ``denuc finetune``'s report makes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from synthetic import make_points_dataset

from denuc.cli import main as cli_main
from denuc.data.paths import shared_data_dir
from denuc.errors import ModelError
from denuc.modeldir import DEFAULT_MODEL, SHIPPED_ROOT, resolve_model, shipped_models
from denuc.pipeline import DEFAULT_HEAD

ASSETS = DEFAULT_HEAD.parent
COLON = ["inflammatory", "epithelial", "stromal"]


def test_denuc_models_lists_both_shipped_models_with_classes_data_and_notices(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["models", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert set(got) >= {"brca-m2c", "consep"} and DEFAULT_MODEL == "brca-m2c" and got["brca-m2c"]["default"]
    assert got["brca-m2c"]["classes"] == ["lymphocyte", "tumor", "stromal"]
    assert got["consep"]["classes"] == COLON and not got["consep"]["default"]
    for name, d in got.items():
        assert d["data"] and d["license"] and d["citation"] and d["scores"], name
        assert Path(d["notice"]).is_file(), name
    assert "HoVer-Net" in got["consep"]["citation"] and "CoNSeP" in Path(got["consep"]["notice"]).read_text()
    assert cli_main(["models"]) == 0
    text = capsys.readouterr().out
    assert "brca-m2c  (default)" in text and "inflammatory, epithelial, stromal" in text


def test_names_resolve_to_the_shipped_files_and_a_model_folder_wins_over_a_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    brca = resolve_model("brca-m2c")
    assert brca.detector.resolve() == (ASSETS / "detector.safetensors").resolve()
    assert brca.head.resolve() == DEFAULT_HEAD.resolve() and brca.mpp == 0.25
    consep = resolve_model("consep")
    assert consep.detector.resolve() == brca.detector.resolve() and consep.classes == tuple(COLON)
    assert consep.head.resolve().parent == (SHIPPED_ROOT / "consep").resolve()
    with pytest.raises(ModelError, match="neither a model folder nor a shipped model.*brca-m2c, consep"):
        resolve_model("colon")
    # a folder called like a shipped model, holding a model.yaml, is the folder
    own = tmp_path / "consep"
    own.mkdir()
    (own / "model.yaml").write_text(yaml.safe_dump({
        "detector": str(brca.detector.resolve()), "head": str(brca.head.resolve()), "classes": ["a", "b", "c"],
        "mpp": 0.25, "thresholds": {"detection": 0.5}}))
    monkeypatch.chdir(tmp_path)
    assert resolve_model("consep").classes == ("a", "b", "c")
    # detect --model: the model's detector and its threshold (the CLI refuses --detector with it)
    from denuc.detect.cli import model_detector

    path, thr = model_detector("consep", None, None, 1)
    assert Path(path).resolve() == brca.detector.resolve() and thr == 0.5
    assert model_detector("consep", None, None, 4)[1] is None  # its threshold is for one pass
    assert model_detector("consep", "x.safetensors", 0.3, 1) == ("x.safetensors", 0.3)
    assert model_detector(None, None, None, 1) == (None, None)


def test_the_registry_does_not_import_training_code() -> None:
    code = ("import sys, denuc.modeldir, denuc.models_cli; denuc.models_cli.describe_all(); "
            "print([m for m in sys.modules if m.startswith('denuc.train') or m == 'torch'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.slow
def test_finetune_report_compares_with_the_shipped_model_on_the_same_val_images(tmp_path: Path) -> None:
    from denuc.data.base import open_dataset
    from denuc.train.finetune import compare_shipped, shipped_for_classes
    from denuc.train.finetune_report import markdown

    assert shipped_for_classes(["stromal", "inflammatory", "epithelial"]) == "consep"
    assert shipped_for_classes(["dark", "light"]) == DEFAULT_MODEL
    for classes, compared in ((("dark", "light"), False), (("lymphocyte", "tumor", "stromal"), True)):
        ds = open_dataset(make_points_dataset(tmp_path / "_".join(classes), n_images=3, classes=classes))
        val = ds.stems("val")
        gt = {s: ds.points(s) for s in val}
        images = {s: (ds.read_image(s), ds.mpp) for s in val}
        rep = compare_shipped(ds.classes, gt, images, "cpu", lambda m: None)
        assert rep["model"] == "brca-m2c" and rep["classes_compared"] is compared
        assert 0 <= rep["detection"]["f1"] <= 1
        assert (rep["mean_class_f1"] is not None) is compared
        pipeline = {"detection": {"precision": 1.0, "recall": 1.0, "f1": 1.0}, "classes": {},
                    "mean_class_f1": 0.5, "seconds_per_image": 0.1}
        md = markdown({"classes": list(classes), "val_images": 2, "train_points": {}, "val_points": {},
                       "pipeline": pipeline, "shipped": rep}, [])
        assert "Compared with the shipped model `brca-m2c`" in md and f"{rep['detection']['f1']:.4f}" in md
        assert ("only detection is compared" in md) is not compared


@pytest.mark.real_data
def test_consep_model_predicts_the_colon_classes_on_a_consep_tile() -> None:
    root = shared_data_dir() / "consep"
    if not (root / "dataset.yaml").is_file():
        pytest.skip(f"CoNSeP not found at {root} (set DENUC_DATA to the folder holding consep/)")
    from denuc import DeNuC
    from denuc.data.base import open_dataset
    from denuc.evaluate import evaluate

    ds = open_dataset(root)

    def crop_points(stem: str, y0: int, x0: int):  # type: ignore[no-untyped-def]
        pts = ds.points(stem)
        inside = ((pts.xy >= (x0, y0)) & (pts.xy < (x0 + 256, y0 + 256))).all(1)
        return pts.select(inside)

    # the 256 px quarter of a val tile with the most points of its rarest class (all 3 present)
    crops = [(s, y0, x0) for s in ds.stems("val") for y0 in (0, 244) for x0 in (0, 244)]
    stem, y0, x0 = max(crops, key=lambda c: min(np.bincount(crop_points(*c).class_ids, minlength=3)))
    model = DeNuC.load(model="consep", device="cpu")
    assert model.class_names == tuple(COLON)
    out = model(ds.read_image(stem)[y0:y0 + 256, x0:x0 + 256], mpp=ds.mpp, name=stem)
    gt = crop_points(stem, y0, x0)
    gt.xy = gt.xy - (x0, y0)
    gt.mpp = ds.mpp
    assert out.class_names == tuple(COLON) and len(out) > 0.5 * len(gt)
    rep = evaluate({stem: gt}, {stem: out}, protocol="denuc", radius_um=3.0)
    # floors, not reported numbers (the head saw this tile in training): a swapped class order or a
    # wrong head drops far below them
    assert rep.detection.f1 > 0.5 and rep.mean_f1 > 0.35
    assert "consep" in shipped_models()
