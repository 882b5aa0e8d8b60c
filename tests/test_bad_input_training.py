"""Bad input to head training, the feature cache, checkpoints and evaluation: refused before any
work with one clear message, never a traceback or a silently unusable result."""

from __future__ import annotations

import errno
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from denuc.classify.head import HeadMeta, PointHead, load_head, read_meta, save_head
from denuc.cli import main as cli_main
from denuc.core.result import Nuclei
from denuc.encode import build_encoder
from denuc.encode.tiny import register_tiny
from denuc.errors import InputError, ModelError
from denuc.evaluate.api import evaluate
from denuc.train.head import HeadTrainConfig
from denuc.train.head_run import train_head
from synthetic import make_blob_dataset

register_tiny()
ASSETS = Path(__file__).resolve().parents[1] / "src" / "denuc" / "assets"
QUIET = {"window": 64, "stride": 48, "log": lambda m: None}


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return make_blob_dataset(tmp_path_factory.mktemp("blobs"), n_images=8)


def _generic(blobs, root: Path, classes: list[str], relabel: dict[str, str] | None = None,  # type: ignore[no-untyped-def]
             splits: dict[str, list[str]] | None = None) -> Path:
    """The blob dataset in the generic layout, with another class list / relabelled points."""
    (root / "images").mkdir(parents=True)
    (root / "points").mkdir()
    for s in blobs.stems():
        shutil.copy(blobs.image_path(s), root / "images" / f"{s}.png")
        pts = blobs.points(s)
        names = [(relabel or {}).get(blobs.classes[c], blobs.classes[c]) for c in pts.class_ids]
        rows = ["x,y,class"] + [f"{x},{y},{c}" for (x, y), c in zip(pts.xy, names)]
        (root / "points" / f"{s}.csv").write_text("\n".join(rows) + "\n")
    sp = splits or {"train": blobs.stems("train"), "val": blobs.stems("val"), "test": blobs.stems("test")}
    (root / "dataset.yaml").write_text(yaml.safe_dump({"mpp": 0.25, "classes": classes, "splits": sp}))
    return root


def _enc():  # type: ignore[no-untyped-def]
    return build_encoder("tiny-uni", weights="random")


# ------------------------------------------------------------------ unusable heads
@pytest.mark.parametrize("bad, match", [
    ({"lr": float("nan")}, "learning rate"), ({"lr": 0.0}, "learning rate"), ({"lr": -1.0}, "learning rate"),
    ({"lr": float("inf")}, "learning rate"), ({"epochs": 0}, "epochs"), ({"epochs": -1}, "epochs"),
    ({"batch_size": 0}, "batch size"), ({"weight_decay": -1e-4}, "weight decay"),
    ({"weight_decay": float("nan")}, "weight decay"), ({"momentum": 1.0}, "momentum"), ({"momentum": -0.1}, "momentum"),
])
def test_unusable_hyper_parameters_are_refused_before_any_work(blobs, tmp_path: Path, bad, match) -> None:  # type: ignore[no-untyped-def]
    out, cache = tmp_path / "h.safetensors", tmp_path / "cache"
    with pytest.raises(InputError, match=match):
        train_head(blobs, _enc(), out, cache_dir=cache, config=HeadTrainConfig(**bad), **QUIET)
    assert not out.exists() and not cache.exists()  # nothing written, no feature extracted


def test_numbers_in_messages_are_plain(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InputError) as e:
        train_head(blobs, _enc(), tmp_path / "h.safetensors", config=HeadTrainConfig(lr=np.float64(-3.0)), **QUIET)
    assert "-3.0" in str(e.value) and "np." not in str(e.value)
    gt = {"a": Nuclei(np.array([[5.0, 5.0]]))}
    with pytest.raises(InputError) as e:
        evaluate(gt, gt, radius_px=np.float64(-3.0))
    assert "-3.0" in str(e.value) and "np." not in str(e.value)


