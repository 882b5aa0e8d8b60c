"""Inference runtimes (denuc.runtime): the ONNX Runtime path gives the PyTorch reference's results.

Tolerances (float32 on both sides; ONNX Runtime fuses and reorders operations): network outputs
within 1e-4 relative to their largest value, detected points within 1e-3 px with the same count,
scores within 1e-4, features within 1e-4 relative, classes equal. The 8-bit path
(``onnx-int8``, quantization error rather than rounding): a tiny detector's proposal logits
within 0.1 relative RMS of PyTorch's and its points within 1 px; the shipped pipeline's default
int8 encoder as stated in :func:`test_shipped_pipeline_onnx_and_int8_against_torch_on_the_sample`.
ONNX tests skip when onnxruntime/onnx are not installed (``pip install 'denuc[onnx]'``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from denuc.detect.api import Detector
from denuc.detect.model import DetectorConfig, build_detector
from denuc.errors import ModelError
from denuc.runtime import RUNTIME_ENV, TorchRunner, make_runner, onnx_available, resolve_runtime
from model_fixtures import tiny_detector_checkpoint

needs_onnx = pytest.mark.skipif(not onnx_available(), reason="onnxruntime/onnx not installed (pip install 'denuc[onnx]')")


@pytest.fixture()
def no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` decided by availability, not by the suite's DENUC_RUNTIME=torch (tests/conftest.py)."""
    monkeypatch.delenv(RUNTIME_ENV, raising=False)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ONNX cache for the module's tests (exports take seconds)."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture()
def cache(onnx_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DENUC_CACHE", str(onnx_cache))
    return onnx_cache / "onnx"


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_detector(DetectorConfig(backbone="tiny", score_threshold=0.5)).eval()
    torch.nn.init.normal_(model.head.offset.weight, std=0.05)
    return model.requires_grad_(False)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-6))


def _pair(ref: np.ndarray, got: np.ndarray, atol: float = 1e-3) -> np.ndarray:
    """Index into ``got`` of each ``ref`` point: the one within ``atol`` px (points of equal score
    may come in another order); fails unless every point has exactly one partner."""
    from scipy.spatial import cKDTree

    assert len(ref) == len(got)
    d, idx = cKDTree(got).query(ref)
    assert float(d.max(initial=0.0)) <= atol and len(set(idx.tolist())) == len(ref)
    return idx


