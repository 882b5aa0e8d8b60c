"""Regions of interest drawn in QuPath (GeoJSON export), in level-0 pixels.

QuPath writes annotations as GeoJSON Features with ``Polygon``/``MultiPolygon`` geometry in
level-0 pixel coordinates (origin at the top-left edge, x = column) and
``properties.name`` / ``properties.classification.name``. :func:`load_rois` reads such a
file; :class:`RegionsOfInterest` answers which region each point lies in and which tiles
touch a region, vectorised with shapely 2.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from denuc.errors import InputError

#: Up to this many regions, :meth:`RegionsOfInterest.contains` tests each region against all
#: points (bounding-box filter first); above it, the points are sorted by x once and each region
#: looks only at the points in its x-range.
_LOOP_MAX = 32

#: QuPath object types that are not regions (cells and detections exported with annotations).
_NOT_REGIONS = ("detection", "cell", "tile")


class RegionsOfInterest:
    """Polygonal regions (holes honoured) with one name each, in level-0 pixels.

    Attributes:
        names: one name per region, in file order (names may repeat).
        geoms: the shapely (multi)polygons, in file order.
        source: the file they came from (for messages).
    """

    def __init__(self, geoms: Sequence[Any], names: Sequence[str], source: str = "") -> None:
        import shapely

        if len(geoms) != len(names):
            raise ValueError(f"{len(geoms)} geometries but {len(names)} names")
        if not geoms:
            raise ValueError("at least one region is needed")
        self.geoms: tuple[Any, ...] = tuple(geoms)
        self.names: tuple[str, ...] = tuple(str(n) for n in names)
        self.source = source
        for g in self.geoms:
            shapely.prepare(g)
        self._tree = shapely.STRtree(self.geoms)
        self._bounds = shapely.bounds(np.array(self.geoms, dtype=object))  # (R, 4)

    def __len__(self) -> int:
        return len(self.geoms)

    def __repr__(self) -> str:
        return f"RegionsOfInterest({len(self)} region(s): {sorted(set(self.names))}, from {self.source or '?'})"

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` level-0 bounding box of all regions."""
        b = self._bounds
        return (float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max()))

    def region_index(self, xy: np.ndarray) -> np.ndarray:
        """``(N, 2)`` level-0 ``(x, y)`` -> ``(N,)`` int64 index of the first region (file order)
        whose interior holds the point, ``-1`` outside all (boundary points count as outside;
        NaN points too)."""
        import shapely

        pts = np.asarray(xy, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 2:
            raise ValueError(f"xy must be (N, 2) x, y; got shape {pts.shape}")
        n = len(pts)
        idx = np.full(n, -1, dtype=np.int64)
        if n == 0:
            return idx
        x, y = pts[:, 0], pts[:, 1]
        if len(self.geoms) <= _LOOP_MAX:
            for k, g in enumerate(self.geoms):
                x0, y0, x1, y1 = self._bounds[k]
                cand = np.flatnonzero((idx < 0) & (x > x0) & (x < x1) & (y > y0) & (y < y1))
                if len(cand):
                    idx[cand[shapely.contains_xy(g, x[cand], y[cand])]] = k
            return idx
        # many regions: points sorted by x, so each region looks only at its own x-strip
        order = np.argsort(x)
        xs, ys = x[order], y[order]
        for k, g in enumerate(self.geoms):
            x0, y0, x1, y1 = self._bounds[k]
            lo, hi = np.searchsorted(xs, [x0, x1], side="right")
            strip = ys[lo:hi]
            cand = order[lo:hi][(strip > y0) & (strip < y1)]
            cand = cand[idx[cand] < 0]
            if len(cand):
                idx[cand[shapely.contains_xy(g, x[cand], y[cand])]] = k
        return idx

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """``(N, 2)`` level-0 ``(x, y)`` -> ``(N,)`` object array of the region name per point,
        ``""`` outside all regions. Where regions overlap, the first in file order wins.
        Vectorised: 10^6 points take about a second."""
        idx = self.region_index(xy)
        table = np.array([*self.names, ""], dtype=object)
        return table[idx]  # -1 picks the trailing ""

    def intersects_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """``(K, 4)`` level-0 boxes ``x0, y0, x1, y1`` -> ``(K,)`` bool: the box (closed)
        intersects some region. Empty or NaN boxes intersect nothing."""
        import shapely

        b = np.asarray(boxes, dtype=np.float64)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes must be (K, 4) x0, y0, x1, y1; got shape {b.shape}")
        out = np.zeros(len(b), dtype=bool)
        ok = np.flatnonzero(np.isfinite(b).all(axis=1) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]))
        if len(ok):
            polys = shapely.box(b[ok, 0], b[ok, 1], b[ok, 2], b[ok, 3])
            box_i, _ = self._tree.query(polys, predicate="intersects")
            out[ok[np.unique(box_i)]] = True
        return out

    def outlines(self) -> list[np.ndarray]:
        """Every ring of every region, holes included: ``(K, 2)`` level-0 ``(x, y)`` arrays (for
        drawing; exterior rings first within each polygon, then its holes)."""
        import shapely

        out: list[np.ndarray] = []
        for g in self.geoms:
            for poly in shapely.get_parts(g):
                if poly.geom_type != "Polygon" or poly.is_empty:
                    continue
                out.append(np.asarray(poly.exterior.coords, dtype=np.float64)[:, :2])
                out.extend(np.asarray(r.coords, dtype=np.float64)[:, :2] for r in poly.interiors)
        return out

    def area_um2(self, mpp: float) -> dict[str, float]:
        """Area per name in µm², summed over regions of that name. Each region counts only the
        part no earlier region covers (the same first-wins rule as :meth:`contains`), so
        densities (points per area) stay consistent where regions overlap."""
        import shapely

        scale = float(mpp) ** 2
        areas: dict[str, float] = {}
        covered = None
        for name, g in zip(self.names, self.geoms):
            own = g if covered is None else shapely.difference(g, covered)
            areas[name] = areas.get(name, 0.0) + float(shapely.area(own)) * scale
            covered = g if covered is None else shapely.union(covered, g)
        return areas


