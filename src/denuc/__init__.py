"""DeNuC: decoupled nucleus detection and classification for H&E images and slides.

A tiny point detector finds nuclei, a frozen foundation model encodes the image once, its
dense features are sampled at each point and a linear head classifies them. Every stage
speaks :class:`Nuclei` (points as float (x, y) in level-0 pixels, scores, classes, mpp).

Heavy submodules (torch) are imported lazily on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "Nuclei": "denuc.core.result",
    "check_mpp": "denuc.core.mpp",
    "read_image": "denuc.data.image",
    "open_dataset": "denuc.data.base",
    "evaluate": "denuc.evaluate.api",
    "Detector": "denuc.detect.api",
    "DeNuC": "denuc.pipeline",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'denuc' has no attribute {name!r}")
