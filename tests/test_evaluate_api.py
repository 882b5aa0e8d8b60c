"""evaluate(): counting, F1 definitions, inputs (mappings, folders, datasets), radius, CLI."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from denuc.core.result import Nuclei
from denuc.errors import InputError, ResolutionError
from denuc.evaluate import Counts, EvalReport, evaluate
from denuc.evaluate.predictions import convert_yxc_predictions, read_predictions

CLS = ("a", "b")


def nuc(xy, cls=None, scores=None, mpp: float | None = 0.5, names=CLS) -> Nuclei:
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    ids = None if cls is None else np.asarray(cls, dtype=np.int64)
    return Nuclei(xy, scores, ids, names, mpp=mpp)


def two_images() -> tuple[dict[str, Nuclei], dict[str, Nuclei]]:
    gt = {
        "im1": nuc([[0, 0], [10, 0], [20, 0]], [0, 0, 1]),
        "im2": nuc([[0, 0], [50, 50]], [1, 1]),
    }
    pred = {
        "im1": nuc([[1, 0], [10, 1], [40, 0]], [0, 1, 1], [0.9, 0.8, 0.7]),  # 2 det TP; class a: 1 TP
        "im2": nuc([[0, 2], [50, 53.5]], [1, 1], [0.5, 0.5]),  # r = 3: 1 det TP (3.5 > 3)
    }
    return gt, pred


# ------------------------------------------------------------------ counting
def test_counts_pooled_over_images() -> None:
    gt, pred = two_images()
    rep = evaluate(gt, pred, protocol="denuc", radius_px=3.0)
    assert isinstance(rep, EvalReport)
    assert (rep.detection.tp, rep.detection.n_pred, rep.detection.n_gt) == (3, 5, 5)
    a, b = rep.classes["a"], rep.classes["b"]
    assert (a.tp, a.n_pred, a.n_gt) == (1, 1, 2)
    assert (b.tp, b.n_pred, b.n_gt) == (1, 4, 3)  # im2 (0,2)-(0,0); im1 (10,1) is class b, GT (10,0) class a
    assert rep.detection.f1 == pytest.approx(2 * 3 / 10)
    assert a.precision == 1.0 and a.recall == 0.5 and a.f1 == pytest.approx(2 / 3)
    assert rep.mean_f1 == pytest.approx((2 / 3 + 2 / 7) / 2)
    assert rep.per_image["im1"].detection.tp == 2 and rep.per_image["im2"].detection.tp == 1
    assert rep.radius_px == 3.0 and rep.radius_um == 1.5 and rep.n_images == 2
    # a larger radius reaches (50, 53.5)
    assert evaluate(gt, pred, radius_px=3.5).detection.tp == 4
    assert evaluate(gt, pred, protocol="mcspatnet", radius_px=3.5).detection.tp == 3  # strict


def test_zero_division_definitions() -> None:
    assert Counts(0, 0, 0).to_dict() == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0, "n_pred": 0,
                                         "n_gt": 0, "empty": True}
    assert Counts(0, 5, 0).f1 == 0.0 and Counts(0, 5, 0).precision == 0.0 and Counts(0, 5, 0).recall == 0.0
    assert Counts(0, 0, 5).f1 == 0.0
    assert Counts(2, 2, 2).f1 == 1.0 and "empty" not in Counts(2, 2, 2).to_dict()


def test_empty_class_is_flagged_warned_and_counts_zero_in_mean() -> None:
    gt = {"im": nuc([[0, 0]], [0])}
    pred = {"im": nuc([[0, 0]], [0])}
    with pytest.warns(UserWarning, match="neither predictions nor ground truth"):
        rep = evaluate(gt, pred, radius_px=2.0)
    assert rep.classes["a"].f1 == 1.0 and rep.classes["b"].empty
    assert rep.mean_f1 == 0.5
    assert rep.to_dict()["classes"]["b"]["empty"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert evaluate(gt, pred, radius_px=2.0, classes=["a"]).mean_f1 == 1.0


def test_predictions_without_classes_count_for_detection_only() -> None:
    gt = {"im": nuc([[0, 0], [5, 5]], [0, 1])}
    pred = {"im": nuc([[0, 0], [5, 5]], None, names=())}
    rep = evaluate(gt, pred, radius_px=1.0)
    assert rep.detection.f1 == 1.0
    assert rep.classes["a"].n_pred == 0 and rep.classes["a"].f1 == 0.0


def test_score_order_reaches_the_report() -> None:
    gt = {"im": nuc([[0, 0], [2.5, 0]], [0, 0])}
    # pred 0 only reaches GT 0; pred 1 reaches both GTs but is nearer to GT 0 (1.0 vs 1.5)
    pred = {"im": nuc([[-1, 0], [1.0, 0]], [0, 0], [0.1, 0.9])}
    kw = {"radius_px": 1.5, "classes": ["a"]}
    assert evaluate(gt, pred, protocol="denuc", **kw).detection.tp == 1  # confident pred 1 steals GT 0
    pred["im"].scores = np.array([0.9, 0.1], np.float32)
    assert evaluate(gt, pred, protocol="denuc", **kw).detection.tp == 2  # pred 0 first, pred 1 -> GT 1
    assert evaluate(gt, pred, protocol="hungarian", **kw).detection.tp == 2


# ------------------------------------------------------------------ radius
def test_radius_um_uses_each_images_mpp() -> None:
    gt = {"fine": nuc([[0, 0]], [0], mpp=0.25), "coarse": nuc([[0, 0]], [0], mpp=0.5)}
    pred = {"fine": nuc([[5, 0]], [0], mpp=None), "coarse": nuc([[5, 0]], [0], mpp=None)}
    rep = evaluate(gt, pred, radius_um=2.0, classes=["a"])  # 8 px on fine, 4 px on coarse
    assert rep.per_image["fine"].detection.tp == 1 and rep.per_image["coarse"].detection.tp == 0
    assert rep.radius_px is None and rep.radius_um == 2.0
    assert rep.to_dict()["radius_px_range"] == [4.0, 8.0]
    assert "4-8 px" in rep.table()


def test_protocol_default_radius_and_errors() -> None:
    gt = {"im": nuc([[0, 0]], [0], mpp=0.5)}
    pred = {"im": nuc([[6, 0]], [0], mpp=None)}
    rep = evaluate(gt, pred, protocol="denuc", classes=["a"])  # 3 µm = 6 px at 0.5, inclusive
    assert rep.radius_px == 6.0 and rep.radius_um == 3.0 and rep.detection.tp == 1
    assert evaluate(gt, pred, protocol="mcspatnet", classes=["a"]).detection.tp == 0  # strict at 6 px
    assert evaluate(gt, pred, protocol="puma", classes=["a"]).radius_px == 7.5
    with pytest.raises(InputError, match="at most one"):
        evaluate(gt, pred, radius_px=1.0, radius_um=1.0)
    with pytest.raises(InputError, match="radius_px"):
        evaluate(gt, pred, radius_px=0.0)
    no_mpp = {"im": nuc([[0, 0]], [0], mpp=None)}
    with pytest.raises(ResolutionError, match="radius_px"):
        evaluate(no_mpp, pred)
    assert evaluate(no_mpp, pred, radius_px=6.0, classes=["a"]).radius_um is None


def test_prediction_mpp_is_rescaled_to_the_gt() -> None:
    gt = {"im": nuc([[100, 100]], [0], mpp=0.25)}
    pred = {"im": nuc([[50, 50]], [0], mpp=0.5)}  # same physical point at half the resolution
    assert evaluate(gt, pred, radius_px=0.5, classes=["a"]).detection.tp == 1


# ------------------------------------------------------------------ inputs
def test_missing_predictions() -> None:
    gt, pred = two_images()
    del pred["im2"]
    with pytest.raises(InputError, match="im2"):
        evaluate(gt, pred, radius_px=3.0)
    rep = evaluate(gt, pred, radius_px=3.0, missing="empty")
    assert rep.per_image["im2"].detection.n_pred == 0 and rep.detection.n_gt == 5
    with pytest.raises(InputError, match="missing must be"):
        evaluate(gt, pred, radius_px=3.0, missing="skip")


def test_unknown_class_and_protocol_errors() -> None:
    gt, pred = two_images()
    pred["im1"] = nuc([[0, 0]], [0], names=("zebra",))
    with pytest.raises(InputError, match="zebra"):
        evaluate(gt, pred, radius_px=3.0)
    gt2, pred2 = two_images()
    with pytest.raises(InputError, match="not in the ground-truth vocabulary"):
        evaluate(gt2, pred2, radius_px=3.0, classes=["c"])
    with pytest.raises(Exception, match="known: denuc"):
        evaluate(gt2, pred2, protocol="nope", radius_px=3.0)


def test_prediction_class_vocabulary_is_remapped() -> None:
    gt = {"im": nuc([[0, 0], [9, 9]], [0, 1])}
    pred = {"im": nuc([[0, 0], [9, 9]], [1, 0], names=("b", "a"))}  # same classes, other order
    rep = evaluate(gt, pred, radius_px=1.0)
    assert rep.classes["a"].tp == 1 and rep.classes["b"].tp == 1


def test_csv_prediction_folder(tmp_path: Path) -> None:
    gt, pred = two_images()
    folder = tmp_path / "preds"
    pred["im1"].to_csv(folder / "im1.csv")
    (folder / "im2.csv").write_text("")  # empty file = no predictions
    (folder / "other.csv").write_text("x,y,class\n1,1,a\n")  # not in the GT: ignored
    rep = evaluate(gt, folder, radius_px=3.0)
    assert rep.per_image["im2"].detection.n_pred == 0
    assert rep.per_image["im1"].detection.tp == 2
    assert rep.detection.tp == 2 and "other" not in rep.per_image
    (folder / "im2.csv").unlink()
    with pytest.raises(InputError, match=r"im2\.csv.*missing"):
        evaluate(gt, folder, radius_px=3.0)
    (folder / "im2.csv").write_text("x,y,class\n1,1,zebra\n")
    with pytest.raises(InputError, match="zebra"):
        evaluate(gt, folder, radius_px=3.0)
    with pytest.raises(InputError, match="does not exist"):
        read_predictions(tmp_path / "nope", ["im1"], CLS)


# ------------------------------------------------------------------ datasets and CLI
def make_brca_like(root: Path) -> Path:
    """A 2-image BRCA-M2C-layout dataset (test split) with 'y x class' labels."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    labels = {"s1": [(5, 5, 1), (20, 20, 2), (30, 10, 3)], "s2": [(8, 8, 2)]}
    for stem, rows in labels.items():
        Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "images" / f"{stem}.png")
        (root / "labels" / f"{stem}_gt_class_coords.txt").write_text("".join(f"{y} {x} {c}\n" for y, x, c in rows))
    (root / "brca_ds_train.txt").write_text("")
    (root / "brca_ds_val.txt").write_text("")
    (root / "brca_ds_test.txt").write_text("s1.png\ns2.png\n")
    return root


