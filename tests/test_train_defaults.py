"""Training commands as a new user meets them: the recipe defaults and the named presets,
--outside and --data-mpp flags, held-back val, no empty --out after a failed check, the
class-aware start from a class-agnostic detector; head calibration (temperature, ECE) and
class balancing."""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from synthetic import make_points_dataset

from denuc.classify.head import HeadMeta, PointHead, load_head, read_meta, save_head
from denuc.cli import main as cli_main
from denuc.encode.tiny import register_tiny
from denuc.errors import InputError
from denuc.train import detector_cli
from denuc.train.calibration import class_report, fit_temperature, reliability
from denuc.train.detector import train
from denuc.train.detector_config import PRESETS, TrainConfig
from denuc.train.head import HEAD_PRESETS, HeadTrainConfig

register_tiny()
ASSETS = Path(__file__).resolve().parents[1] / "src" / "denuc" / "assets"


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_points_dataset(tmp_path_factory.mktemp("d") / "ds", n_images=5, size=64, n_blobs=6)


def _quick(ds: Path, out: Path, **kw: object) -> TrainConfig:
    base = {"datasets": [str(ds)], "out": str(out), "backbone": "tiny", "epochs": 1, "batch_size": 4, "crop": 64,
            "progress": False, "threads": 1}
    return TrainConfig.from_preset("quick", **{**base, **kw})


# ------------------------------------------------------------------ train-detector defaults and presets
def test_detector_defaults_are_the_recipe_and_quick_is_the_former_quick_start(tmp_path: Path) -> None:
    d = TrainConfig()
    assert (d.backbone, d.mpp, d.init, d.stain_p, d.stain_space) == ("efficientnet-lite0", 0.25, "shipped", 0.8, "hed")
    assert (d.epochs, d.lr, d.crops_per_epoch, d.val_fraction) == (10, 3e-4, 0.5, 0.1)
    q = TrainConfig.from_preset("quick")
    assert (q.backbone, q.mpp, q.init, q.epochs, q.lr, q.stain_p, q.val_fraction) == (
        "shufflenetv2_1.0x", 0.5, "", 100, 1e-3, 0.0, 0.0)
    assert set(PRESETS) == {"recipe", "quick"}
    with pytest.raises(InputError, match="unknown train-detector preset"):
        TrainConfig.from_preset("fast")
    # the shipped detector's last training stage is the recipe (same backbone, mpp, lr and stain jitter)
    from denuc.detect.checkpoint import read_meta as det_meta

    shipped = det_meta(ASSETS / "detector.safetensors")["train"]
    for k in ("backbone", "mpp", "lr", "stain_p", "stain_strength", "stain_space", "crops_per_epoch"):
        assert shipped[k] == getattr(d, k), k
    # CLI: the preset under YAML and flags
    p = argparse.ArgumentParser()
    detector_cli.configure(p)
    cfg = detector_cli.resolve_config(p.parse_args(["x", "--preset", "quick", "--epochs", "3", "--no-progress"]))
    assert cfg.backbone == "shufflenetv2_1.0x" and cfg.epochs == 3 and cfg.progress is False
    yml = tmp_path / "c.yaml"
    yml.write_text("preset: quick\nlr: 0.01\n")
    cfg = detector_cli.resolve_config(p.parse_args(["x", "--config", str(yml)]))
    assert cfg.mpp == 0.5 and cfg.lr == 0.01
    assert detector_cli.resolve_config(p.parse_args(["x", "--config", str(yml), "--preset", "recipe"])).mpp == 0.25


def test_init_of_another_backbone_is_refused_before_any_work(ds: Path, tmp_path: Path) -> None:
    out = tmp_path / "o" / "deeper"
    with pytest.raises(InputError, match="has backbone efficientnet-lite0 but --backbone is tiny.*--init ''"):
        train(TrainConfig(datasets=[str(ds)], out=str(out), backbone="tiny"), log=lambda m: None)
    assert not (tmp_path / "o").exists()


