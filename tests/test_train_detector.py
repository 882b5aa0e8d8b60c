"""Detector training on a tiny synthetic dataset: runs, logs, checkpoints, exact resume, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import write_blob_dataset

from denuc.detect.checkpoint import read_meta
from denuc.errors import InputError
from denuc.train import detector_cli
from denuc.train.detector import TrainConfig, cosine_lr, train


def _cfg(ds: Path, out: Path, **kw: object) -> TrainConfig:
    """The quick-start preset (0.5 µm/px, no init, no stain jitter, no held-back val) on the tiny backbone."""
    base = {"datasets": [str(ds)], "out": str(out), "backbone": "tiny", "epochs": 2, "batch_size": 4, "crop": 64,
            "progress": False, "threads": 1}
    base.update(kw)
    return TrainConfig.from_preset("quick", **base)


def test_cosine_schedule_ends() -> None:
    assert cosine_lr(0, 10, 1e-3, 1e-6) == pytest.approx(1e-3)
    assert cosine_lr(10, 10, 1e-3, 1e-6) == pytest.approx(1e-6)
    assert cosine_lr(5, 10, 1e-3, 1e-6) == pytest.approx(0.5 * (1e-3 + 1e-6))


def test_train_writes_self_describing_checkpoints_and_resume_is_exact(tmp_path: Path) -> None:
    ds = write_blob_dataset(tmp_path / "ds")
    full = train(_cfg(ds, tmp_path / "a"), log=lambda s: None)
    assert full["best_epoch"] >= 1
    log = [json.loads(x) for x in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    assert "val_f1" in log[0]
    meta = read_meta(tmp_path / "a" / "best.safetensors")
    for key in ("mpp", "nms_radius_um", "window", "stride", "margin", "datasets", "val_f1", "epochs",
                "version", "config"):
        assert key in meta, key
    assert meta["config"]["backbone"] == "tiny" and meta["config"]["class_names"] == ["nucleus"]
    assert meta["config"]["nms_radius_px"] == pytest.approx(6.0)

    # bit-exact resume is a CPU property: CUDA kernels (cuDNN backward, atomics) are not
    # deterministic, so the uninterrupted reference run and the resumed run both use the CPU
    ref_run = tmp_path / "a"
    if torch.cuda.is_available():  # run "a" trained on the GPU: a CPU reference run
        ref_run = tmp_path / "a_cpu"
        train(_cfg(ds, ref_run, device="cpu"), log=lambda s: None)
    train(_cfg(ds, tmp_path / "b", stop_after=1, device="cpu"), log=lambda s: None)
    assert len((tmp_path / "b" / "log.jsonl").read_text().splitlines()) == 1
    train(_cfg(ds, tmp_path / "b", resume=True, device="cpu"), log=lambda s: None)
    sa = torch.load(ref_run / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    assert sa["step"] == sb["step"]
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k

    # fine-tuning start: --init copies a checkpoint's weights (here checked before any step)
    from denuc.detect.checkpoint import load_detector

    init = tmp_path / "a" / "best.safetensors"
    train(_cfg(ds, tmp_path / "c", epochs=1, init=str(init), lr=0.0, min_lr=0.0), log=lambda s: None)
    ref, _ = load_detector(init)
    got = torch.load(tmp_path / "c" / "state.pt", map_location="cpu", weights_only=True)["model"]
    for k, v in ref.state_dict().items():
        if "running" not in k and "num_batches" not in k:  # BN statistics still move at lr 0
            assert torch.equal(v, got[k]), k


def test_cli_yaml_then_flags_and_class_aware_training(tmp_path: Path) -> None:
    ds = write_blob_dataset(tmp_path / "ds", n_train=2, n_val=1)
    yml = tmp_path / "c.yaml"
    yml.write_text(f"datasets: [{ds}]\npreset: quick\nbackbone: tiny\nepochs: 5\nbatch_size: 4\ncrop: 64\nprogress: false\n")
    p = argparse.ArgumentParser()
    detector_cli.configure(p)
    args = p.parse_args(["--config", str(yml), "--epochs", "1", "--threads", "1", "--classes", "--out", str(tmp_path / "o"),
                         "--matcher", "hungarian"])
    cfg = detector_cli.resolve_config(args)
    assert cfg.threads == 1 and cfg.epochs == 1 and cfg.classes and cfg.backbone == "tiny" and cfg.matcher == "hungarian"
    assert detector_cli.main(args) == 0
    meta = read_meta(tmp_path / "o" / "last.safetensors")
    assert meta["config"]["class_names"] == ["lymphocyte", "tumor", "stromal"]
    assert "val_mean_class_f1" in json.loads((tmp_path / "o" / "log.jsonl").read_text().splitlines()[0])
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    from denuc.errors import InputError

    with pytest.raises(InputError, match="unknown option"):
        detector_cli.resolve_config(p.parse_args(["--config", str(bad)]))
    stain = detector_cli.resolve_config(p.parse_args(["--config", str(yml), "--stain-p", "0.5", "--stain-space", "od"]))
    assert stain.stain_p == 0.5 and stain.stain_space == "od" and stain.stain_strength == 0.4
    with pytest.raises(InputError, match="stain jitter"):
        train(detector_cli.resolve_config(p.parse_args(["--config", str(yml), "--stain-space", "lab"])))


def test_loader_workers_do_not_change_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = write_blob_dataset(tmp_path / "ds", n_train=3, n_val=1)
    for w in (0, 2):
        train(_cfg(ds, tmp_path / f"w{w}", epochs=2, workers=w, stain_p=0.5, device="cpu"), log=lambda s: None)
    sa = torch.load(tmp_path / "w0" / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "w2" / "state.pt", weights_only=True)
    assert sa["step"] == sb["step"] > 0
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    with pytest.raises(InputError, match="workers"):
        train(_cfg(ds, tmp_path / "bad", workers=-2), log=lambda s: None)
    from denuc.train.detector import auto_workers

    assert auto_workers(-1, torch.device("cpu")) == 0 and auto_workers(3, torch.device("cpu")) == 3
    for cores, want in ((16, 4), (2, 1), (1, 0)):  # (choosing needs no CUDA)
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        assert auto_workers(-1, torch.device("cuda")) == want
