"""Both stages on images: DeNuC pipeline and `denuc predict` (tiny encoder/head, fake detector)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

from denuc.core.result import Nuclei
from denuc.data.image import read_image
from denuc.encode import build_encoder
from denuc.encode.tiny import register_tiny
from denuc.errors import ModelError, ResolutionError
from denuc.pipeline import DeNuC
from denuc.train.head import HeadTrainConfig
from denuc.train.head_run import train_head
from synthetic import make_blob_dataset

register_tiny()
SAMPLE = Path(__file__).resolve().parents[1] / "src" / "denuc" / "assets" / "sample"


class GridDetector:
    """Points every 12 px (score 0.9), in image pixels."""

    calls = 0

    def detect(self, image: np.ndarray, mpp: float) -> Nuclei:
        GridDetector.calls += 1
        h, w = image.shape[:2]
        ys, xs = np.mgrid[6:h:12, 6:w:12]
        xy = np.stack([xs.ravel(), ys.ravel()], 1).astype(float)
        return Nuclei(xy, scores=np.full(len(xy), 0.9), class_names=("nucleus",), mpp=mpp)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("pipe")
    ds = make_blob_dataset(root / "blobs", n_images=8)
    enc = build_encoder("tiny-uni", weights="random")
    head = root / "head.safetensors"
    train_head(ds, enc, head, cache_dir=root / "cache", config=HeadTrainConfig(epochs=20), window=64,
               log=lambda m: None)
    return ds, head


def test_pipeline_outputs_classes_scores_probs_and_speed(trained) -> None:  # type: ignore[no-untyped-def]
    ds, head = trained
    model = DeNuC.load(detector=GridDetector(), encoder="tiny-uni", head=head, weights="random")
    img = read_image(ds.image_path(ds.stems("test")[0]))
    out = model(img, mpp=0.25)
    assert len(out) == len(GridDetector().detect(img, 0.25))
    assert out.class_names == ("dark", "light") and out.probs is not None
    np.testing.assert_allclose(out.probs.sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(out.scores, 0.9 * out.probs.max(1), rtol=1e-5)
    assert set(out.meta["speed"]) == {"detect", "encode", "classify"}
    with pytest.raises(ResolutionError):
        model(img, mpp=None)
    # classify the labelled points of held-out images: well above chance
    acc = []
    for s in ds.stems("test") + ds.stems("val"):
        smp = ds.load(s)
        pred = model.classify(smp.image, smp.mpp, smp.points)
        acc.append(np.mean(pred.class_ids == smp.points.class_ids))
    assert np.mean(acc) > 0.8


def test_head_refuses_other_encoder_or_weights(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, head = trained
    with pytest.raises(ModelError, match="tiny-uni.*tiny-uni2h"):
        DeNuC.load(detector=GridDetector(), encoder="tiny-uni2h", head=head, weights="random")
    enc = build_encoder("tiny-uni", weights="random")
    sd = {k: v.clone() + 0.01 for k, v in enc.body.state_dict().items()}
    f = tmp_path / "other.safetensors"
    save_file(sd, str(f))
    with pytest.raises(ModelError, match="weights"):
        DeNuC.load(detector=GridDetector(), encoder="tiny-uni", head=head, weights=str(f))
    from dataclasses import replace

    from denuc.classify.head import read_meta
    from denuc.pipeline import check_head_encoder

    meta = read_meta(head)
    check_head_encoder(meta, enc, str(head))
    with pytest.raises(ModelError, match=r"trained with 96 px encoder inputs"):
        check_head_encoder(replace(meta, input_size=96), enc, str(head))


def test_heads_carry_their_taps_and_heads_without_taps_read_the_legacy_ones(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A head records the taps it reads and DeNuC.load builds the encoder with them; a head
    written before taps were recorded (no ``taps``) reads the spec's legacy taps (the last ViT
    block), and gives the same classes and probabilities as the same head with them recorded."""
    from dataclasses import replace

    from denuc.classify.head import head_taps, load_head, read_meta, save_head
    from denuc.pipeline import check_head_encoder

    ds, head = trained
    meta = read_meta(head)
    assert tuple(meta.taps) == head_taps(meta) == ("b-1",) and meta.dim == 32  # the default: the last block
    quarters = tmp_path / "quarters.safetensors"
    train_head(ds, "tiny-uni", quarters, weights="random", variant="quarters", cache_dir=tmp_path / "c",
               config=HeadTrainConfig(epochs=2), window=64, log=lambda m: None)
    assert tuple(read_meta(quarters).taps) == ("b-2", "b-1") and read_meta(quarters).dim == 64
    model = DeNuC.load(detector=GridDetector(), head=quarters, weights="random", device="cpu")
    assert model.encoder.taps == ("b-2", "b-1")  # built with the taps the head records
    last = tmp_path / "last.safetensors"
    train_head(ds, "tiny-uni", last, weights="random", variant="last", cache_dir=tmp_path / "c",
               config=HeadTrainConfig(epochs=5), window=64, log=lambda m: None)
    h, m_last, _ = load_head(last)
    assert (m_last.taps, m_last.encoder_variant, m_last.dim) == (["b-1"], "last", 32)
    old = tmp_path / "old.safetensors"  # as written before taps were recorded
    save_head(old, h, replace(m_last, taps=[], encoder_variant=""))
    assert head_taps(read_meta(old)) == ("b-1",)
    img = np.asarray(read_image(SAMPLE / "brca-m2c-sample.png"))[:96, :96]
    new_out, old_out = (DeNuC.load(detector=GridDetector(), head=p, weights="random", device="cpu")(img, 0.5)
                        for p in (last, old))
    np.testing.assert_array_equal(new_out.class_ids, old_out.class_ids)
    np.testing.assert_allclose(new_out.probs, old_out.probs, atol=1e-6)
    with pytest.raises(ModelError, match=r"reads tiny-uni taps b-1, but the encoder was built with taps b-2\+b-1"):
        check_head_encoder(read_meta(old), model.encoder, str(old))


