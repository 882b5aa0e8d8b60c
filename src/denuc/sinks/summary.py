"""``<stem>.summary.json``: counts and densities of one input, and the run's facts.

Written for every input (also without nuclei or tissue), as sorted, indented JSON::

    {"stem": "slide1", "kind": "slide", "mpp": 0.25, "size": [98304, 75264],
     "class_names": ["lymphocyte", "tumor", "stromal"],
     "nuclei": 812345,                       # all nuclei
     "counts": {"lymphocyte": 201000, ...},  # per class
     "unclassified": 0,                      # nuclei without a class
     "tissue_area_mm2": 112.4,               # null when unknown
     "analysed_area_mm2": 112.4,             # tissue ∩ ROIs (the tissue area without ROIs)
     "no_tissue": false,                     # true when the tissue area is 0
     "density_per_mm2": 7227.3,              # nuclei per mm² of the analysed area; null when unknown or 0
     "class_density_per_mm2": {"lymphocyte": 1788.3, ...},
     "rois": {"tumour bed": {"area_mm2": 3.1, "nuclei": 40210, "counts": {...},   # area: ROI ∩ tissue
                             "density_per_mm2": ..., "class_density_per_mm2": {...}}},
     "outside_rois": 0,                      # nuclei in no ROI (rois and outside_rois: null without ROIs)
     ...}                                    # then the pipeline's own keys (mpp_source, models, timings...)

The pipeline's ``summary`` (given to :meth:`~denuc.sinks.Sink.close`) is merged in at the top
level; a key it shares with the facts above is dropped with a warning. Values are made
plain JSON (numpy scalars and arrays, paths and tuples converted; NaN and infinities become
null).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from denuc.core.result import Nuclei
from denuc.sinks.base import OutputInfo, Sink, class_ids_of

UM2_PER_MM2 = 1e6


def plain_json(value: Any) -> Any:
    """``value`` as plain JSON types: numpy scalars/arrays to Python, paths and other objects to
    strings, tuples/sets to lists, mapping keys to strings, non-finite floats to None."""
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return plain_json(value.tolist())
    if isinstance(value, np.generic):
        return plain_json(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def density(n: int, area_um2: float | None) -> float | None:
    """Nuclei per mm² of ``area_um2`` µm²; None when the area is unknown or 0."""
    if area_um2 is None or area_um2 <= 0:
        return None
    return n / (area_um2 / UM2_PER_MM2)


class SummarySink(Sink):
    """Counts per class (and per ROI) as chunks come; writes the JSON of the module docstring
    on close. Holds ``(n_classes + 1)`` counters per ROI, never the nuclei."""

    suffix = ".summary.json"

    def __init__(self, info: OutputInfo) -> None:
        super().__init__(info)
        self._open_tmp()  # now: an unwritable folder fails before any work
        self._k = len(info.class_names)
        self._counts = np.zeros(self._k + 1, dtype=np.int64)  # last: no class
        self._roi_counts: dict[str, np.ndarray] = {}

    def _bins(self, ids: np.ndarray) -> np.ndarray:
        return np.bincount(np.where(ids < 0, self._k, ids), minlength=self._k + 1)

    def _write(self, chunk: Nuclei) -> None:
        if not len(chunk):
            return
        ids = class_ids_of(chunk)
        self._counts += self._bins(ids)
        if self.info.roi_areas_um2 is not None and chunk.roi is not None:
            names, inv = np.unique(chunk.roi.astype(str), return_inverse=True)
            for k, name in enumerate(names.tolist()):
                if name:
                    acc = self._roi_counts.setdefault(name, np.zeros(self._k + 1, dtype=np.int64))
                    acc += self._bins(ids[inv.reshape(-1) == k])

    def _block(self, counts: np.ndarray, area_um2: float | None) -> dict[str, Any]:
        total = int(counts.sum())
        per = {c: int(counts[j]) for j, c in enumerate(self.info.class_names)}
        return {"nuclei": total, "counts": per, "density_per_mm2": density(total, area_um2),
                "class_density_per_mm2": {c: density(n, area_um2) for c, n in per.items()}}

    def facts(self) -> dict[str, Any]:
        """The counts, densities and input facts written so far (without the pipeline's keys)."""
        i = self.info
        area = i.tissue_area_um2
        analysed = i.analysed_area_um2 if i.analysed_area_um2 is not None else area
        out: dict[str, Any] = {"stem": i.stem, "kind": i.kind, "mpp": i.mpp, "size": list(i.size),
                               "class_names": list(i.class_names), "unclassified": int(self._counts[-1]),
                               "tissue_area_mm2": None if area is None else area / UM2_PER_MM2,
                               "analysed_area_mm2": None if analysed is None else analysed / UM2_PER_MM2,
                               "no_tissue": area is not None and area <= 0,
                               **self._block(self._counts, analysed), "rois": None, "outside_rois": None}
        if i.roi_areas_um2 is not None:
            names = list(i.roi_areas_um2) + sorted(set(self._roi_counts) - set(i.roi_areas_um2))
            zero = np.zeros(self._k + 1, dtype=np.int64)
            rois = {}
            for name in names:
                a = i.roi_areas_um2.get(name)
                rois[name] = {"area_mm2": None if a is None else a / UM2_PER_MM2,
                              **self._block(self._roi_counts.get(name, zero), a)}
            out["rois"] = rois
            out["outside_rois"] = int(self._counts.sum()) - int(sum(int(c.sum()) for c in self._roi_counts.values()))
        return out

    def _finish(self, summary: dict[str, Any]) -> None:
        facts = self.facts()
        extra = {str(k): v for k, v in (summary or {}).items()}
        clash = sorted(set(extra) & set(facts))
        if clash:
            warnings.warn(f"{self._path}: run summary keys {clash} clash with the counted facts and are dropped",
                          stacklevel=3)
        doc = plain_json({**{k: v for k, v in extra.items() if k not in facts}, **facts})
        text = json.dumps(doc, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
        assert self._fh is not None
        self._fh.write(text.encode("utf-8"))
