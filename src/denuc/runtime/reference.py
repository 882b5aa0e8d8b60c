"""The PyTorch reference runner, which every other runtime (:mod:`denuc.runtime.onnx`) is
compared with and falls back to."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class ModuleRunner(Protocol):
    """``runner(x (B, C, H, W) float32) -> tuple of tensors`` (on the module's device)."""

    runtime: str

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]: ...


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


class TorchRunner:
    """The reference: the module's own method under ``torch.no_grad`` (gradients are never needed
    at inference; a module in training mode runs as it is)."""

    runtime = "torch"

    def __init__(self, module: nn.Module, method: str = "forward") -> None:
        self.module = module
        self.method = method

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():  # ``forward`` through the module's __call__, so that its hooks run
            fn = self.module if self.method == "forward" else getattr(self.module, self.method)
            return _as_tuple(fn(x))
