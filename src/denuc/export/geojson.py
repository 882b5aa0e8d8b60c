"""QuPath-readable GeoJSON of nucleus points (File > Import objects, or drag and drop).

Each nucleus becomes one feature::

    {"type": "Feature",
     "id": "<uuid>",
     "geometry": {"type": "Point", "coordinates": [x, y]},
     "properties": {"objectType": "detection",
                    "classification": {"name": "tumor", "color": [200, 0, 0]},
                    "measurements": {"Detection score": 0.93, "Prob tumor": 0.9, ...}}}

Coordinates are the :class:`~denuc.core.Nuclei` ``xy`` as they are: (x, y) = (column, row)
in level-0 pixels of the image, which is QuPath's image coordinate frame. Unclassified
nuclei (class id -1) carry no ``classification``. Numbers are written with the shortest
text that reads back to the same float32 score / float64 coordinate.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from denuc.core.files import atomic_write_bytes
from denuc.core.palette import resolve_colors
from denuc.core.result import Nuclei
from denuc.errors import InputError

Colors = Mapping[str, Sequence[int]] | Sequence[Sequence[int]] | None


def _short_floats(a: np.ndarray) -> list[float]:
    """float32 values as the Python floats of their shortest decimal text (0.9, not 0.899999976)."""
    return [float(s) for s in np.asarray(a, dtype=np.float32).astype(str)]


def nuclei_to_geojson(nuclei: Nuclei, colors: Colors = None) -> dict[str, Any]:
    """A GeoJSON ``FeatureCollection`` of QuPath detections, one ``Point`` per nucleus.

    Args:
        nuclei: points in level-0 pixels; scores and probs become measurements.
        colors: class colours: a mapping name -> ``(r, g, b)``, a sequence aligned with
            ``nuclei.class_names``, or None for the default palette.
    """
    cmap = resolve_colors(nuclei.class_names, colors)
    classes = [{"name": n, "color": list(cmap[n])} for n in nuclei.class_names]
    scores = _short_floats(nuclei.scores) if nuclei.scores is not None else None
    probs = [_short_floats(col) for col in nuclei.probs.T] if nuclei.probs is not None else []
    prob_keys = [f"Prob {c}" for c in nuclei.class_names] if probs else []
    feats: list[dict[str, Any]] = []
    for i, (x, y) in enumerate(nuclei.xy.tolist()):
        props: dict[str, Any] = {"objectType": "detection"}
        if nuclei.class_ids is not None and nuclei.class_ids[i] >= 0:
            props["classification"] = dict(classes[nuclei.class_ids[i]])
        meas: dict[str, float] = {}
        if scores is not None:
            meas["Detection score"] = scores[i]
        for key, col in zip(prob_keys, probs):
            meas[key] = col[i]
        if meas:
            props["measurements"] = meas
        feats.append({"type": "Feature", "id": str(uuid.uuid4()),
                      "geometry": {"type": "Point", "coordinates": [x, y]}, "properties": props})
    return {"type": "FeatureCollection", "features": feats}


def _dumps(obj: dict[str, Any]) -> bytes:
    try:
        import orjson
    except ImportError:
        return json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return bytes(orjson.dumps(obj))


def write_geojson(nuclei: Nuclei, path: str | os.PathLike[str], colors: Colors = None) -> Path:
    """Write :func:`nuclei_to_geojson` to ``path`` atomically; gzip when it ends in ``.gz``.

    Raises:
        InputError: scores or probabilities contain NaN/inf (not valid JSON).
    """
    for what, arr in (("scores", nuclei.scores), ("probs", nuclei.probs)):
        if arr is not None and not np.all(np.isfinite(arr)):
            raise InputError(f"{path}: cannot write GeoJSON, {what} contain NaN or inf")
    return atomic_write_bytes(path, _dumps(nuclei_to_geojson(nuclei, colors)))