def _predict(argv: list[str]) -> int:
    from denuc import pipeline_cli

    p = argparse.ArgumentParser()
    pipeline_cli.configure(p)
    return pipeline_cli.main(p.parse_args(argv))


def test_predict_cli_writes_csv_resumes_and_survives_bad_files(trained, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    _, head = trained
    loads = [0]
    options: list[dict[str, object]] = []

    def fake_load(cls, detector=None, encoder=None, head=None, device=None, **kw):  # type: ignore[no-untyped-def]
        loads[0] += 1
        options.append(kw)
        return DeNuC._orig_load(GridDetector(), encoder, head, device, weights="random")

    monkeypatch.setattr(DeNuC, "_orig_load", DeNuC.load, raising=False)
    monkeypatch.setattr(DeNuC, "load", classmethod(fake_load))
    out = tmp_path / "out"
    assert _predict([str(SAMPLE), "--out", str(out), "--mpp", "0.5", "--head", str(head)]) == 0
    csv = out / "brca-m2c-sample.csv"
    header = csv.read_text().splitlines()[0]
    assert header == "x,y,x_um,y_um,class,score,det_score,prob_dark,prob_light"
    n = Nuclei.read_csv(csv, class_names=("dark", "light"))
    assert len(n) > 10 and n.probs is not None
    assert _predict([str(SAMPLE), "--out", str(out), "--mpp", "0.5", "--head", str(head)]) == 0
    assert loads[0] == 2  # everything done: the models load once to check the fingerprint, nothing runs
    bad = tmp_path / "in"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    (bad / "ok.png").write_bytes((SAMPLE / "brca-m2c-sample.png").read_bytes())
    assert _predict([str(bad), "--out", str(out), "--mpp", "0.5", "--head", str(head)]) == 1
    assert (out / "ok.csv").is_file() and not (out / "broken.csv").exists()
    assert _predict([str(SAMPLE), "--out", str(tmp_path / "nompp"), "--head", str(head)]) == 1  # PNG: no mpp
    assert _predict([str(SAMPLE), "--out", str(out), "--mpp", "0.5", "--head", str(head), "--format", "geojson"]) == 0
    import json

    gj = json.loads((out / "brca-m2c-sample.geojson").read_text())
    assert len(gj["features"]) == len(n) and gj["features"][0]["properties"]["objectType"] == "detection"
    assert options[-1]["tta"] == 1 and options[-1]["detector_window"] is None
    assert _predict([str(SAMPLE), "--out", str(tmp_path / "o2"), "--mpp", "0.5", "--head", str(head),
                     "--tta", "4", "--detector-window", "512"]) == 0
    assert options[-1]["tta"] == 4 and options[-1]["detector_window"] == 512


def test_no_detections_gives_empty_result_with_prob_columns(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, head = trained

    class Nothing:
        def detect(self, image: np.ndarray, mpp: float) -> Nuclei:
            return Nuclei.empty(("nucleus",), mpp=mpp)

    model = DeNuC.load(detector=Nothing(), encoder="tiny-uni", head=head, weights="random")
    out = model(np.full((50, 60, 3), 200, np.uint8), mpp=0.25)
    assert len(out) == 0 and out.probs is not None and out.probs.shape == (0, 2)
    assert out.meta["windows_encoded"] == 0  # no point, no encoder pass
    out.to_csv(tmp_path / "e.csv")
    header = (tmp_path / "e.csv").read_text().splitlines()[0]
    assert header == "x,y,x_um,y_um,class,score,det_score,prob_dark,prob_light"


def test_stain_normalising_head_carries_its_normaliser_to_prediction(tmp_path: Path) -> None:
    ds = make_blob_dataset(tmp_path / "blobs", n_images=4)
    enc = build_encoder("tiny-uni", weights="random")
    head = tmp_path / "norm.safetensors"
    meta = train_head(ds, enc, head, cache_dir=tmp_path / "cache", config=HeadTrainConfig(epochs=2), window=64,
                      stain_norm="macenko", stain_augment=1, log=lambda m: None)
    assert meta.stain_norm == "macenko" and "stain norm macenko" in meta.describe()
    model = DeNuC.load(detector=GridDetector(), encoder="tiny-uni", head=head, weights="random")
    assert model.featurizer.stain_norm == "macenko"
    img = read_image(ds.image_path(ds.stems("test")[0]))
    assert len(model(img, mpp=0.25)) == len(GridDetector().detect(img, 0.25))


def test_feature_tta_head_carries_its_passes_to_prediction(tmp_path: Path) -> None:
    ds = make_blob_dataset(tmp_path / "blobs", n_images=4)
    enc = build_encoder("tiny-uni", weights="random")
    head = tmp_path / "tta.safetensors"
    meta = train_head(ds, enc, head, cache_dir=tmp_path / "cache", config=HeadTrainConfig(epochs=2), window=64,
                      feature_tta=2, stain_norm="macenko", log=lambda m: None)
    assert meta.feature_tta == 2 and "averaged over 2 passes" in meta.describe()
    model = DeNuC.load(detector=GridDetector(), encoder="tiny-uni", head=head, weights="random")
    assert model.featurizer.feature_tta == 2 and model.featurizer.stain_norm == "macenko"
    img = read_image(ds.image_path(ds.stems("test")[0]))
    out = model(img, mpp=0.25)
    assert len(out) == len(GridDetector().detect(img, 0.25)) and out.meta["windows_encoded"] > 0


def test_load_passes_detector_options_to_a_checkpoint_detector(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from model_fixtures import tiny_detector_checkpoint

    _, head = trained
    ckpt = tiny_detector_checkpoint(tmp_path / "det.safetensors")
    model = DeNuC.load(ckpt, head=head, device="cpu", weights="random", tta=4, detector_window=512)
    assert (model.detector.window, model.detector.stride, model.detector.tta) == (512, 448, 4)
    plain = DeNuC.load(ckpt, head=head, device="cpu", weights="random")
    assert (plain.detector.window, plain.detector.stride, plain.detector.tta) == (256, 192, 1)


def test_predict_takes_a_model_folder(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from model_fixtures import tiny_detector_checkpoint

    _, head = trained
    root = tmp_path / "mymodel"
    root.mkdir()
    tiny_detector_checkpoint(root / "detector.safetensors", score_threshold=0.5)
    (root / "head.safetensors").write_bytes(head.read_bytes())
    (root / "model.yaml").write_text("format: denuc-model/1\ndetector: detector.safetensors\nhead: head.safetensors\n"
                                     "encoder: tiny-uni\nweights: random\nclasses: [dark, light]\nmpp: 0.5\n"
                                     "thresholds: {detection: 0.3}\n")
    model = DeNuC.load(model=root, device="cpu")
    assert model.class_names == ("dark", "light") and model.detector.threshold == 0.3
    out = tmp_path / "out"
    assert _predict([str(SAMPLE), "--out", str(out), "--mpp", "0.5", "--model", str(root), "--device", "cpu"]) == 0
    n = Nuclei.read_csv(out / "brca-m2c-sample.csv")
    assert n.class_names == ("dark", "light") and len(n) > 0
    import json

    s = json.loads((out / "brca-m2c-sample.summary.json").read_text())
    assert s["models"]["detector"]["threshold"] == 0.3 and s["models"]["encoder"] == "tiny-uni"
    (root / "model.yaml").write_text("detector: nothing.safetensors\nhead: head.safetensors\nclasses: [a]\nmpp: 0.5\n")
    from denuc.cli import main

    assert main(["predict", str(SAMPLE), "--out", str(tmp_path / "o2"), "--mpp", "0.5", "--model", str(root)]) == 2


def test_predict_many_is_the_cli_engine_and_predict_slide_updates_the_table(trained, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from PIL import Image

    from denuc.stream.job import RunOptions

    _, head = trained
    model = DeNuC.load(detector=GridDetector(), encoder="tiny-uni", head=head, weights="random", device="cpu")
    d = tmp_path / "in"
    d.mkdir()
    for k in range(2):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (60, 80, 3), dtype=np.uint8)).save(d / f"p{k}.png")
    out = tmp_path / "o"
    opts = RunOptions(overlay=False, progress=False)
    res = model.predict_many([d], out, mpp=0.5, opts=opts)
    assert [(r.stem, r.status) for r in res.results] == [("p0", "done"), ("p1", "done")]
    assert res.results[0].summary["counts"].keys() == {"dark", "light"}
    rows = (out / "summary.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["p0", "p1"]
    Image.fromarray(np.full((60, 80, 3), 128, np.uint8)).save(d / "p2.png")
    model.predict_slide(d / "p2.png", mpp=0.5, out=out, opts=opts)  # one more: the table follows
    rows = (out / "summary.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["p0", "p1", "p2"]
