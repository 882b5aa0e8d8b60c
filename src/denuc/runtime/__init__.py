"""Inference runtimes for the models' forward passes: PyTorch (the reference) or ONNX Runtime.

::

    from denuc.runtime import make_runner
    run = make_runner(model, "auto", method="raw", name="detector", device="cpu")
    logits, points = run(x)                  # x: (B, 3, H, W) float32 tensor -> tuple of tensors

Runtimes (:data:`RUNTIMES`): ``torch`` runs the module itself (the reference); ``onnx`` exports
the module once per input shape to ONNX (cached on disk by a hash of its weights and code,
:mod:`denuc.runtime.onnx`) and runs it with ONNX Runtime on the CPU; ``onnx-int8`` runs a
static 8-bit quantization of that export, calibrated on inputs the caller gives
(:mod:`denuc.runtime.int8`); ``auto`` (the default) is, on the CPU when ``onnxruntime`` and
``onnx`` are installed (``pip install 'denuc[onnx]'``) and the model is small
(:data:`AUTO_MAX_PARAMS`), ``onnx-int8`` where the caller allows it (``auto_int8``: the CNN
encoders) and ``onnx`` otherwise, else ``torch``; the environment variable
``DENUC_RUNTIME=torch`` (or ``onnx``, ``onnx-int8``) decides ``auto`` instead.
"""

from denuc.runtime.base import (
    AUTO_MAX_PARAMS,
    ONNX_RUNTIMES,
    RUNTIME_CHOICES,
    RUNTIME_ENV,
    RUNTIMES,
    ModuleRunner,
    TorchRunner,
    make_runner,
    onnx_available,
    resolve_runtime,
    single_thread_glue,
)

__all__ = ["AUTO_MAX_PARAMS", "ONNX_RUNTIMES", "RUNTIMES", "RUNTIME_CHOICES", "RUNTIME_ENV", "ModuleRunner", "TorchRunner", "make_runner",
           "onnx_available", "resolve_runtime", "single_thread_glue"]