def test_dataset_folder_and_brca_prediction_format(tmp_path: Path) -> None:
    data = make_brca_like(tmp_path / "data")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "s1_pred_class_coords.txt").write_text("5 6 1\n20 20 3\n")  # (x=6, y=5) lym; (20, 20) wrong class
    (raw / "s2_pred_class_coords.txt").write_text("")
    rep = evaluate(data, raw, split="test", pred_format="brca-m2c", radius_px=2.0)
    assert list(rep.classes) == ["lymphocyte", "tumor", "stromal"]
    assert (rep.detection.tp, rep.detection.n_pred, rep.detection.n_gt) == (2, 2, 4)
    assert rep.classes["lymphocyte"].tp == 1 and rep.classes["tumor"].tp == 0 and rep.split == "test"
    # default radius: 3 µm at the dataset's 0.5 µm/px
    assert evaluate(data, raw, split="test", pred_format="brca-m2c").radius_px == 6.0
    # converting to CSV gives the same report
    csv_dir = tmp_path / "csv"
    assert len(convert_yxc_predictions(raw, csv_dir)) == 2
    assert evaluate(data, csv_dir, split="test", radius_px=2.0).to_dict() == rep.to_dict()


def _run_cli(argv: list[str]) -> int:
    from denuc.evaluate import cli

    parser = argparse.ArgumentParser()
    cli.configure(parser)
    return cli.main(parser.parse_args(argv))


