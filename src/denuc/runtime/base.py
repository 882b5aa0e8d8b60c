"""The runtime registry and the choice of ``auto`` (the PyTorch reference runner is in
:mod:`denuc.runtime.reference`).

A *runner* wraps one module method that maps a ``(B, C, H, W)`` float32 tensor to a tensor or
a tuple of tensors (the detector's ``raw``, an encoder's ``forward``) and is called like it,
always returning a tuple. Runners give the same numbers as the module within float32
rounding (ONNX Runtime fuses and reorders operations: about 1e-5 relative); PyTorch is the
reference.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from denuc.errors import ModelError
from denuc.registry import Registry
from denuc.runtime.reference import ModuleRunner, TorchRunner, _as_tuple  # noqa: F401  (re-exported)

#: values accepted by ``--runtime`` / ``runtime=``.
RUNTIME_CHOICES = ("auto", "torch", "onnx")
#: environment variable that decides what ``auto`` means (``torch`` or ``onnx``) when set.
RUNTIME_ENV = "DENUC_RUNTIME"

#: ``auto`` uses ONNX Runtime only for models with at most this many parameters (weights and
#: buffers): the exported file holds a copy of the weights, and large models (ViT encoders)
#: gain little on a CPU.
AUTO_MAX_PARAMS = 50_000_000


RunnerBuilder = Callable[..., ModuleRunner]
#: runtime name -> ``builder(module, method=..., name=...) -> runner``.
RUNTIMES: Registry[RunnerBuilder] = Registry("runtime")
RUNTIMES.register("torch", lambda module, method="forward", name="model": TorchRunner(module, method))


def _build_onnx(module: nn.Module, method: str = "forward", name: str = "model") -> ModuleRunner:
    from denuc.runtime.onnx import OnnxRunner

    return OnnxRunner(module, method=method, name=name)


RUNTIMES.register("onnx", _build_onnx)


@functools.cache
def onnx_available() -> bool:
    """Whether ``onnxruntime`` (to run) and ``onnx`` (which ``torch.onnx`` needs to export) import."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _n_values(module: nn.Module) -> int:
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def resolve_runtime(runtime: str | None, device: Any = "cpu", module: nn.Module | None = None) -> str:
    """The runtime that will run ``module`` on ``device``: ``torch`` or ``onnx``.

    ``auto`` (or None) is the environment variable :data:`RUNTIME_ENV` when it is set (``torch``
    forces the reference everywhere), else ``onnx`` on the CPU when :func:`onnx_available` and the
    module has at most :data:`AUTO_MAX_PARAMS` values, else ``torch``. ``onnx`` asked for
    explicitly (or by the variable) raises :class:`ModelError` when it cannot run (not installed,
    or a GPU device).
    """
    name = "auto" if runtime is None else str(runtime)
    if name not in RUNTIME_CHOICES:
        raise ModelError(f"unknown runtime {name!r}; known: {', '.join(RUNTIME_CHOICES)}")
    if name == "auto" and os.environ.get(RUNTIME_ENV):
        name = os.environ[RUNTIME_ENV].strip()
        if name not in RUNTIME_CHOICES:
            raise ModelError(f"{RUNTIME_ENV}={name!r} is not a runtime; known: {', '.join(RUNTIME_CHOICES)}")
    cpu = torch.device(device).type == "cpu"
    if name == "auto":
        small = module is None or _n_values(module) <= AUTO_MAX_PARAMS
        return "onnx" if cpu and small and onnx_available() else "torch"
    if name == "onnx":
        if not cpu:
            raise ModelError(f"runtime 'onnx' runs on the CPU only (ONNX Runtime's CPU provider); the model is on "
                             f"{device}: use --runtime torch (or auto)")
        if not onnx_available():
            raise ModelError("runtime 'onnx' needs the onnxruntime and onnx packages: pip install 'denuc[onnx]' "
                             "(or use --runtime torch)")
    return name


class _FallbackRunner:
    """``auto``'s ONNX runner that falls back to PyTorch, with one warning naming the model, when
    the export or the session fails (an operator the exporter does not know, ...)."""

    def __init__(self, inner: ModuleRunner, module: nn.Module, method: str, name: str) -> None:
        self.inner: ModuleRunner = inner
        self.torch = TorchRunner(module, method)
        self.name = name
        self.runtime = inner.runtime

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.inner is self.torch:
            return self.torch(x)
        try:
            return self.inner(x)
        except Exception as e:  # noqa: BLE001 - any exporter/ORT failure: the reference still works
            warnings.warn(f"{self.name}: ONNX Runtime failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                          "running it with PyTorch instead (pass runtime='torch' to skip the attempt)", stacklevel=2)
            self.inner = self.torch
            self.runtime = "torch"
            return self.torch(x)


def make_runner(module: nn.Module, runtime: str | None = "auto", *, method: str = "forward", name: str = "model",
                device: Any = None) -> ModuleRunner:
    """A runner of ``module.<method>`` with the runtime :func:`resolve_runtime` picks.

    Args:
        module: the model (its weights are read when the runner first runs, and again whenever
            they change in place).
        runtime: ``auto``, ``torch`` or ``onnx``.
        method: the method to run (``forward``, the detector's ``raw``).
        name: shown in messages and in cached file names.
        device: where the module lives (default: its first parameter's device).
    """
    if device is None:
        p = next(module.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    chosen = resolve_runtime(runtime, device, module)
    runner = RUNTIMES.get(chosen)(module, method=method, name=name)
    if chosen == "onnx" and (runtime is None or runtime == "auto"):
        return _FallbackRunner(runner, module, method, name)
    return runner