def _features(obj: Any, p: Path) -> list[Any]:
    """The list of GeoJSON Features of a parsed file."""
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        t = obj.get("type")
        if t == "FeatureCollection":
            feats = obj.get("features")
            if not isinstance(feats, list):
                raise InputError(f"{p}: FeatureCollection without a 'features' list")
            return feats
        if t == "Feature":
            return [obj]
        if t in ("Polygon", "MultiPolygon", "GeometryCollection", "Point", "MultiPoint", "LineString",
                 "MultiLineString"):
            return [{"type": "Feature", "geometry": obj, "properties": {}}]
    raise InputError(f"{p}: not GeoJSON regions (expected a FeatureCollection, a list of Features or a Feature)")


def _name(props: dict[str, Any]) -> str:
    """``properties.name``, else ``properties.classification.name`` (or a plain string
    classification), else ``""``."""
    name = props.get("name")
    if isinstance(name, str) and name.strip():
        return name.strip()
    cls = props.get("classification")
    if isinstance(cls, dict):
        cls = cls.get("name")
    if isinstance(cls, str) and cls.strip():
        return cls.strip()
    return ""


def _polygonal(g: Any) -> Any:
    """The polygonal part of a geometry (a GeometryCollection's polygons united), or ``None``."""
    import shapely

    parts = [q for q in shapely.get_parts(g) if q.geom_type in ("Polygon", "MultiPolygon") and not q.is_empty]
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else shapely.union_all(parts)