def test_cli_writes_json_with_the_documented_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_brca_like(tmp_path / "data")
    preds = tmp_path / "preds"
    nuc([[6, 5], [20, 20]], [0, 1], [0.9, 0.8], names=("lymphocyte", "tumor", "stromal")).to_csv(preds / "s1.csv")
    (preds / "s2.csv").write_text("x,y,class,score\n")
    out = tmp_path / "out" / "report.json"
    assert _run_cli([str(data), "--split", "test", "--pred", str(preds), "--protocol", "hungarian",
                     "--radius-um", "1.5", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "detection" in printed and "mean class F1" in printed and "hungarian" in printed
    d = json.loads(out.read_text())
    keys = {"precision", "recall", "f1", "tp", "n_pred", "n_gt"}
    assert keys <= set(d["detection"])
    assert set(d["classes"]) == {"lymphocyte", "tumor", "stromal"}
    assert all(keys <= set(v) for v in d["classes"].values())
    assert d["protocol"] == "hungarian" and d["radius_px"] == 3.0 and d["radius_um"] == 1.5
    assert d["split"] == "test" and d["n_images"] == 2 and set(d["per_image"]) == {"s1", "s2"}
    assert d["detection"]["tp"] == 2 and d["classes"]["tumor"]["tp"] == 1
    assert d["mean_f1"] == pytest.approx(np.mean([d["classes"][c]["f1"] for c in d["classes"]]))
    assert not list(out.parent.glob(".*tmp"))  # atomic write left no temp file
    # --print-format json prints the summary
    assert _run_cli([str(data), "--split", "test", "--pred", str(preds), "--print-format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["protocol"] == "denuc"
    # the former spelling --format still works, with a deprecation warning
    assert _run_cli([str(data), "--split", "test", "--pred", str(preds), "--format", "json"]) == 0
    got = capsys.readouterr()
    assert json.loads(got.out)["protocol"] == "denuc" and "--format is deprecated" in got.err and "--print-format" in got.err


def test_cli_errors_name_the_file(tmp_path: Path) -> None:
    data = make_brca_like(tmp_path / "data")
    preds = tmp_path / "preds"
    preds.mkdir()
    (preds / "s1.csv").write_text("x,y,class\n")
    with pytest.raises(InputError, match="s2"):
        _run_cli([str(data), "--split", "test", "--pred", str(preds)])
    with pytest.raises(SystemExit):
        _run_cli([str(data), "--pred", str(preds), "--radius-px", "1", "--radius-um", "1"])


# ------------------------------------------------------------------ properties
xy_lists = st.lists(st.tuples(st.integers(0, 30), st.integers(0, 30), st.integers(0, 1)), max_size=30)


@settings(max_examples=60, deadline=None)
@given(xy_lists, xy_lists, st.sampled_from(["denuc", "ocelot", "puma", "mcspatnet", "hungarian"]),
       st.sampled_from([1.0, 3.0, 6.0]))
def test_scores_are_in_unit_interval(g, p, protocol, r) -> None:
    def mk(rows):
        a = np.array(rows, dtype=float).reshape(-1, 3)
        return nuc(a[:, :2], a[:, 2].astype(int))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = evaluate({"im": mk(g)}, {"im": mk(p)}, protocol=protocol, radius_px=r)
    for c in [rep.detection, *rep.classes.values()]:
        assert 0.0 <= c.precision <= 1.0 and 0.0 <= c.recall <= 1.0 and 0.0 <= c.f1 <= 1.0
        assert c.tp <= min(c.n_pred, c.n_gt)
    assert 0.0 <= rep.mean_f1 <= 1.0
    assert sum(c.tp for c in rep.classes.values()) <= rep.detection.tp or protocol != "hungarian"