def test_diverging_training_raises_and_writes_nothing(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "h.safetensors"
    with pytest.raises(ModelError, match="diverged"):
        train_head(blobs, _enc(), out, cache_dir=tmp_path / "c", config=HeadTrainConfig(epochs=3, lr=1e38), **QUIET)
    assert not out.exists()


def test_head_with_nan_weights_is_refused_at_load(tmp_path: Path) -> None:
    head = PointHead(4, 2)
    with torch.no_grad():
        head.net[-1].weight.fill_(float("nan"))
    meta = HeadMeta(classes=["a", "b"], colors=[[0, 0, 0]] * 2, encoder="tiny-uni", weights_hash="x", dim=4, mpp=0.25,
                    window=64, stride=48, align="center", input_size=64)
    save_head(tmp_path / "nan.safetensors", head, meta)
    with pytest.raises(ModelError, match="NaN"):
        load_head(tmp_path / "nan.safetensors")


def test_class_without_training_points_is_named_recorded_and_never_predicted(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _generic(blobs, tmp_path / "ds", ["dark", "necrosis", "light"])
    out = tmp_path / "h.safetensors"
    with pytest.warns(UserWarning, match="necrosis"):
        meta = train_head(root, _enc(), out, cache_dir=tmp_path / "c", config=HeadTrainConfig(epochs=5), **QUIET)
    assert meta.untrained_classes == ["necrosis"] and meta.train["class_points"]["necrosis"] == 0
    assert read_meta(out).untrained_classes == ["necrosis"] and "never predicts" in read_meta(out).describe()
    head, _, _ = load_head(out)
    feats = torch.randn(500, meta.dim) * 50  # whatever the features, the class gets probability 0
    probs = torch.softmax(head(feats), dim=1)
    assert torch.isfinite(probs).all() and probs[:, 1].max() == 0 and (probs.argmax(1) != 1).all()
    assert set(probs.argmax(1).tolist()) <= {0, 2}


def test_a_single_labelled_class_is_refused(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _generic(blobs, tmp_path / "ds", ["dark", "light"], relabel={"light": "dark"})
    out = tmp_path / "h.safetensors"
    with pytest.raises(InputError, match="only class 'dark' has training points"):
        train_head(root, _enc(), out, cache_dir=tmp_path / "c", config=HeadTrainConfig(epochs=2), **QUIET)
    assert not out.exists() and not (tmp_path / "c").exists()  # refused before any feature extraction


def test_single_training_image_trains_with_select_last(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _generic(blobs, tmp_path / "ds", ["dark", "light"], splits={"train": blobs.stems("train")[:1]})
    with pytest.raises(InputError, match="2 training images"):  # select on val: val is needed
        train_head(root, _enc(), tmp_path / "v.safetensors", cache_dir=tmp_path / "c", **QUIET)
    meta = train_head(root, _enc(), tmp_path / "l.safetensors", cache_dir=tmp_path / "c",
                      config=HeadTrainConfig(epochs=2, select="last"), **QUIET)
    assert meta.train["train_images"] == 1 and meta.train["val_images"] == 0 and meta.val_scores["epoch"] == 2


# ------------------------------------------------------------------ CLI checks before work
def _cli(capsys, *argv: str) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    rc = cli_main(["train-head", *argv])
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize("extra, match", [
    (["--batch-size", "0"], "batch size"), (["--work-mpp", "0"], "mpp"), (["--epochs", "0"], "epochs"),
    (["--lr", "nan"], "learning rate"), (["--weight-decay", "-1"], "weight decay"),
])
def test_cli_bad_numbers_are_one_line_errors(blobs, tmp_path: Path, capsys, extra, match) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache"
    rc, err = _cli(capsys, str(_generic(blobs, tmp_path / "ds", ["dark", "light"])), "--encoder", "tiny-uni",
                   "--weights", "random", "--out", str(tmp_path / "h.safetensors"), "--cache-dir", str(cache),
                   "--window", "64", *extra)
    assert rc == 2 and match in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not cache.exists()


def test_unusable_out_and_cache_are_refused_before_extraction(blobs, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache"
    folder = tmp_path / "heads"
    folder.mkdir()
    with pytest.raises(InputError, match="is a folder"):
        train_head(blobs, _enc(), folder, cache_dir=cache, **QUIET)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        train_head(blobs, _enc(), afile / "h.safetensors", cache_dir=cache, **QUIET)
    with pytest.raises(InputError, match="--cache-dir"):
        train_head(blobs, _enc(), tmp_path / "h.safetensors", cache_dir=afile / "cache", **QUIET)
    assert not cache.exists()

    from denuc.train import features

    def read_only(*a, **k):  # type: ignore[no-untyped-def]
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(features.tempfile, "TemporaryFile", read_only)  # as on a read-only mount (tests may run as root)
    with pytest.raises(InputError, match="Read-only file system"):
        train_head(blobs, _enc(), tmp_path / "ro" / "h.safetensors", cache_dir=cache, **QUIET)
    assert not cache.exists() and not (tmp_path / "ro").exists()


# ------------------------------------------------------------------ the feature cache
def test_corrupt_cache_files_are_a_miss(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache"
    cfg = HeadTrainConfig(epochs=3)
    first = train_head(blobs, _enc(), tmp_path / "a.safetensors", cache_dir=cache, config=cfg, **QUIET)
    files = sorted((cache / "features").glob("*.npz"))
    assert len(files) == 2
    files[0].write_bytes(files[0].read_bytes()[:200])  # truncated
    files[1].write_bytes(b"")  # empty
    with pytest.warns(UserWarning, match="bad feature-cache file"):
        again = train_head(blobs, _enc(), tmp_path / "b.safetensors", cache_dir=cache, config=cfg, **QUIET)
    assert again.val_scores == first.val_scores
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten: a third run reads them without complaint
        train_head(blobs, _enc(), tmp_path / "c.safetensors", cache_dir=cache, config=cfg, **QUIET)


def test_replaced_image_is_not_served_from_the_cache(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = _generic(blobs, tmp_path / "ds", ["dark", "light"])
    enc = _enc()
    calls = [0]
    enc.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    cfg = HeadTrainConfig(epochs=2)
    train_head(root, enc, tmp_path / "a.safetensors", cache_dir=tmp_path / "c", config=cfg, **QUIET)
    n = calls[0]
    train_head(root, enc, tmp_path / "b.safetensors", cache_dir=tmp_path / "c", config=cfg, **QUIET)
    assert calls[0] == n  # unchanged images: cached
    img = root / "images" / f"{blobs.stems('train')[0]}.png"
    Image.fromarray(np.zeros((96, 96, 3), np.uint8)).save(img)  # same labels, another image
    train_head(root, enc, tmp_path / "c.safetensors", cache_dir=tmp_path / "c", config=cfg, **QUIET)
    assert calls[0] > n


# ------------------------------------------------------------------ checkpoint mix-ups
def test_head_and_detector_checkpoints_are_told_apart() -> None:
    from denuc.detect.api import Detector
    from denuc.detect.checkpoint import read_meta as read_detector_meta

    head = ASSETS / "head-efficientnet-lite0-brca.safetensors"
    with pytest.raises(ModelError, match="classification head checkpoint, not a detector"):
        read_detector_meta(head)
    with pytest.raises(ModelError, match="classification head checkpoint, not a detector"):
        Detector.load(head)
    with pytest.raises(ModelError, match="detector checkpoint, not a classification head"):
        load_head(ASSETS / "detector.safetensors")


# ------------------------------------------------------------------ evaluate input
def _eval_folder(tmp_path: Path, csv: str, **kw):  # type: ignore[no-untyped-def]
    pred = tmp_path / "pred"
    pred.mkdir(exist_ok=True)
    (pred / "a.csv").write_text(csv)
    gt = {"a": Nuclei(np.array([[5.0, 5.0], [20.0, 30.0]]), class_ids=[0, 1], class_names=("x", "y"),
                      image_size=(40, 40))}
    return evaluate(gt, pred, radius_px=3.0, **kw), pred / "a.csv"


@pytest.mark.parametrize("csv, match", [
    ("x,y,class,score\n5,5,x,high\n", "score must be numbers"),
    ("x,y,class,score\n5,5,x,nan\n", "score contains NaN"),
    ("x,y,class,score\n5,5,x,\n20,30,y,0.5\n", "score contains NaN"),
    ("x,y,class,score\n1e308,5,x,0.5\n", "absurd coordinates"),
])
def test_bad_prediction_files_name_the_file(tmp_path: Path, csv: str, match: str) -> None:
    with pytest.raises(InputError, match=match) as e:
        _eval_folder(tmp_path, csv)
    assert str(tmp_path / "pred" / "a.csv") in str(e.value)


def test_absurd_coordinates_from_the_api_are_refused() -> None:
    gt = {"a": Nuclei(np.array([[5.0, 5.0]]))}
    with pytest.raises(InputError, match="absurd coordinates"):
        evaluate(gt, {"a": Nuclei(np.array([[1e308, 5.0]]))}, radius_px=3.0)


def test_predictions_outside_the_image_warn_with_file_and_count(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"2 prediction\(s\) in 1 file\(s\) lie outside") as w:
        rep, path = _eval_folder(tmp_path, "x,y,class\n5,5,x\n-500,5000,x\n45,3,y\n")
    assert str(path) in str(w[0].message)
    assert rep.detection.n_pred == 3 and rep.detection.tp == 1  # kept, counted as false positives


def test_duplicated_predictions_warn_with_file_and_count(tmp_path: Path) -> None:
    csv = "x,y,class\n5,5,x\n5,5,x\n20,30,y\n5,5,y\n20,30.5,y\n"  # (5, 5) three times: 2 repeats
    with pytest.warns(UserWarning, match=r"2 prediction\(s\) in 1 file\(s\) repeat the \(x, y\)") as w:
        rep, path = _eval_folder(tmp_path, csv)
    assert len(w) == 1 and f"{path}: 2 (e.g. (x, y) = (5, 5))" in str(w[0].message)
    assert rep.detection.n_pred == 5 and rep.detection.tp == 2  # kept: the repeats are false positives
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _eval_folder(tmp_path, "x,y,class\n5,5,x\n20,30,y\n")  # no repeats, nothing outside: silent


def test_yxc_prediction_errors_name_the_file(tmp_path: Path) -> None:
    pred = tmp_path / "pred"
    pred.mkdir()
    (pred / "a_pred_class_coords.txt").write_text("5 5 1\nnan 3 2\n")
    gt = {"a": Nuclei(np.array([[5.0, 5.0]]), class_ids=[0], class_names=("x", "y"))}
    with pytest.raises(InputError, match="a_pred_class_coords.txt"):
        evaluate(gt, pred, radius_px=3.0, pred_format="brca-m2c")


def test_empty_class_list_is_refused_by_the_cli(blobs, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    # (the API keeps classes=() as "detection only", which train-detector uses)
    root = _generic(blobs, tmp_path / "ds", ["dark", "light"])
    pred = tmp_path / "pred"
    for s in blobs.stems():
        blobs.points(s).to_csv(pred / f"{s}.csv")
    ok = cli_main(["evaluate", str(root), "--pred", str(pred), "--classes", "dark,", "--radius-px", "3"])
    assert ok == 0
    capsys.readouterr()
    rc = cli_main(["evaluate", str(root), "--pred", str(pred), "--classes", ",", "--radius-px", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and "--classes" in err and "names no class" in err


@pytest.mark.parametrize("line,match", [("5 5 1.7", "whole numbers"), ("nan 5 1", "NaN or infinite"),
                                        ("5 inf 2", "NaN or infinite")])
def test_yxc_label_files_refuse_fractional_ids_and_non_finite_values(tmp_path, line, match) -> None:  # type: ignore[no-untyped-def]
    from denuc.data.readers.brca_m2c import read_yxc_file

    p = tmp_path / "a_gt_class_coords.txt"
    p.write_text("3 4 1\n" + line + "\n")
    with pytest.raises(InputError, match=match) as e:
        read_yxc_file(p)
    assert str(p) in str(e.value)
    p.write_text("3 4 1\n5 5 2.0\n")  # a whole number written as a float is fine
    assert read_yxc_file(p).class_ids.tolist() == [0, 1]
