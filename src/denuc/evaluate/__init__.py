"""Evaluation: distance-based point matching (several published protocols) and F1 reports.

``evaluate(gt, pred, protocol="denuc", radius_px=6.0)`` -> :class:`EvalReport`; the matchers
live in :mod:`denuc.evaluate.matching` (registry ``PROTOCOLS``).
"""

from __future__ import annotations

from denuc.evaluate.api import Counts, EvalReport, evaluate
from denuc.evaluate.matching import PROTOCOLS

__all__ = ["PROTOCOLS", "Counts", "EvalReport", "evaluate"]