# --------------------------------------------------------------------- choice
def test_resolve_runtime(no_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import denuc.runtime.base as base

    assert resolve_runtime("torch", "cpu") == "torch"
    assert resolve_runtime("auto", "cuda") == "torch"  # ONNX Runtime runs on the CPU only here
    monkeypatch.setattr(base, "onnx_available", lambda: False)
    assert resolve_runtime("auto", "cpu") == "torch" and resolve_runtime(None, "cpu") == "torch"
    with pytest.raises(ModelError, match=r"denuc\[onnx\]"):
        resolve_runtime("onnx", "cpu")
    monkeypatch.setattr(base, "onnx_available", lambda: True)
    assert resolve_runtime("auto", "cpu") == "onnx"
    with pytest.raises(ModelError, match="CPU only"):
        resolve_runtime("onnx", "cuda")
    monkeypatch.setattr(base, "AUTO_MAX_PARAMS", 10)  # large models stay on PyTorch
    assert resolve_runtime("auto", "cpu", _tiny_model()) == "torch"
    with pytest.raises(ModelError, match="unknown runtime 'tvm'"):
        resolve_runtime("tvm", "cpu")
    monkeypatch.setenv(RUNTIME_ENV, "torch")
    monkeypatch.setattr(base, "AUTO_MAX_PARAMS", 10**9)
    assert resolve_runtime("auto", "cpu") == "torch" and resolve_runtime("onnx", "cpu") == "onnx"
    monkeypatch.setenv(RUNTIME_ENV, "fast")
    with pytest.raises(ModelError, match="DENUC_RUNTIME='fast'"):
        resolve_runtime("auto", "cpu")


def test_torch_runner_runs_the_method() -> None:
    model = _tiny_model()
    x = torch.rand(2, 3, 64, 64)
    got = TorchRunner(model, "raw")(x)
    ref = model.raw(x)
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    assert make_runner(model, "torch", method="raw").runtime == "torch"


def test_auto_falls_back_to_torch_with_a_warning(no_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import denuc.runtime.base as base
    import denuc.runtime.onnx as ro

    def broken(*a: object, **k: object) -> None:
        raise ModelError("exporter says no")

    monkeypatch.setattr(base, "onnx_available", lambda: True)
    monkeypatch.setattr(ro, "module_key", lambda *a, **k: "0" * 64)
    monkeypatch.setattr(ro, "export_onnx", broken)
    monkeypatch.setattr(ro, "cache_dir", lambda: tmp_path / "cache")
    model = _tiny_model()
    run = make_runner(model, "auto", method="raw", name="detector")
    assert run.runtime == "onnx"
    x = torch.rand(1, 3, 64, 64)
    with pytest.warns(UserWarning, match="detector: ONNX Runtime failed .*exporter says no.*PyTorch"):
        out = run(x)
    assert run.runtime == "torch" and torch.equal(out[0], model.raw(x)[0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        run(x)
    with pytest.raises(ModelError, match="exporter says no"):  # asked for explicitly: the error surfaces
        make_runner(model, "onnx", method="raw")(x)


# ------------------------------------------------------------------------ onnx
@needs_onnx
def test_onnx_runner_matches_torch_caches_and_follows_weight_changes(cache: Path, monkeypatch: pytest.MonkeyPatch
                                                                     ) -> None:
    import denuc.runtime.onnx as ro

    model = _tiny_model(seed=1)
    run = make_runner(model, "onnx", method="raw", name="tiny detector")
    x = torch.rand(3, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    try:
        for b, t in ((3, 1), (1, 1), (3, 2), (1, 2)):  # the batch dimension is dynamic; 2 threads split it
            torch.set_num_threads(t)
            got, ref = run(x[:b]), model.raw(x[:b])
            assert [g.shape for g in got] == [r.shape for r in ref]
            assert max(_rel(r, g) for r, g in zip(ref, got, strict=True)) < 1e-4
    finally:
        torch.set_num_threads(threads)
    files = sorted(cache.glob("tiny_detector-3x64x96-*.onnx"))
    assert len(files) == 1 and not list(cache.glob(".*tmp*"))  # atomic: no temporary left

    def no_export(*a: object, **k: object) -> None:
        raise AssertionError("exported again although the cache holds the file")

    monkeypatch.setattr(ro, "export_onnx", no_export)
    again = make_runner(model, "onnx", method="raw", name="tiny detector")
    assert torch.equal(again(x)[0], run(x)[0])  # a new runner (or process) reuses the cached file
    monkeypatch.undo()
    monkeypatch.setenv("DENUC_CACHE", str(cache.parent))
    with torch.no_grad():  # weights written in place: the next call exports the new weights
        model.head.cls.bias.add_(0.5)
    got, ref = run(x), model.raw(x)
    assert max(_rel(r, g) for r, g in zip(ref, got, strict=True)) < 1e-4
    assert len(sorted(cache.glob("tiny_detector-3x64x96-*.onnx"))) == 2


@needs_onnx
def test_onnx_runner_leaves_training_mode_and_empty_batches_to_torch(cache: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import denuc.runtime.onnx as ro

    model = _tiny_model(seed=2)
    run = make_runner(model, "onnx", method="raw")
    monkeypatch.setattr(ro, "_session", lambda *a: (_ for _ in ()).throw(AssertionError("ONNX Runtime used")))
    assert run(torch.zeros(0, 3, 64, 64))[0].shape[0] == 0
    model.train()
    assert run(torch.rand(2, 3, 64, 64))[0].shape[0] == 2
    assert model.training


@needs_onnx
def test_detector_onnx_equals_torch_on_a_fixed_image(cache: Path, tmp_path: Path) -> None:
    ckpt = tiny_detector_checkpoint(tmp_path / "det.safetensors", seed=3, score_threshold=0.4)
    img = np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8)
    ref = Detector.load(ckpt, device="cpu", runtime="torch").detect(img, 0.5)
    fast = Detector.load(ckpt, device="cpu", runtime="onnx")
    got = fast.detect(img, 0.5)
    assert fast.describe()["runtime"] == "onnx" and len(ref) > 20
    k = _pair(ref.xy, got.xy)
    np.testing.assert_allclose(got.scores[k], ref.scores, atol=1e-4, rtol=0)


@needs_onnx
def test_featurizer_onnx_features_equal_torch(cache: Path) -> None:
    from denuc.encode import build_encoder
    from denuc.encode.tiny import register_tiny
    from denuc.query.predictor import PointFeaturizer

    register_tiny()
    enc = build_encoder("tiny-uni", "random")
    img = np.random.default_rng(1).integers(0, 256, (150, 170, 3), dtype=np.uint8)
    xy = np.random.default_rng(2).uniform([0, 0], [170, 150], (40, 2))
    feats = {}
    for rt in ("torch", "onnx"):
        fz = PointFeaturizer(enc, mpp=0.5, runtime=rt)
        assert fz.runner.runtime == rt and fz.with_stain_norm("none").runner is fz.runner
        fz.set_image(img, 0.5)
        feats[rt] = fz.features_at(xy)
    assert fz.windows_encoded > 1
    assert _rel(feats["torch"], feats["onnx"]) < 1e-4


@needs_onnx
@pytest.mark.slow
def test_shipped_pipeline_onnx_and_int8_against_torch_on_the_sample(cache: Path, no_env: None) -> None:
    """The fast paths against the PyTorch reference on a corner of the bundled BRCA-M2C sample.

    ``onnx`` (float32): at the same points, same classes and probabilities within 1e-4.
    ``auto`` (the default on the CPU: the encoder quantized to int8, :mod:`denuc.runtime.int8`):
    the same points (the detector stays float32), classes equal for at least 90 % of the nuclei
    (97 % on BRCA-M2C val, ``benchmarks/reported/runtime_accuracy.json``) and features within 0.1
    relative RMS.

    One export of the shipped architecture (an export takes seconds): the shipped encoder
    (EfficientNet-Lite0 taps, upsampled and concatenated), whose body is also the shipped
    detector's backbone; the int8 file is quantized from it. Both pipelines share the shipped
    detector, run by PyTorch, so the encoder is compared on identical points; ``auto`` would run
    that detector on ONNX Runtime too, and the detector's export (FPN, head, decoding) is compared
    with PyTorch in :func:`test_detector_onnx_equals_torch_on_a_fixed_image`.
    """
    from denuc.data.image import read_image
    from denuc.pipeline import ASSETS, DeNuC

    img = read_image(ASSETS / "sample" / "brca-m2c-sample.png")[:320, :320]  # the export is what is checked
    det = Detector.load(device="cpu", runtime="torch")  # the shipped detector
    assert resolve_runtime("auto", "cpu", det.model) == "onnx"  # auto would export it as well (float32)
    torch_model = DeNuC.load(det, device="cpu", runtime="torch")
    ref = torch_model(img, 0.5)
    model = DeNuC.load(det, device="cpu", runtime="onnx")
    got = model(img, 0.5)
    assert model.featurizer.runner.runtime == "onnx" and model.models()["encoder_runtime"] == "onnx"
    assert list(cache.glob("encoder-efficientnet-lite0-3x*.onnx"))  # the encoder really ran exported
    assert len(ref) > 50
    np.testing.assert_array_equal(got.xy, ref.xy)
    np.testing.assert_array_equal(got.det_scores, ref.det_scores)
    np.testing.assert_array_equal(got.class_ids, ref.class_ids)
    np.testing.assert_allclose(got.probs, ref.probs, atol=1e-4, rtol=0)

    q = DeNuC.load(det, device="cpu")  # auto
    assert q.featurizer.runner.runtime == "onnx-int8" and q.models()["encoder_runtime"] == "onnx-int8"
    got8 = q(img, 0.5)
    assert list(cache.glob("encoder-efficientnet-lite0-int8-3x224x224-*.onnx"))
    np.testing.assert_array_equal(got8.xy, ref.xy)
    same = float((got8.class_ids == ref.class_ids).mean())
    assert same >= 0.9, same
    torch_model.featurizer.set_image(img, 0.5)
    q.featurizer.set_image(img, 0.5)
    f_ref, f8 = torch_model.featurizer.features_at(ref.xy), q.featurizer.features_at(ref.xy)
    rrms = float((f_ref - f8).pow(2).mean().sqrt() / f_ref.pow(2).mean().sqrt())
    assert 0 < rrms < 0.1, rrms


def test_cli_runtime_option() -> None:
    from denuc.cli import build_parser

    p = build_parser()
    assert p.parse_args(["predict", "x.png", "--out", "o"]).runtime == "auto"
    assert p.parse_args(["detect", "x.png", "--out", "o", "--runtime", "torch"]).runtime == "torch"
    assert p.parse_args(["predict", "x.png", "--out", "o", "--runtime", "onnx-int8"]).runtime == "onnx-int8"
    with pytest.raises(SystemExit):
        p.parse_args(["predict", "x.png", "--out", "o", "--runtime", "tvm"])


# ---------------------------------------------------------------------- int8
def _rrms(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref - got).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def _calibration(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((6, *shape)).astype(np.float32)


def test_resolve_int8(no_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import denuc.runtime.base as base

    monkeypatch.setattr(base, "onnx_available", lambda: True)
    assert resolve_runtime("auto", "cpu", auto_int8=True) == "onnx-int8"
    assert resolve_runtime("auto", "cpu", auto_int8=False) == "onnx"
    assert resolve_runtime("auto", "cuda", auto_int8=True) == "torch"
    assert resolve_runtime("onnx-int8", "cpu") == "onnx-int8"
    with pytest.raises(ModelError, match="CPU only"):
        resolve_runtime("onnx-int8", "cuda")
    monkeypatch.setattr(base, "AUTO_INT8", False)
    assert resolve_runtime("auto", "cpu", auto_int8=True) == "onnx"
    monkeypatch.setattr(base, "onnx_available", lambda: False)
    with pytest.raises(ModelError, match=r"denuc\[onnx\]"):
        resolve_runtime("onnx-int8", "cpu")


@needs_onnx
def test_int8_needs_calibration(no_env: None) -> None:
    with pytest.raises(ModelError, match="calibration"):
        make_runner(_tiny_model(), "onnx-int8", method="raw", name="det")
    # auto never picks int8 without calibration inputs, even when allowed
    assert make_runner(_tiny_model(), "auto", method="raw", auto_int8=True).runtime != "onnx-int8"


@needs_onnx
def test_int8_runner_quantizes_caches_and_stays_close(cache: Path) -> None:
    import onnx

    model = _tiny_model()
    run = make_runner(model, "onnx-int8", method="raw", name="det", calibration=_calibration)
    assert run.runtime == "onnx-int8"
    x = torch.from_numpy(_calibration((3, 64, 64))[:4])
    logits, points = run(x)
    ref_logits, ref_points = model.raw(x)
    assert 0 < _rrms(ref_logits, logits) < 0.1  # quantized: close, but not float32-equal
    assert float((ref_points - points).abs().max()) < 1.0  # px
    files = sorted(cache.glob("det-int8-3x64x64-*.onnx"))
    assert len(files) == 1 and run.errors[(3, 64, 64)]["out0"] < 0.1
    ops = {n.op_type for n in onnx.load(str(files[0])).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # really 8-bit
    # a second runner reuses the file; other calibration inputs make another file
    again = make_runner(model, "onnx-int8", method="raw", name="det", calibration=_calibration)
    torch.testing.assert_close(again(x)[0], logits)
    assert again.errors == {}
    other = make_runner(model, "onnx-int8", method="raw", name="det", calibration=lambda s: 0.5 * _calibration(s))
    other(x)
    assert len(list(cache.glob("det-int8-3x64x64-*.onnx"))) == 2


@needs_onnx
def test_int8_quantization_far_from_float_is_refused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import denuc.runtime.int8 as int8

    monkeypatch.setattr(int8, "CHECK_RRMS", 0.0)  # any quantization error is now "too far"
    before = set(cache.glob("*.onnx"))
    # other calibration inputs than any other test's force a new quantization
    run = make_runner(_tiny_model(), "onnx-int8", method="raw", name="det", calibration=lambda s: 0.25 * _calibration(s))
    with pytest.raises(ModelError, match="too far from float32"):
        run(torch.from_numpy(_calibration((3, 64, 64))[:2]))
    assert not [f for f in set(cache.glob("*.onnx")) - before if "int8" in f.name]  # no int8 file cached


@needs_onnx
def test_int8_calibration_shape_is_checked(cache: Path) -> None:
    run = make_runner(_tiny_model(), "onnx-int8", method="raw", name="shape",
                      calibration=lambda s: np.zeros((3, 3, 32, 32), np.float32))
    with pytest.raises(ModelError, match="calibration inputs have shape"):
        run(torch.zeros(1, 3, 64, 64))


def test_detector_calibration_inputs_are_its_windows(tmp_path: Path) -> None:
    """The detector's calibration batch: sample-image windows at its mpp, normalised as its inputs."""
    from denuc.data.resample import resample, resample_factor
    from denuc.detect.model import normalise
    from denuc.runtime.int8 import sample_rgb

    det = Detector.load(device="cpu", runtime="torch")
    x = det.calibration_inputs((3, 256, 256))
    rgb, mpp = sample_rgb()
    img = resample(rgb, resample_factor(mpp, det.mpp))
    assert x.dtype == np.float32 and x.shape[1:] == (3, 256, 256) and len(x) >= 9
    cfg = det.model.config
    np.testing.assert_array_equal(x[0], normalise(img[:256, :256], cfg.mean, cfg.std).numpy()[0])
    last = normalise(img[-256:, -256:], cfg.mean, cfg.std).numpy()[0]  # the grid ends flush with the image
    np.testing.assert_array_equal(x[-1], last)
