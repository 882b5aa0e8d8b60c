"""ONNX Runtime with 8-bit weights and activations: the fast CPU runtime ``onnx-int8``.

The module is exported to ONNX as by :mod:`denuc.runtime.onnx` (float32, cached), then
quantized statically with ONNX Runtime's tools: weights to int8 per output channel, activations
to uint8 with one scale per tensor, calibrated (:data:`PERCENTILE` of the values) on a fixed
batch of inputs that the caller provides (``calibration(shape) -> (N, *shape) float32``: for the shipped models, the
windows of the bundled sample image prepared exactly as the model's real inputs, see
:func:`sample_rgb`). Quantize-dequantize pairs around every convolution and matrix product
let ONNX Runtime run them as integer kernels (VNNI where the CPU has it).

The int8 file is cached beside the float32 one under a key of the float32 file, the
calibration batch's bytes and :data:`FORMAT`, written atomically under a file lock. A new
quantization is checked against the float32 graph on the calibration batch: each output's
relative RMS difference must be at most :data:`CHECK_RRMS`, else :class:`ModelError` (the file
is not cached). Results differ from float32 by quantization error, not by rounding: the
pipeline's points and classes are compared with PyTorch's in ``tests/test_runtime.py`` and on
real data by ``benchmarks/runtime_accuracy.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from denuc.core.files import atomic_target
from denuc.errors import ModelError
from denuc.runtime.onnx import OnnxRunner, _session, cache_dir, cached_file

#: bumped when the quantization recipe changes (part of every int8 cache key).
FORMAT = "denuc-int8/1"
#: largest relative RMS difference (per output) between a new int8 graph and its float32 graph
#: on the calibration batch; a broken quantization is far above it.
CHECK_RRMS = 0.25
#: activation ranges: this percentile of each tensor's values on the calibration batch (chosen on
#: BRCA-M2C and CoNSeP val over min-max: closer to float32 for both networks,
#: ``benchmarks/runtime_accuracy.py``).
PERCENTILE = 99.99
#: windows of the calibration batch at most (evenly spread over what the caller provides).
CALIBRATION_MAX = 64

Calibration = Callable[[tuple[int, ...]], np.ndarray]


def sample_rgb() -> tuple[np.ndarray, float]:
    """The bundled sample image (``denuc/assets/sample/brca-m2c-sample.png``, a BRCA-M2C train
    image) as ``(H, W, 3)`` uint8 RGB, and its resolution in µm per pixel (0.5)."""
    from PIL import Image

    path = Path(__file__).resolve().parents[1] / "assets" / "sample" / "brca-m2c-sample.png"
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")), 0.5


def calibration_key(batch: np.ndarray) -> str:
    """sha256 hex of a calibration batch (shape, dtype and bytes)."""
    h = hashlib.sha256(f"{batch.dtype}|{batch.shape}".encode())
    h.update(np.ascontiguousarray(batch).tobytes())
    return h.hexdigest()


def _spread(batch: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` rows of ``batch``, evenly spread."""
    if len(batch) <= n:
        return batch
    return batch[np.linspace(0, len(batch) - 1, n).round().astype(int)]