def test_outside_flag_and_no_empty_out_after_a_failed_load(ds: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(ds, bad)
    f = sorted((bad / "points").glob("*.csv"))[0]
    f.write_text(f.read_text() + "500.0,3.0,dark\n")
    out = tmp_path / "runs" / "o"
    argv = ["train-detector", str(bad), "--preset", "quick", "--backbone", "tiny", "--epochs", "1", "--batch-size", "4",
            "--crop", "64", "--no-progress", "--threads", "1", "--out", str(out)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "outside the" in err and "--outside drop" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not out.parent.exists()  # the failed run left no empty folders
    with pytest.warns(UserWarning, match="dropped"):
        assert cli_main(argv + ["--outside", "drop"]) == 0
    assert (out / "best.safetensors").is_file()


def test_a_dataset_without_val_holds_back_train_images(tmp_path: Path) -> None:
    nv = make_points_dataset(tmp_path / "nv", n_images=6, size=64, n_blobs=6, with_val=False)
    lines: list[str] = []
    train(_quick(nv, tmp_path / "o", val_fraction=0.2), log=lines.append)
    assert any("held back as val" in x for x in lines) and any("4 train / 1 val" in x for x in lines)
    assert "val_f1" in json.loads((tmp_path / "o" / "log.jsonl").read_text().splitlines()[0])
    # the head's carving holds back the same images
    from denuc.data.base import open_dataset
    from denuc.data.splits import train_val_stems
    from denuc.train.head import split_train_val

    d = open_dataset(nv)
    assert train_val_stems(d, 0.2, 0)[:2] == split_train_val(d, 0, 0.2, log=lambda m: None)[:2]


def test_class_aware_training_starts_from_a_class_agnostic_detector(ds: Path, tmp_path: Path) -> None:
    from denuc.detect.checkpoint import load_detector
    from denuc.detect.model import DetectorConfig, build_detector
    from denuc.train.detector import load_init

    train(_quick(ds, tmp_path / "a"), log=lambda m: None)
    src, _ = load_detector(tmp_path / "a" / "best.safetensors")
    k = 3
    model = build_detector(DetectorConfig(backbone="tiny", num_classes=k, class_names=("a", "b", "c"))).eval()
    assert "copied to the 3 classes" in load_init(model, tmp_path / "a" / "best.safetensors")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        p_src = src.raw(x)[0].softmax(-1)[..., 0]
        p_new = model.raw(x)[0].softmax(-1)
    assert torch.allclose(p_src, p_new[..., 0], atol=1e-5)  # same background probability
    assert torch.allclose(p_new[..., 1], p_new[..., 2])  # every class starts alike
    train(_quick(ds, tmp_path / "c", classes=True, init=str(tmp_path / "a" / "best.safetensors")), log=lambda m: None)
    assert (tmp_path / "c" / "best.safetensors").is_file()


# ------------------------------------------------------------------ train-head defaults
def test_head_presets_match_the_shipped_head_and_the_cli_defaults() -> None:
    meta = read_meta(ASSETS / "head-efficientnet-lite0-brca.safetensors")
    shipped = HEAD_PRESETS["shipped"]
    for k in ("epochs", "lr", "weight_decay", "select", "stain_augment", "stain_space", "stain_strength"):
        assert meta.train[k] == shipped[k], k
    assert meta.stain_norm == shipped["stain_norm"]
    from denuc.train import head_cli

    p = argparse.ArgumentParser()
    head_cli.configure(p)
    args = p.parse_args(["--data", "d", "--out", "h.safetensors"])
    assert head_cli.resolved(args) == shipped
    paper = head_cli.resolved(p.parse_args(["--data", "d", "--out", "h", "--preset", "paper", "--epochs", "7"]))
    assert paper == {**HEAD_PRESETS["paper"], "epochs": 7}
    assert args.class_balance == "none" and args.calibrate is True


def test_train_head_cli_with_data_mpp_prints_per_class_scores_and_calibration(
        ds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    nompp = tmp_path / "nompp"
    shutil.copytree(ds, nompp)
    cfg = yaml.safe_load((nompp / "dataset.yaml").read_text())
    del cfg["mpp"]
    (nompp / "dataset.yaml").write_text(yaml.safe_dump(cfg))
    base = ["train-head", str(nompp), "--encoder", "tiny-uni", "--weights", "random", "--out",
            str(tmp_path / "h.safetensors"), "--cache-dir", str(tmp_path / "c"), "--preset", "paper", "--epochs", "3"]
    assert cli_main(base) == 2
    err = capsys.readouterr().err
    assert "--data-mpp" in err and "--mpp 0.5" not in err
    assert cli_main([*base, "--data-mpp", "0.5", "--class-weights", "auto"]) == 0
    got = capsys.readouterr()
    assert "precision" in got.out and "recall" in got.out and "dark" in got.out
    assert "--class-weights is deprecated" in got.err
    meta = read_meta(tmp_path / "h.safetensors")
    assert meta.train["class_balance"] == "weighted" and set(meta.val_report["per_class"]) == {"dark", "light"}
    assert meta.calibration["points"] > 0


# ------------------------------------------------------------------ calibration
def test_fit_temperature_recovers_a_known_temperature() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (20000, 3))
    p = torch.softmax(torch.as_tensor(z / 2.0), 1).numpy()  # the labels follow softmax(z / 2)
    y = np.array([rng.choice(3, p=row) for row in p])
    assert fit_temperature(z, y) == pytest.approx(2.0, rel=0.05)
    rel = reliability(p, y)
    assert rel["ece"] < 0.02 and sum(b["count"] for b in rel["bins"]) == len(y)
    over = reliability(torch.softmax(torch.as_tensor(z), 1).numpy(), y)  # T = 1: overconfident
    assert over["ece"] > 0.05


def test_class_report_counts() -> None:
    rep = class_report(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0]), ["a", "b"])
    assert rep["confusion"] == [[1, 1], [1, 2]]
    assert rep["per_class"]["a"]["precision"] == 0.5 and rep["per_class"]["b"]["recall"] == pytest.approx(2 / 3)
    assert rep["accuracy"] == 0.6


