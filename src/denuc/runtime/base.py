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
RUNTIME_CHOICES = ("auto", "torch", "onnx", "onnx-int8")
#: runtimes that run on ONNX Runtime's CPU provider.
ONNX_RUNTIMES = ("onnx", "onnx-int8")
#: environment variable that decides what ``auto`` means (``torch``, ``onnx`` or ``onnx-int8``) when set.
RUNTIME_ENV = "DENUC_RUNTIME"

#: ``auto`` uses ONNX Runtime only for models with at most this many parameters (weights and
#: buffers): the exported file holds a copy of the weights, and large models (ViT encoders)
#: gain little on a CPU.
AUTO_MAX_PARAMS = 50_000_000
#: ``auto`` picks ``onnx-int8`` on the CPU for the modules whose callers allow it: the CNN
#: encoders (:attr:`denuc.encode.Encoder.calibrates`), whose int8 features changed mean class F1
#: by -0.004 (BRCA-M2C val) and +0.006 (CoNSeP val) with detection untouched. Not the detector:
#: int8 cost it 0.002 det F1 on BRCA-M2C val and 0.008 on CoNSeP val
#: (``benchmarks/reported/runtime_accuracy.json``); ``--runtime onnx-int8`` quantizes it too.
AUTO_INT8 = True


RunnerBuilder = Callable[..., ModuleRunner]
#: runtime name -> ``builder(module, method=..., name=..., calibration=...) -> runner``.
RUNTIMES: Registry[RunnerBuilder] = Registry("runtime")
RUNTIMES.register("torch", lambda module, method="forward", name="model", **_: TorchRunner(module, method))


def _build_onnx(module: nn.Module, method: str = "forward", name: str = "model", **_: Any) -> ModuleRunner:
    from denuc.runtime.onnx import OnnxRunner

    return OnnxRunner(module, method=method, name=name)


def _build_onnx_int8(module: nn.Module, method: str = "forward", name: str = "model", **kw: Any) -> ModuleRunner:
    from denuc.runtime.int8 import build

    return build(module, method=method, name=name, **kw)


RUNTIMES.register("onnx", _build_onnx)
RUNTIMES.register("onnx-int8", _build_onnx_int8)


@functools.cache
def onnx_available() -> bool:
    """Whether ``onnxruntime`` (to run) imports and ``onnx`` (which ``torch.onnx`` needs to export)
    is installed. ``onnx`` is only found, not imported: importing it costs a second or more at
    every start, and it is needed only when a model is exported (a broken install then fails
    that export, which ``auto`` answers by falling back to PyTorch)."""
    import importlib.util
    import sys

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    if "onnx" in sys.modules:
        return sys.modules["onnx"] is not None
    try:
        return importlib.util.find_spec("onnx") is not None
    except (ImportError, ValueError):
        return False


def _n_values(module: nn.Module) -> int:
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def resolve_runtime(runtime: str | None, device: Any = "cpu", module: nn.Module | None = None,
                    auto_int8: bool = False) -> str:
    """The runtime that will run ``module`` on ``device``: ``torch``, ``onnx`` or ``onnx-int8``.

    ``auto`` (or None) is the environment variable :data:`RUNTIME_ENV` when it is set (``torch``
    forces the reference everywhere), else, on the CPU when :func:`onnx_available` and the module
    has at most :data:`AUTO_MAX_PARAMS` values, ``onnx-int8`` when the caller allows it
    (``auto_int8``: the module's results stay within the accuracy measured for it, see
    :data:`AUTO_INT8`) and ``onnx`` otherwise, else ``torch``.
    ``onnx`` or ``onnx-int8`` asked for explicitly (or by the variable) raise :class:`ModelError`
    when they cannot run (not installed, or a GPU device).
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
        if not (cpu and small and onnx_available()):
            return "torch"
        return "onnx-int8" if auto_int8 and AUTO_INT8 else "onnx"
    if name in ONNX_RUNTIMES:
        if not cpu:
            raise ModelError(f"runtime {name!r} runs on the CPU only (ONNX Runtime's CPU provider); the model is on "
                             f"{device}: use --runtime torch (or auto)")
        if not onnx_available():
            raise ModelError(f"runtime {name!r} needs the onnxruntime and onnx packages: pip install 'denuc[onnx]' "
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
            _restore_torch_threads()
            return self.torch(x)


def _restore_torch_threads() -> None:
    """Give PyTorch back the threads :func:`single_thread_glue` moved to ONNX Runtime (a runner
    that fell back to PyTorch needs them)."""
    import sys

    ort_runtime = sys.modules.get("denuc.runtime.onnx")
    n = getattr(ort_runtime, "THREADS", None)
    if n and torch.get_num_threads() < n:
        torch.set_num_threads(n)


def single_thread_glue(runners: list[Any]) -> int | None:
    """When every runner in ``runners`` is ONNX Runtime: keep ``torch.get_num_threads()`` threads
    for ONNX Runtime (:func:`denuc.runtime.onnx.set_threads`) and set PyTorch itself to one
    thread. What PyTorch then still runs is small work around the networks (stacking crops,
    resizing windows, sampling maps, the head), where its thread team costs more than it gains:
    on two cores shared with other processes, stacking 16 encoder crops took 400 ms with two
    threads (spinning at every barrier) and 10 ms with one. Process-wide; meant for the
    command line (``denuc predict|detect``). Results are unchanged (the same operations, each
    element computed alike).

    Returns:
        the thread count given to ONNX Runtime, or None when nothing was changed (some runner
        is PyTorch, which needs the threads itself).
    """
    if not runners or any(getattr(r, "runtime", None) not in ONNX_RUNTIMES for r in runners):
        return None
    from denuc.runtime.onnx import set_threads

    n = max(1, torch.get_num_threads())
    set_threads(n)
    torch.set_num_threads(1)
    return n


def make_runner(module: nn.Module, runtime: str | None = "auto", *, method: str = "forward", name: str = "model",
                device: Any = None, calibration: Callable[[tuple[int, ...]], Any] | None = None,
                auto_int8: bool = False) -> ModuleRunner:
    """A runner of ``module.<method>`` with the runtime :func:`resolve_runtime` picks.

    Args:
        module: the model (its weights are read when the runner first runs, and again whenever
            they change in place).
        runtime: ``auto``, ``torch`` or ``onnx``.
        method: the method to run (``forward``, the detector's ``raw``).
        name: shown in messages and in cached file names.
        device: where the module lives (default: its first parameter's device).
        calibration: ``calibration(shape) -> (N, *shape)`` float32 inputs prepared as the real
            ones, which ``onnx-int8`` needs (:class:`ModelError` there without them).
        auto_int8: whether ``auto`` may pick ``onnx-int8`` (needs ``calibration``).
    """
    if device is None:
        p = next(module.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    chosen = resolve_runtime(runtime, device, module, auto_int8=auto_int8 and calibration is not None)
    runner = RUNTIMES.get(chosen)(module, method=method, name=name, calibration=calibration)
    if chosen in ONNX_RUNTIMES and (runtime is None or runtime == "auto"):
        return _FallbackRunner(runner, module, method, name)
    return runner
