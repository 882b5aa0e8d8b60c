"""QuPath-readable GeoJSON of nucleus points (File > Import objects, or drag and drop).

Each nucleus becomes one feature::

    {"type": "Feature",
     "id": "<uuid4>",
     "geometry": {"type": "Point", "coordinates": [x, y]},
     "properties": {"objectType": "detection",
                    "classification": {"name": "tumor", "color": [200, 0, 0]},
                    "measurements": {"Detection score": 0.95, "Class probability": 0.9,
                                     "Score (detection x class)": 0.855,
                                     "Prob tumor": 0.9, "Prob lymphocyte": 0.06, ...}}}

Measurements (a flat name -> number map, as QuPath wants):

* ``"Detection score"``: the detector's own confidence, :attr:`Nuclei.det_scores
  <denuc.core.Nuclei>`; for points without ``det_scores`` (detector output, whose ``scores``
  are the detector's confidence) it is ``scores``.
* ``"Class probability"``: the probability of the nucleus's class (``probs[i, class_id]``),
  when there are probabilities and a class.
* ``"Score (detection x class)"``: ``scores`` of a classified result (the CSV ``score``
  column, detection score x class probability), written when ``det_scores`` is known.
* ``"Prob <class>"``: every class probability.

Coordinates are the :class:`~denuc.core.Nuclei` ``xy`` as they are: (x, y) = (column, row)
in level-0 pixels of the image, which is QuPath's image coordinate frame. Unclassified
nuclei (class id -1) carry no ``classification``. Numbers are written with the shortest
text that reads back to the same float32 score / float64 coordinate. Every feature gets a
fresh UUID4 ``id`` (QuPath keeps ids only when they are UUIDs).

:func:`geojson_features` builds the features of one :class:`Nuclei`; :func:`nuclei_to_geojson`
and :func:`write_geojson` wrap them in one collection, and :class:`denuc.sinks.GeoJsonSink`
streams them chunk by chunk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from denuc.core.files import atomic_write_bytes
from denuc.core.palette import RGB, resolve_colors
from denuc.core.result import Nuclei
from denuc.data.geojson_points import COMBINED_SCORE_MEASUREMENT, SCORE_MEASUREMENT
from denuc.errors import InputError

Colors = Mapping[str, Sequence[int]] | Sequence[Sequence[int]] | None

#: Measurement names (see the module docstring).
DETECTION_SCORE = SCORE_MEASUREMENT
CLASS_PROBABILITY = "Class probability"
COMBINED_SCORE = COMBINED_SCORE_MEASUREMENT
PROB_PREFIX = "Prob "


def _short_floats(a: np.ndarray) -> list[float]:
    """float32 values as the Python floats of their shortest decimal text (0.9, not 0.899999976)."""
    return [float(s) for s in np.asarray(a, dtype=np.float32).astype(str)]


def uuid4_strings(n: int) -> list[str]:
    """``n`` random RFC 4122 version-4 UUIDs as canonical strings (``8-4-4-4-12`` hex digits),
    made from one ``os.urandom`` call (much faster than ``uuid.uuid4()`` per point)."""
    if n == 0:
        return []
    b = np.frombuffer(os.urandom(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    b[:, 6] = (b[:, 6] & 0x0F) | 0x40  # version 4
    b[:, 8] = (b[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    h = b.tobytes().hex()
    return [f"{h[k:k + 8]}-{h[k + 8:k + 12]}-{h[k + 12:k + 16]}-{h[k + 16:k + 20]}-{h[k + 20:k + 32]}"
            for k in range(0, 32 * n, 32)]


def check_finite(nuclei: Nuclei, path: str | os.PathLike[str]) -> None:
    """Raise :class:`InputError` naming ``path`` when scores or probabilities are NaN/inf
    (they are not valid JSON)."""
    for what, arr in (("scores", nuclei.scores), ("detection scores", nuclei.det_scores),
                      ("probs", nuclei.probs)):
        if arr is not None and not np.all(np.isfinite(arr)):
            raise InputError(f"{path}: cannot write GeoJSON, {what} contain NaN or inf")


def geojson_features(nuclei: Nuclei, colors: Mapping[str, RGB]) -> list[dict[str, Any]]:
    """The QuPath detection features of ``nuclei``, one ``Point`` per nucleus, in order.

    Args:
        nuclei: ``N`` points, ``xy`` (x, y) in level-0 pixels; scores and probabilities
            become measurements (see the module docstring).
        colors: class name -> ``(r, g, b)`` 0-255 for every name in ``nuclei.class_names``
            (see :func:`denuc.core.palette.resolve_colors`).

    Returns:
        ``N`` GeoJSON ``Feature`` dicts of plain JSON types, each with a fresh UUID4 ``id``.
    """
    n = len(nuclei)
    if n == 0:
        return []
    classes = [{"name": c, "color": list(colors[c])} for c in nuclei.class_names]
    ids = nuclei.class_ids if nuclei.class_ids is not None else np.full(n, -1, dtype=np.int64)
    # measurement columns (name, Python floats), in the order they appear in a feature
    cols: list[tuple[str, list[float]]] = []
    det = nuclei.det_scores if nuclei.det_scores is not None else nuclei.scores
    if det is not None:
        cols.append((DETECTION_SCORE, _short_floats(det)))
    k_prob = -1  # position of "Class probability", which only nuclei with a class get
    if nuclei.probs is not None and nuclei.probs.shape[1]:
        k_prob = len(cols)
        cols.append((CLASS_PROBABILITY, _short_floats(nuclei.probs[np.arange(n), np.clip(ids, 0, None)])))
    if nuclei.det_scores is not None and nuclei.scores is not None:
        cols.append((COMBINED_SCORE, _short_floats(nuclei.scores)))
    if nuclei.probs is not None:
        cols += [(f"{PROB_PREFIX}{c}", _short_floats(nuclei.probs[:, j])) for j, c in enumerate(nuclei.class_names)]
    keys = tuple(k for k, _ in cols)
    rows = zip(*(v for _, v in cols)) if cols else iter(((),) * n)
    feats: list[dict[str, Any]] = []
    for (x, y), cid, fid, vals in zip(nuclei.xy.tolist(), ids.tolist(), uuid4_strings(n), rows):
        props: dict[str, Any] = {"objectType": "detection"}
        if cid >= 0:
            props["classification"] = dict(classes[cid])
            meas = dict(zip(keys, vals))
        elif k_prob >= 0:  # no class: no class probability
            meas = dict(zip(keys[:k_prob] + keys[k_prob + 1:], vals[:k_prob] + vals[k_prob + 1:]))
        else:
            meas = dict(zip(keys, vals))
        if meas:
            props["measurements"] = meas
        feats.append({"type": "Feature", "id": fid,
                      "geometry": {"type": "Point", "coordinates": [x, y]}, "properties": props})
    return feats


def nuclei_to_geojson(nuclei: Nuclei, colors: Colors = None) -> dict[str, Any]:
    """A GeoJSON ``FeatureCollection`` of QuPath detections, one ``Point`` per nucleus.

    Args:
        nuclei: points in level-0 pixels; scores and probs become measurements.
        colors: class colours: a mapping name -> ``(r, g, b)``, a sequence aligned with
            ``nuclei.class_names``, or None for the default palette.
    """
    cmap = resolve_colors(nuclei.class_names, colors)
    return {"type": "FeatureCollection", "features": geojson_features(nuclei, cmap)}


def dumps_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON of plain JSON types (orjson when installed, else the json module)."""
    try:
        import orjson
    except ImportError:
        return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return bytes(orjson.dumps(obj))


def write_geojson(nuclei: Nuclei, path: str | os.PathLike[str], colors: Colors = None) -> Path:
    """Write :func:`nuclei_to_geojson` to ``path`` atomically; gzip when it ends in ``.gz``.

    For a whole slide, stream instead with :class:`denuc.sinks.GeoJsonSink` (memory bounded
    by one chunk).

    Raises:
        InputError: scores or probabilities contain NaN/inf (not valid JSON).
    """
    check_finite(nuclei, path)
    return atomic_write_bytes(path, dumps_json(nuclei_to_geojson(nuclei, colors)))