def test_temperature_is_stored_applied_and_old_heads_keep_one(tmp_path: Path) -> None:
    head = PointHead(4, 2)
    meta = HeadMeta(classes=["a", "b"], colors=[[0, 0, 0]] * 2, encoder="tiny-uni", weights_hash="x", dim=4, mpp=0.25,
                    window=64, stride=48, align="center", input_size=64, temperature=2.5)
    save_head(tmp_path / "t.safetensors", head, meta)
    loaded, m, _ = load_head(tmp_path / "t.safetensors")
    x = torch.randn(10, 4)
    assert m.temperature == 2.5 and loaded.temperature == 2.5
    with torch.no_grad():
        assert torch.allclose(loaded(x) * 2.5, head(x), atol=1e-5)
    # a head written before temperatures were recorded (no key in its metadata) loads with T = 1
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as f:
        d = json.loads(f.metadata()["denuc"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for k in ("temperature", "calibration", "val_report"):
        d.pop(k)
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata={"denuc": json.dumps(d)})
    assert load_head(tmp_path / "old.safetensors")[0].temperature == 1.0
    assert load_head(ASSETS / "head-efficientnet-lite0-brca.safetensors")[0].temperature == 1.0
    d["temperature"] = -1.0
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"denuc": json.dumps(d)})
    from denuc.errors import ModelError

    with pytest.raises(ModelError, match="temperature"):
        load_head(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("balance", ["none", "weighted", "sampled"])
def test_class_balance_modes_train(balance: str) -> None:
    from denuc.train.features import PointFeatures
    from denuc.train.head import fit_head

    rng = np.random.default_rng(0)
    n = 400
    labels = (rng.random(n) < 0.1).astype(np.int64)  # 10 % of class 1
    feats = (rng.normal(0, 1, (n, 8)) + labels[:, None] * 1.0).astype(np.float16)
    pf = PointFeatures(feats, labels, np.zeros(n, np.int32), np.zeros((n, 2)), np.ones(n, np.float32), ["a"], [0.5])
    hist: list[dict[str, float]] = []
    head, _ = fit_head(pf, 2, HeadTrainConfig(epochs=20, class_balance=balance), log=lambda m: None, history=hist)
    assert [h["epoch"] for h in hist] == list(range(1, 21)) and all(math.isfinite(h["loss"]) for h in hist)
    with torch.no_grad():
        share = float((head(torch.from_numpy(feats.astype(np.float32))).argmax(1) == 1).float().mean())
    if balance == "none":
        assert share < 0.1  # the minority class is under-predicted ...
    else:
        assert share > 0.2  # ... and balancing predicts it more often
    with pytest.raises(InputError, match="class balance"):
        HeadTrainConfig(class_balance="oversample").check()