def load_rois(path: str | os.PathLike[str], slide_size: tuple[int, int] | None = None) -> RegionsOfInterest:
    """Read regions of interest from a QuPath GeoJSON export.

    Accepts a FeatureCollection, a list of Features or a single Feature. ``Polygon`` and
    ``MultiPolygon`` geometries (holes honoured) and the polygons inside a
    ``GeometryCollection`` become one region per Feature; other geometries (points, lines) and
    QuPath detections/cells are skipped with one warning. Coordinates are level-0 pixels.
    Names: ``properties.name``, else ``properties.classification.name``, else ``roi_<k>``
    (``k`` = 1-based position among the regions). Self-intersecting polygons are repaired with
    ``shapely.make_valid``.

    Args:
        slide_size: ``(width, height)`` of level 0; when given, a file whose regions all lie
            outside the slide is refused, and regions partly outside get a warning.

    Raises:
        InputError: one line naming the file: not JSON/GeoJSON, no polygon at all, an invalid
            polygon that cannot be repaired, or every region outside the slide.
    """
    import orjson
    import shapely
    from shapely.geometry import shape

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such ROI file")
    try:
        obj = orjson.loads(p.read_bytes())
    except orjson.JSONDecodeError as e:
        raise InputError(f"{p}: not JSON ({e})") from None
    except OSError as e:
        raise InputError(f"{p}: cannot read ({e.strerror or e})") from None
    geoms: list[Any] = []
    names: list[str] = []
    skipped: Counter[str] = Counter()
    for k, feat in enumerate(_features(obj, p)):
        if not isinstance(feat, dict) or not isinstance(feat.get("geometry"), (dict, type(None))):
            raise InputError(f"{p}: feature {k} is not a GeoJSON Feature")
        props = feat.get("properties") if isinstance(feat.get("properties"), dict) else {}
        if str(props.get("objectType", "")).lower() in _NOT_REGIONS:
            skipped[f"{props['objectType']} object"] += 1
            continue
        geometry = feat.get("geometry")
        if geometry is None:
            skipped["no geometry"] += 1
            continue
        gtype = geometry.get("type")
        name = _name(props)
        label = f"feature {k}" + (f" ({name!r})" if name else "")
        if gtype not in ("Polygon", "MultiPolygon", "GeometryCollection"):
            skipped[str(gtype)] += 1
            continue
        try:
            g = shape(geometry)
        except Exception as e:  # noqa: BLE001 - shapely raises several types for bad coordinates
            raise InputError(f"{p}: {label}: malformed {gtype} coordinates ({type(e).__name__}: {e})") from None
        if gtype == "GeometryCollection":
            kinds = Counter(q.geom_type for q in shapely.get_parts(g) if q.geom_type not in ("Polygon", "MultiPolygon"))
            skipped.update({f"{t} in a GeometryCollection": n for t, n in kinds.items()})
            g = _polygonal(g)
            if g is None:
                continue
        if g.is_empty:
            skipped[f"empty {gtype}"] += 1
            continue
        coords = shapely.get_coordinates(g)
        if not np.isfinite(coords).all():
            raise InputError(f"{p}: {label}: coordinates must be finite numbers")
        if not g.is_valid:
            why = shapely.is_valid_reason(g)
            fixed = _polygonal(shapely.make_valid(g))
            if fixed is None or fixed.area <= 0:
                raise InputError(f"{p}: {label}: invalid polygon that cannot be repaired ({why})")
            g = fixed
        geoms.append(g)
        names.append(name or f"roi_{len(geoms)}")
    if not geoms:
        found = ", ".join(f"{t} x{n}" for t, n in skipped.most_common()) or "no features"
        raise InputError(f"{p}: no polygon region in the file (found: {found})")
    if skipped:
        what = ", ".join(f"{t} x{n}" for t, n in skipped.most_common())
        warnings.warn(f"{p}: skipped {sum(skipped.values())} feature(s) that are not polygon regions ({what})",
                      stacklevel=2)
    if slide_size is not None:
        w, h = (float(v) for v in slide_size)
        slide = shapely.box(0.0, 0.0, w, h)
        inside_area = shapely.area(shapely.intersection(np.array(geoms, dtype=object), slide))
        if not (inside_area > 0).any():
            b = shapely.total_bounds(np.array(geoms, dtype=object))
            raise InputError(f"{p}: every region lies outside the slide ({w:.0f} x {h:.0f} px; regions span x "
                             f"{b[0]:.0f}..{b[2]:.0f}, y {b[1]:.0f}..{b[3]:.0f}); are the coordinates level-0 "
                             "pixels of this slide?")
        areas = shapely.area(np.array(geoms, dtype=object))
        partly = int(((inside_area < areas * (1 - 1e-9))).sum())
        if partly:
            warnings.warn(f"{p}: {partly} region(s) extend beyond the slide ({w:.0f} x {h:.0f} px)", stacklevel=2)
    return RegionsOfInterest(geoms, names, source=str(p))