def quantize_file(src: str | Path, dst: str | Path, batch: np.ndarray) -> dict[str, float]:
    """Quantize the float32 ONNX file ``src`` to ``dst`` (atomically), calibrated on ``batch``
    ``(N, C, H, W)`` float32; check it (see the module docstring).

    Returns:
        per output name, the relative RMS difference to float32 on ``batch``.

    Raises:
        ModelError: the tools fail, or the int8 graph is too far from float32.
    """
    try:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as e:  # pragma: no cover - onnxruntime without its quantization tools
        raise ModelError(f"runtime 'onnx-int8' needs onnxruntime's quantization tools and onnx ({e})") from None

    rows = [batch[i:i + 1] for i in range(len(batch))]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(rows)

        def get_next(self) -> dict[str, np.ndarray] | None:
            x = next(self.it, None)
            return None if x is None else {"x": x}

    errs: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="denuc-int8-") as tmpdir, atomic_target(dst) as tmp, \
                warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            pre = str(Path(tmpdir) / "pre.onnx")
            quant_pre_process(str(src), pre, skip_symbolic_shape=True)
            quantize_static(pre, str(tmp), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.Percentile,
                            extra_options={"CalibTensorRangeSymmetric": False, "CalibPercentile": PERCENTILE})
            ref, got = _session(str(src), 1), _session(str(tmp), 1)
            x = batch[: min(len(batch), 8)]
            names = [o.name for o in ref.get_outputs()]
            for name, r, g in zip(names, ref.run(None, {"x": x}), got.run(None, {"x": x}), strict=True):
                r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
                errs[name] = float(np.sqrt(np.mean((r - g) ** 2)) / max(np.sqrt(np.mean(r**2)), 1e-12))
            bad = {k: round(v, 3) for k, v in errs.items() if not v <= CHECK_RRMS}
            if bad:
                raise ModelError(f"int8 quantization of {Path(src).name} is too far from float32 on its calibration "
                                 f"batch (relative RMS difference {bad} > {CHECK_RRMS}); use --runtime onnx")
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - the quantization tools raise many types
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ModelError(f"cannot quantize {Path(src).name} to int8 ({type(e).__name__}: {first})") from e
    return errs


class OnnxInt8Runner(OnnxRunner):
    """Runs ``module.<method>`` with ONNX Runtime on an int8 quantization of its export
    (see the module docstring). Called like :class:`~denuc.runtime.onnx.OnnxRunner`.

    Args:
        module, method, name: as for :class:`~denuc.runtime.onnx.OnnxRunner`.
        calibration: ``calibration(shape) -> (N, *shape) float32`` inputs to calibrate the
            activation ranges of inputs of shape ``shape = (C, H, W)`` (prepared exactly as the
            real inputs are: resampled, cropped and normalised).

    Attributes:
        errors: per input shape, the relative RMS difference of each output to float32 on the
            calibration batch (filled when a file is quantized in this process).
    """

    runtime = "onnx-int8"

    def __init__(self, module: nn.Module, method: str = "forward", name: str = "model",
                 calibration: Calibration | None = None) -> None:
        if calibration is None:
            raise ModelError(f"runtime 'onnx-int8' needs calibration inputs for the {name}; use --runtime onnx")
        super().__init__(module, method=method, name=name)
        self.calibration = calibration
        self.errors: dict[tuple[int, ...], dict[str, float]] = {}

    def file_for(self, shape: tuple[int, ...]) -> Path:
        """The cached int8 file of input shape ``shape``, quantized (and its float32 export made) if missing."""
        batch = np.ascontiguousarray(_spread(np.asarray(self.calibration(shape), np.float32), CALIBRATION_MAX))
        if batch.ndim != 4 or tuple(batch.shape[1:]) != tuple(shape) or not len(batch):
            raise ModelError(f"{self.name}: calibration inputs have shape {batch.shape}, need (N, {', '.join(map(str, shape))})")
        fp32 = super().file_for(shape)
        h = hashlib.sha256(f"{FORMAT}|{PERCENTILE}|{fp32.name}|{calibration_key(batch)}".encode()).hexdigest()
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name)
        path = cache_dir() / f"{stem}-int8-{'x'.join(map(str, shape))}-{h[:24]}.onnx"
        msg = (f"denuc: quantizing the {self.name} for {'x'.join(map(str, shape))} inputs to int8 "
               f"(once per model and input size; cached in {path.parent})")

        def make() -> None:
            self.errors[shape] = quantize_file(fp32, path, batch)

        return cached_file(path, make, msg)


def build(module: nn.Module, method: str = "forward", name: str = "model", calibration: Calibration | None = None,
          **_: Any) -> OnnxInt8Runner:
    """Registry builder of ``onnx-int8`` (see :data:`denuc.runtime.RUNTIMES`)."""
    return OnnxInt8Runner(module, method=method, name=name, calibration=calibration)
