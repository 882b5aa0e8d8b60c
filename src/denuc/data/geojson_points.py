"""Reading nucleus points from GeoJSON as QuPath (and the PUMA challenge) write it.

Accepted input (``.geojson``, ``.json`` or gzip-compressed ``.geojson.gz``):

* a ``FeatureCollection``, a bare list of features, or a single ``Feature``;
* geometries ``Point`` (one nucleus), ``MultiPoint`` (one nucleus per point, e.g. a QuPath
  points annotation), ``Polygon`` / ``MultiPolygon`` (one nucleus at the area centroid;
  holes are subtracted, a MultiPolygon's parts are area-weighted; the area is kept so that
  readers can tell nucleus outlines from region annotations, see :func:`region_area_px2`);
* QuPath cell objects: the feature's ``nucleusGeometry`` (beside the cell boundary in
  ``geometry``) gives the nucleus when present;
* class name from ``properties.classification.name`` (QuPath >= 0.4 may write ``names``,
  joined with ``": "`` as QuPath displays derived classes); no classification = no class;
* ``properties.objectType`` ``detection``, ``cell`` or ``annotation`` (or absent);
* score from the ``"Score (detection x class)"`` measurement that DeNuC writes for classified
  nuclei, else from ``"Detection score"`` (``measurements`` as a flat mapping, or the older
  QuPath list of ``{"name", "value"}``), so DeNuC's own GeoJSON reads back the ``score`` of
  its CSV.

Coordinates are taken as given: (x, y) = (column, row) in level-0 pixels with the origin
at the top-left corner of the image, the frame :class:`~denuc.core.Nuclei` uses.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from denuc.errors import InputError

GEOJSON_SUFFIXES = (".geojson", ".geojson.gz", ".json", ".json.gz")
OBJECT_TYPES = ("detection", "cell", "annotation")
SCORE_MEASUREMENT = "Detection score"
#: DeNuC's classified score (detection score x class probability); read before SCORE_MEASUREMENT.
COMBINED_SCORE_MEASUREMENT = "Score (detection x class)"
#: Polygons with a larger area (µm²) are region annotations (e.g. a "Tumor" or "Stroma" area
#: that QuPath's "export all objects" includes), not nucleus outlines. Nuclei are about
#: 20-300 µm² (a 400 µm² disc is 22.6 µm across).
REGION_AREA_UM2 = 400.0
#: The bound in px² when the image's µm/px is unknown: 400 µm² at 0.25 µm/px (40x), the
#: finest common scan, so no nucleus outline of a coarser scan is taken for a region.
REGION_AREA_PX2_DEFAULT = 6400.0


@dataclass
class GeoPoints:
    """Raw points read from a GeoJSON file.

    Attributes:
        xy: ``(N, 2)`` float64 (x, y) in image pixels.
        names: ``N`` class names (``None`` = unclassified).
        scores: ``(N,)`` float32 ``"Detection score"`` or NaN where absent.
        polygon: ``(N,)`` bool, True where the point is the centroid of a polygon.
        area: ``(N,)`` float64 area in px² of the polygon a point is the centroid of
            (0 for points).
    """

    xy: np.ndarray
    names: list[str | None]
    scores: np.ndarray
    polygon: np.ndarray
    area: np.ndarray

    def __len__(self) -> int:
        return len(self.xy)


def read_geojson_features(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The features of a GeoJSON file (``.gz`` decompressed). Raises InputError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such GeoJSON file")
    try:
        raw = p.read_bytes()
        if p.name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
        if not raw.strip():
            return []
        obj = json.loads(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputError(f"{p}: cannot read ({e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{p}: not valid JSON ({e})") from None
    feats: Any
    if isinstance(obj, list):
        feats = obj
    elif isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        feats = obj.get("features")
        if not isinstance(feats, list):
            raise InputError(f"{p}: FeatureCollection without a 'features' list")
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        feats = [obj]
    else:
        raise InputError(f"{p}: expected a GeoJSON FeatureCollection or a list of features")
    for i, f in enumerate(feats):
        if not isinstance(f, dict) or not isinstance(f.get("geometry"), dict):
            raise InputError(f"{p}: feature {i} is not a GeoJSON Feature with a geometry")
    return feats


def _ring(coords: Any) -> np.ndarray:
    arr = np.asarray(coords, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 2:
        raise ValueError("a ring must be a list of [x, y] positions")
    return arr[:, :2]


def _ring_area_centroid(ring: np.ndarray) -> tuple[float, np.ndarray]:
    """Signed area and area centroid of a closed or open ring (shoelace formula)."""
    if len(ring) and not np.array_equal(ring[0], ring[-1]):
        ring = np.vstack([ring, ring[:1]])
    # shift to the first vertex for numerical stability with large slide coordinates
    o = ring[0]
    x, y = ring[:, 0] - o[0], ring[:, 1] - o[1]
    cross = x[:-1] * y[1:] - x[1:] * y[:-1]
    a = cross.sum() / 2.0
    if a == 0.0:
        return 0.0, o
    cx = ((x[:-1] + x[1:]) * cross).sum() / (6.0 * a)
    cy = ((y[:-1] + y[1:]) * cross).sum() / (6.0 * a)
    return float(a), np.array([cx + o[0], cy + o[1]])


def polygon_centroid(polygons: Sequence[Sequence[Any]]) -> np.ndarray:
    """Area centroid ``(2,)`` (x, y) of one or more polygons given as GeoJSON rings
    (see :func:`polygon_area_centroid`)."""
    return polygon_area_centroid(polygons)[1]


def polygon_area_centroid(polygons: Sequence[Sequence[Any]]) -> tuple[float, np.ndarray]:
    """Area (>= 0) and area centroid ``(2,)`` (x, y) of one or more polygons given as GeoJSON rings.

    Args:
        polygons: a list of polygons, each a list of rings ``[[x, y], ...]``: the first
            ring is the outline, later rings are holes (subtracted). Ring orientation does
            not matter. Several polygons (a MultiPolygon) are weighted by their areas.

    A degenerate input whose area is below ``1e-9`` of its bounding box (a line, a
    repeated point) falls back to the mean of its vertices (closing vertices not counted)
    and area 0.
    """
    total = 0.0
    moment = np.zeros(2)
    verts: list[np.ndarray] = []
    for rings in polygons:
        for k, coords in enumerate(rings):
            ring = _ring(coords)
            if len(ring) == 0:
                continue
            verts.append(ring[:-1] if len(ring) > 1 and np.array_equal(ring[0], ring[-1]) else ring)
            a, c = _ring_area_centroid(ring)
            a = abs(a) if k == 0 else -abs(a)
            total += a
            moment += a * c
    if not verts:
        raise ValueError("polygon has no vertices")
    allv = np.vstack(verts)
    w, h = allv.max(axis=0) - allv.min(axis=0)
    if abs(total) > 1e-9 * w * h and total != 0.0:
        return abs(total), moment / total
    return 0.0, allv.mean(axis=0)


def _geometry(geom: dict[str, Any]) -> tuple[np.ndarray, bool, float]:
    kind = geom.get("type")
    coords: Any = geom.get("coordinates")
    if kind == "Point":
        return _ring([coords]), False, 0.0
    if kind == "MultiPoint":
        return (_ring(coords) if coords else np.zeros((0, 2))), False, 0.0
    if kind in ("Polygon", "MultiPolygon"):
        area, c = polygon_area_centroid([coords] if kind == "Polygon" else coords)
        return c[None], True, area
    raise ValueError(f"unsupported geometry type {kind!r} (need Point, MultiPoint, Polygon or MultiPolygon)")


def nucleus_geometry(feature: dict[str, Any]) -> dict[str, Any]:
    """The geometry that locates the nucleus of a feature: QuPath's ``nucleusGeometry`` of a
    cell object when present (its ``geometry`` is then the cell boundary), else ``geometry``."""
    geom = feature.get("nucleusGeometry")
    if geom is None:
        return feature["geometry"]
    if not isinstance(geom, dict):
        raise TypeError("'nucleusGeometry' must be a GeoJSON geometry object")
    return geom


def region_area_px2(mpp: float | None) -> float:
    """Area in px² above which a polygon is a region annotation, not a nucleus:
    :data:`REGION_AREA_UM2` at ``mpp`` µm/px, or :data:`REGION_AREA_PX2_DEFAULT` if unknown."""
    return REGION_AREA_UM2 / float(mpp) ** 2 if mpp else REGION_AREA_PX2_DEFAULT


def region_mask(points: GeoPoints, mpp: float | None) -> np.ndarray:
    """``(N,)`` bool: True where a point is the centroid of a region-sized polygon
    (area > :func:`region_area_px2`)."""
    return points.polygon & (points.area > region_area_px2(mpp))


def feature_class_name(props: dict[str, Any]) -> str | None:
    """The QuPath class name of a feature's properties, or None if unclassified."""
    cls = props.get("classification")
    if cls is None:
        return None
    if isinstance(cls, str):
        return cls
    if isinstance(cls, dict):
        if isinstance(cls.get("name"), str):
            return cls["name"]
        names = cls.get("names")
        if isinstance(names, list) and names:
            return ": ".join(str(n) for n in names)
    raise ValueError(f"unreadable classification {cls!r}")


