"""Point queries on dense encoder features: bilinear sampling at (x, y) points, window tiling.

The names are loaded on first use (PEP 562 ``__getattr__``): importing a submodule such as
:mod:`denuc.query.embed_cli` (which ``denuc --help`` does) must not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from denuc.query.predictor import PointFeaturizer, assign_windows, best_window
    from denuc.query.sample import ALIGN_MODES, map_grid, sample_map

__all__ = ["ALIGN_MODES", "PointFeaturizer", "assign_windows", "best_window", "map_grid", "sample_map"]


def __getattr__(name: str) -> Any:
    if name in ("PointFeaturizer", "assign_windows", "best_window"):
        from denuc.query import predictor

        return getattr(predictor, name)
    if name in ("ALIGN_MODES", "map_grid", "sample_map"):
        from denuc.query import sample

        return getattr(sample, name)
    raise AttributeError(f"module 'denuc.query' has no attribute {name!r}")
