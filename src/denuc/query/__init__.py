"""Point queries on dense encoder features: bilinear sampling at (x, y) points, window tiling."""

from denuc.query.predictor import PointFeaturizer, assign_windows, best_window
from denuc.query.sample import ALIGN_MODES, map_grid, sample_map

__all__ = ["ALIGN_MODES", "PointFeaturizer", "assign_windows", "best_window", "map_grid", "sample_map"]