def feature_score(props: dict[str, Any]) -> float:
    """The ``"Score (detection x class)"`` measurement, else ``"Detection score"``, else NaN."""
    m = props.get("measurements")
    found: dict[str, Any] = {}
    if isinstance(m, dict):
        found = m
    elif isinstance(m, list):
        found = {item.get("name"): item.get("value") for item in m if isinstance(item, dict)}
    for key in (COMBINED_SCORE_MEASUREMENT, SCORE_MEASUREMENT):
        if found.get(key) is not None:
            return float(found[key])
    return float("nan")


def read_geojson_points(path: str | os.PathLike[str]) -> GeoPoints:
    """Every nucleus point of a GeoJSON file (see the module docstring for what is accepted).

    Raises:
        InputError: naming the file and the feature index for unreadable geometries,
            unknown object types, bad classifications or scores.
    """
    p = Path(path)
    xys: list[np.ndarray] = []
    names: list[str | None] = []
    scores: list[float] = []
    poly: list[bool] = []
    areas: list[float] = []
    for i, f in enumerate(read_geojson_features(p)):
        props = f.get("properties") or {}
        if not isinstance(props, dict):
            raise InputError(f"{p}: feature {i}: 'properties' must be an object")
        otype = props.get("objectType", f.get("objectType"))
        if otype is not None and str(otype).lower() not in OBJECT_TYPES:
            raise InputError(f"{p}: feature {i}: objectType {otype!r} is not one of {list(OBJECT_TYPES)}")
        try:
            pts, is_poly, area = _geometry(nucleus_geometry(f))
            name = feature_class_name(props)
            score = feature_score(props)
        except (ValueError, TypeError) as e:
            raise InputError(f"{p}: feature {i}: {e}") from None
        if not np.all(np.isfinite(pts)):
            raise InputError(f"{p}: feature {i}: coordinates are not finite numbers")
        xys.append(pts)
        names += [name] * len(pts)
        scores += [score] * len(pts)
        poly += [is_poly] * len(pts)
        areas += [area] * len(pts)
    xy = np.concatenate(xys) if xys else np.zeros((0, 2))
    return GeoPoints(xy, names, np.asarray(scores, dtype=np.float32), np.asarray(poly, dtype=bool),
                     np.asarray(areas, dtype=np.float64))
