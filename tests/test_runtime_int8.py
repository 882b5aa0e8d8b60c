"""The 8-bit ONNX Runtime path (denuc.runtime.int8, ``--runtime onnx-int8``).

Tolerances (quantization error, not float rounding): a tiny detector's proposal logits within
0.1 relative RMS of PyTorch's, its points within 1 px. The shipped pipeline with the default
int8 encoder is checked against PyTorch in
``tests/test_runtime.py::test_shipped_pipeline_onnx_and_int8_against_torch_on_the_sample``
(sharing its export). Skips when onnxruntime/onnx are not installed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from denuc.detect.api import Detector
from denuc.detect.model import DetectorConfig, build_detector
from denuc.errors import ModelError
from denuc.runtime import RUNTIME_ENV, make_runner, onnx_available, resolve_runtime

pytestmark = pytest.mark.skipif(not onnx_available(), reason="onnxruntime/onnx not installed (pip install 'denuc[onnx]')")


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("int8-cache")


@pytest.fixture()
def cache(onnx_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DENUC_CACHE", str(onnx_cache))
    monkeypatch.delenv(RUNTIME_ENV, raising=False)
    return onnx_cache / "onnx"


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_detector(DetectorConfig(backbone="tiny", score_threshold=0.5)).eval()
    torch.nn.init.normal_(model.head.offset.weight, std=0.05)
    return model.requires_grad_(False)


def _rrms(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref - got).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())


def _calibration(shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((6, *shape)).astype(np.float32)


def test_resolve_int8(monkeypatch: pytest.MonkeyPatch) -> None:
    import denuc.runtime.base as base

    monkeypatch.delenv(RUNTIME_ENV, raising=False)
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


def test_int8_needs_calibration() -> None:
    with pytest.raises(ModelError, match="calibration"):
        make_runner(_tiny_model(), "onnx-int8", method="raw", name="det")
    # auto never picks int8 without calibration inputs, even when allowed
    assert make_runner(_tiny_model(), "auto", method="raw", auto_int8=True).runtime != "onnx-int8"


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


def test_int8_quantization_far_from_float_is_refused(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import denuc.runtime.int8 as int8

    monkeypatch.setattr(int8, "CHECK_RRMS", 0.0)  # any quantization error is now "too far"
    run = make_runner(_tiny_model(seed=5), "onnx-int8", method="raw", name="bad", calibration=_calibration)
    with pytest.raises(ModelError, match="too far from float32"):
        run(torch.from_numpy(_calibration((3, 64, 64))[:2]))
    assert not list(cache.glob("bad-int8-*.onnx"))  # nothing cached (its lock file may stay)


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
