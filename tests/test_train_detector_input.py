"""Bad or risky input to ``denuc train-detector``: datasets sharing a folder name, resume with
changed settings, a used output folder, YAML value types, unclassified points with
``--classes``, unusable numbers; each is refused before work with one clear message, or
handled as documented."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from synthetic import write_blob_dataset
from test_train_detector import _cfg

from denuc.detect.checkpoint import read_meta
from denuc.errors import InputError, ModelError, ResolutionError
from denuc.train import detector_cli
from denuc.train.detector import train


def _quiet() -> tuple[list[str], object]:
    lines: list[str] = []
    return lines, lines.append


def _log_epochs(out: Path) -> list[int]:
    return [json.loads(x)["epoch"] for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_blob_dataset(tmp_path_factory.mktemp("blobs") / "tiny", n_train=2, n_val=1, size=64)


# ---------------------------------------------------------------- datasets
def test_two_datasets_with_the_same_folder_name_train_and_validate_together(tmp_path: Path) -> None:
    a = write_blob_dataset(tmp_path / "site1" / "converted", n_train=1, n_val=1, size=64)
    b = write_blob_dataset(tmp_path / "site2" / "converted", n_train=1, n_val=1, size=64)
    lines, log = _quiet()
    s = train(_cfg(a, tmp_path / "o", datasets=[str(a), str(b)], epochs=1), log=log)  # type: ignore[arg-type]
    assert s["best_epoch"] == 1 and any("2 train / 2 val" in x for x in lines)
    assert "val_f1" in json.loads((tmp_path / "o" / "log.jsonl").read_text())
    # checkpoint names the datasets apart, without this machine's absolute paths
    assert read_meta(tmp_path / "o" / "best.safetensors")["datasets"] == ["site1/converted", "site2/converted"]


def test_the_same_dataset_folder_twice_is_refused_before_any_work(ds: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ds.parent)
    for twice in ([str(ds), str(ds)], [str(ds), "tiny/"], [str(ds), "./tiny"]):
        with pytest.raises(InputError, match="given twice"):
            train(_cfg(ds, tmp_path / "o", datasets=twice), log=lambda s: None)
    assert not (tmp_path / "o").exists()


def test_checkpoint_names_a_relative_dataset_by_its_folder(ds: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ds)
    train(_cfg(ds, tmp_path / "o", datasets=["."], epochs=1), log=lambda s: None)
    assert read_meta(tmp_path / "o" / "last.safetensors")["datasets"] == ["tiny"]


# ---------------------------------------------------------------- resume
def test_resume_refuses_changed_settings_and_names_each_change(ds: Path, tmp_path: Path) -> None:
    out = tmp_path / "b"
    train(_cfg(ds, out, stop_after=1), log=lambda s: None)
    other = write_blob_dataset(tmp_path / "other", n_train=1, n_val=0, size=64)
    for kw, want in (({"mpp": 0.25, "lr": 0.1}, ["mpp: 0.5 -> 0.25", "lr: 0.001 -> 0.1"]),
                     ({"epochs": 3}, ["epochs: 2 -> 3", "schedule"]),
                     ({"datasets": [str(other)]}, ["datasets:"]),
                     ({"backbone": "shufflenetv2_0.5x"}, ["backbone: 'tiny' -> 'shufflenetv2_0.5x'"]),
                     ({"classes": True, "stain_p": 0.5}, ["classes: False -> True", "stain_p: 0.0 -> 0.5"])):
        with pytest.raises(InputError) as e:
            train(_cfg(ds, out, resume=True, **kw), log=lambda s: None)
        msg = str(e.value)
        assert "new --out" in msg and all(w in msg for w in want), msg
        assert "\n" not in msg
    assert _log_epochs(out) == [1]
    # options that do not change the computation may differ
    lines, log = _quiet()
    train(_cfg(ds, out, resume=True, workers=0, threads=1, progress=False, stop_after=0), log=log)  # type: ignore[arg-type]
    assert _log_epochs(out) == [1, 2] and any("resumed from" in x for x in lines)


def test_resume_without_a_state_says_so_and_starts_a_new_run(ds: Path, tmp_path: Path) -> None:
    lines, log = _quiet()
    train(_cfg(ds, tmp_path / "n", resume=True, epochs=1), log=log)  # type: ignore[arg-type]
    assert any("nothing to resume" in x and "new run" in x for x in lines)
    assert _log_epochs(tmp_path / "n") == [1]


def test_resume_of_a_state_without_settings_warns_and_a_misfit_model_is_a_model_error(ds: Path,
                                                                                     tmp_path: Path) -> None:
    out = tmp_path / "old"
    train(_cfg(ds, out, stop_after=1), log=lambda s: None)
    st = torch.load(out / "state.pt", weights_only=True)
    del st["config"]  # as written by versions before the settings were stored
    torch.save(st, out / "state.pt")
    with pytest.raises(ModelError, match="does not fit"):
        train(_cfg(ds, out, resume=True, backbone="shufflenetv2_0.5x"), log=lambda s: None)
    lines, log = _quiet()
    train(_cfg(ds, out, resume=True), log=log)  # type: ignore[arg-type]
    assert any(x.startswith("warning:") and "older version" in x for x in lines)
    assert _log_epochs(out) == [1, 2]
    (out / "state.pt").write_bytes(b"not a state")
    with pytest.raises(ModelError, match="not a readable training state"):
        train(_cfg(ds, out, resume=True), log=lambda s: None)


def test_a_kill_between_log_and_state_leaves_no_duplicate_epoch_line(ds: Path, tmp_path: Path) -> None:
    out = tmp_path / "k"
    train(_cfg(ds, out, stop_after=1), log=lambda s: None)
    # as if killed after epoch 2's log line but before its state.pt was written
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "loss": 1.0}) + "\n")
    train(_cfg(ds, out, resume=True), log=lambda s: None)
    assert _log_epochs(out) == [1, 2]


# ---------------------------------------------------------------- used output folder
def test_a_new_run_in_a_used_folder_is_refused_unless_overwrite(ds: Path, tmp_path: Path) -> None:
    out = tmp_path / "u"
    train(_cfg(ds, out), log=lambda s: None)
    best = (out / "best.safetensors").read_bytes()
    with pytest.raises(InputError, match="already holds a training run.*--resume.*new --out.*--overwrite"):
        train(_cfg(ds, out, epochs=1), log=lambda s: None)
    assert (out / "best.safetensors").read_bytes() == best and _log_epochs(out) == [1, 2]
    with pytest.raises(InputError, match="one of them"):
        train(_cfg(ds, out, resume=True, overwrite=True), log=lambda s: None)
    lines, log = _quiet()
    train(_cfg(ds, out, epochs=1, overwrite=True), log=log)  # type: ignore[arg-type]
    assert _log_epochs(out) == [1] and any("deleted the previous run" in x for x in lines)
    assert read_meta(out / "best.safetensors")["epochs"] == 1
    # a folder with only unrelated files is fine for a new run
    (tmp_path / "free").mkdir()
    (tmp_path / "free" / "notes.txt").write_text("x")
    train(_cfg(ds, tmp_path / "free", epochs=1), log=lambda s: None)


def test_resume_after_a_kill_before_the_first_state_starts_fresh(ds: Path, tmp_path: Path) -> None:
    """Files of a run killed before its first state.pt are stale: --resume deletes them and starts."""
    out = tmp_path / "k"
    train(_cfg(ds, out, epochs=1), log=lambda s: None)
    (out / "state.pt").unlink()  # as if killed between the epoch's checkpoints and its state
    lines, log = _quiet()
    train(_cfg(ds, out, epochs=1, resume=True), log=log)  # type: ignore[arg-type]
    assert any("nothing to resume" in x and "deleting the unfinished run" in x for x in lines)
    assert _log_epochs(out) == [1] and (out / "state.pt").is_file()


def test_without_val_the_lowest_train_loss_is_kept_even_when_above_one(tmp_path: Path) -> None:
    nv = write_blob_dataset(tmp_path / "noval", n_train=2, n_val=0, size=64)
    out = tmp_path / "nv"
    res = train(_cfg(nv, out, epochs=1, offset_weight=1000.0), log=lambda s: None)
    assert (out / "best.safetensors").is_file() and res["best_epoch"] == 1 and res["best_score"] < -1


def test_cli_has_an_overwrite_flag(ds: Path, tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    detector_cli.configure(p)
    cfg = detector_cli.resolve_config(p.parse_args([str(ds), "--overwrite", "--out", str(tmp_path)]))
    assert cfg.overwrite is True and cfg.resume is False


# ---------------------------------------------------------------- YAML types
def _resolve(tmp_path: Path, text: str, *argv: str) -> object:
    yml = tmp_path / "c.yaml"
    yml.write_text(text)
    p = argparse.ArgumentParser()
    detector_cli.configure(p)
    return detector_cli.resolve_config(p.parse_args(["--config", str(yml), *argv]))


@pytest.mark.parametrize("text, match", [
    ("classes: 'false'\n", "classes must be true or false"),
    ("resume: 'no'\n", "resume must be true or false"),
    ("progress: 0\n", "progress must be true or false"),
    ("mpp: '0.5'\n", "mpp must be a number"),
    ("lr: '1e-3'\n", "lr must be a number"),
    ("epochs: 2.7\n", "epochs must be a whole number"),
    ("epochs: true\n", "epochs must be a whole number"),
    ("datasets: {a: 1}\n", "datasets must be a list"),
    ("datasets: [a, 3]\n", "datasets must be a list"),
    ("backbone: 5\n", "backbone must be a string"),
    ("out:\n", "out must be given a value"),
    ("epoch: 3\n", r"unknown option\(s\) \['epoch'\]; known: \[.*'epochs'"),
    ("- a\n- b\n", "must be a mapping"),
])
def test_yaml_values_must_have_the_option_type(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(InputError, match=match) as e:
        _resolve(tmp_path, text)
    assert "c.yaml" in str(e.value)


def test_yaml_numbers_and_a_single_dataset_are_read_as_meant(tmp_path: Path) -> None:
    cfg = _resolve(tmp_path, "datasets: tiny\nlr: 1e-3\nmin_lr: 0\nclasses: false\ndevice:\nepochs: 3\ninit:\n")
    assert cfg.init == ""  # type: ignore[attr-defined]
    assert cfg.datasets == ["tiny"] and cfg.lr == 1e-3 and isinstance(cfg.min_lr, float)  # type: ignore[attr-defined]
    assert cfg.classes is False and cfg.device is None and cfg.epochs == 3  # type: ignore[attr-defined]


def test_command_line_datasets_replace_the_yaml_datasets(tmp_path: Path) -> None:
    text = "datasets: [from_yaml]\n"
    assert _resolve(tmp_path, text).datasets == ["from_yaml"]  # type: ignore[attr-defined]
    assert _resolve(tmp_path, text, "pos").datasets == ["pos"]  # type: ignore[attr-defined]
    assert _resolve(tmp_path, text, "--datasets", "flag").datasets == ["flag"]  # type: ignore[attr-defined]
    assert _resolve(tmp_path, text, "pos", "--datasets", "flag").datasets == ["flag", "pos"]  # type: ignore[attr-defined]


# ---------------------------------------------------------------- unusable numbers
@pytest.mark.parametrize("bad, err, match", [
    ({"epochs": 0}, InputError, "epochs"), ({"epochs": -1}, InputError, "epochs"),
    ({"stop_after": -1}, InputError, "stop after"), ({"batch_size": 0}, InputError, "batch size"),
    ({"crop": 0}, InputError, "crop"), ({"crop": 16}, InputError, "crop"),
    ({"lr": -0.1}, InputError, "learning rate"), ({"lr": math.nan}, InputError, "learning rate"),
    ({"min_lr": -1.0}, InputError, "final learning rate"), ({"weight_decay": -1.0}, InputError, "weight decay"),
    ({"crops_per_epoch": 0.0}, InputError, "crops per epoch"), ({"seed": -1}, InputError, "seed"),
    ({"val_radius_um": 0.0}, InputError, "val matching radius"),
    ({"score_threshold": 1.0}, InputError, "score threshold"),
    ({"mpp": 40.0}, ResolutionError, "magnification"), ({"mpp": 0.0}, ResolutionError, "mpp"),
    ({"loss_ref_mpp": 20.0}, ResolutionError, "loss reference mpp"),
])
def test_unusable_settings_are_refused_before_any_work(ds: Path, tmp_path: Path, bad: dict[str, object],
                                                       err: type[Exception], match: str) -> None:
    with pytest.raises(err, match=match):
        train(_cfg(ds, tmp_path / "o", **bad), log=lambda s: None)
    assert not (tmp_path / "o").exists()


def test_without_a_val_split_the_summary_names_the_train_loss(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    nv = write_blob_dataset(tmp_path / "noval", n_train=2, n_val=0, size=64)
    p = argparse.ArgumentParser()
    detector_cli.configure(p)
    args = p.parse_args([str(nv), "--preset", "quick", "--backbone", "tiny", "--epochs", "1", "--batch-size", "4",
                         "--crop", "64", "--no-progress", "--threads", "1", "--out", str(tmp_path / "o")])
    assert detector_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "val F1" not in out and "lowest train loss" in out and "no val split" in out
    loss = json.loads((tmp_path / "o" / "log.jsonl").read_text())["loss"]
    assert f"lowest train loss {loss:.4f}" in out


# ---------------------------------------------------------------- unclassified points
def test_unclassified_points_are_trained_as_nuclei_not_background() -> None:
    from denuc.detect.model import DetectorConfig, build_detector

    model = build_detector(DetectorConfig(backbone="tiny", num_classes=2, class_names=("a", "b"))).train()
    p = 16
    logits = torch.zeros(1, p, 3, requires_grad=True)
    points = torch.full((1, p, 2), 1000.0)
    points[0, 5] = torch.tensor([20.0, 20.0])  # the proposal on the GT point
    for label in (-1, 1):
        logits.grad = None
        t = [{"points": torch.tensor([[20.0, 20.0]]), "labels": torch.tensor([label])}]
        model.loss(logits, points, t)["loss_cls"].backward()
        g = logits.grad[0, 5]  # type: ignore[index]
        # gradient descent lowers the background logit of the matched proposal (a nucleus) ...
        assert float(g[0]) > 0, (label, g)
        if label == -1:  # ... and favours no class over another
            assert float(g[1]) == pytest.approx(float(g[2]))
        # every other proposal is background
        assert float(logits.grad[0, 0, 0]) < 0  # type: ignore[index]
    # a batch without unclassified points keeps the plain weighted cross-entropy
    t = [{"points": torch.tensor([[20.0, 20.0]]), "labels": torch.tensor([0])}]
    target = torch.zeros(p, dtype=torch.long)
    target[5] = 1
    want = torch.nn.functional.cross_entropy(logits[0], target, weight=model.cls_weight)
    assert torch.equal(model.loss(logits, points, t)["loss_cls"], want)


def _generic_with_unclassified(root: Path, size: int = 64) -> Path:
    """A generic-layout dataset (0.5 µm/px) of blobs, every third point without a class."""
    rng = np.random.default_rng(1)
    (root / "images").mkdir(parents=True)
    (root / "points").mkdir()
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    for i in range(3):
        c = rng.uniform(8, size - 8, (6, 2))
        img = 210 + rng.normal(0, 5, (size, size))
        for x, y in c:
            img -= 120 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / 8.0)
        Image.fromarray(np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, 2)).save(
            root / "images" / f"im{i}.png")
        rows = ["x,y,class"] + [f"{x:.2f},{y:.2f},{'' if k % 3 == 0 else ('a', 'b')[k % 2]}"
                                for k, (x, y) in enumerate(c)]
        (root / "points" / f"im{i}.csv").write_text("\n".join(rows) + "\n")
    (root / "dataset.yaml").write_text(yaml.safe_dump(
        {"mpp": 0.5, "classes": ["a", "b"], "splits": {"train": ["im0", "im1"], "val": ["im2"], "test": []}}))
    return root


def test_class_aware_training_keeps_unclassified_points_as_nuclei(tmp_path: Path) -> None:
    g = _generic_with_unclassified(tmp_path / "g")
    lines, log = _quiet()
    s = train(_cfg(g, tmp_path / "o", epochs=1, classes=True), log=log)  # type: ignore[arg-type]
    assert s["selected_by"] == "val mean class F1"
    assert any("4 unclassified training point(s)" in x and "unknown class" in x for x in lines)
    rec = json.loads((tmp_path / "o" / "log.jsonl").read_text())
    assert np.isfinite(rec["loss"]) and "val_mean_class_f1" in rec
    assert read_meta(tmp_path / "o" / "best.safetensors")["config"]["class_names"] == ["a", "b"]
