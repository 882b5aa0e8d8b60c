"""Fast paths of the command line give exactly the reference path's values.

* the detector's CPU input normalisation by table lookup equals the tensor arithmetic bit for bit;
* the optical density by table lookup equals ``-log((I + 1) / 256)`` in float32 bit for bit;
* :func:`denuc.runtime.single_thread_glue` moves PyTorch's threads to ONNX Runtime only when
  every runner is ONNX Runtime, ONNX Runtime then splits batches over those threads, and a
  runner that falls back to PyTorch gets them back.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from denuc.data.stain import estimate_stains, macenko_normalize, to_od
from denuc.detect.model import DetectorConfig, build_detector, normalise


@pytest.fixture()
def torch_threads() -> Any:
    """Restore PyTorch's and ONNX Runtime's thread settings after the test."""
    import denuc.runtime.onnx as ro

    n, t = torch.get_num_threads(), ro.THREADS
    yield
    torch.set_num_threads(n)
    ro.set_threads(t)


@pytest.mark.parametrize("shape", [(2, 17, 23, 3), (9, 30, 3)])
def test_normalise_table_equals_tensor_arithmetic(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    x.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)  # every level
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    fast = normalise(x, mean, std, "cpu")
    ref = normalise(torch.from_numpy(x), mean, std)  # the tensor path
    assert fast.shape == ref.shape == (1 if len(shape) == 3 else shape[0], 3, *shape[-3:-1])
    assert fast.is_contiguous() and torch.equal(fast, ref)


def test_od_table_equals_formula() -> None:
    img = np.arange(256 * 3, dtype=np.int64).reshape(16, 16, 3) % 256
    img = img.astype(np.uint8)
    ref = -np.log((img.astype(np.float32) + 1.0) / 256.0)
    got = to_od(img)
    assert got.dtype == np.float32 and np.array_equal(got, ref)
    assert np.array_equal(to_od(img.astype(np.float32)), ref)  # non-uint8 input: the formula


def test_stain_estimate_and_normalise_unchanged_by_fast_paths() -> None:
    """The table-lookup OD and BLAS products reproduce a straightforward float64 computation."""
    rng = np.random.default_rng(1)
    h = np.array([0.65, 0.70, 0.29])
    e = np.array([0.07, 0.99, 0.11])
    conc = rng.gamma(2.0, 0.4, (64 * 64, 2))
    od = conc[:, :1] * h + conc[:, 1:] * e
    img = np.clip(256.0 * np.exp(-od) - 1.0, 0, 255).round().astype(np.uint8).reshape(64, 64, 3)
    est = estimate_stains(img)
    od64 = (-np.log((img.astype(np.float32) + 1.0) / 256.0)).reshape(-1, 3).astype(np.float64)
    tissue = od64[np.all(od64 > 0.15, axis=1)]
    c = tissue @ np.linalg.pinv(est.stains.T).T.copy()
    assert np.allclose(est.max_conc, np.percentile(c, 99, axis=0), rtol=1e-12, atol=0)
    out = macenko_normalize(img, estimate=est)
    assert out.shape == img.shape and out.dtype == np.uint8 and not np.array_equal(out, img)


class _Fake:
    def __init__(self, runtime: str) -> None:
        self.runtime = runtime


def test_single_thread_glue_only_when_every_runner_is_onnx(torch_threads: None) -> None:
    import denuc.runtime.onnx as ro
    from denuc.runtime import single_thread_glue

    torch.set_num_threads(2)
    ro.set_threads(None)
    assert single_thread_glue([_Fake("onnx"), _Fake("torch")]) is None
    assert torch.get_num_threads() == 2 and ro.THREADS is None
    assert single_thread_glue([_Fake("onnx"), _Fake("onnx")]) == 2
    assert torch.get_num_threads() == 1 and ro.THREADS == 2


def test_onnx_runner_splits_batches_over_its_own_threads(torch_threads: None) -> None:
    import denuc.runtime.onnx as ro

    class Session:
        def __init__(self) -> None:
            self.batches: list[int] = []

        def run(self, _names: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            self.batches.append(len(feeds["x"]))
            return [feeds["x"] * 2.0]

    model = torch.nn.Conv2d(3, 3, 1).eval()
    runner = ro.OnnxRunner(model)
    sess = Session()
    asked: list[int] = []
    runner._session_for = lambda shape, threads: asked.append(threads) or sess  # type: ignore[method-assign]
    x = torch.rand(5, 3, 4, 4)
    torch.set_num_threads(1)
    ro.set_threads(2)  # PyTorch on one thread, ONNX Runtime on two: the batch is split in two
    (out,) = runner(x)
    assert sorted(sess.batches) == [2, 3] and asked == [1] and torch.equal(out, x * 2.0)
    ro.set_threads(None)  # follows PyTorch again: one part
    sess.batches.clear()
    runner(x)
    assert sess.batches == [5]


def test_fallback_to_torch_gets_the_threads_back(torch_threads: None) -> None:
    import warnings

    import denuc.runtime.onnx as ro
    from denuc.runtime.base import TorchRunner, _FallbackRunner

    class Broken:
        runtime = "onnx"

        def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            raise RuntimeError("no session")

    model = build_detector(DetectorConfig(backbone="tiny")).eval()
    run = _FallbackRunner(Broken(), model, "raw", "detector")  # type: ignore[arg-type]
    ro.set_threads(2)
    torch.set_num_threads(1)
    x = torch.rand(1, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = run(x)
    assert run.runtime == "torch" and torch.get_num_threads() == 2
    assert torch.equal(out[0], TorchRunner(model, "raw")(x)[0])
