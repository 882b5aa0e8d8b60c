"""The analysed area of one input: where nuclei are reported, and how large it is.

Rule: a nucleus is reported when its centre lies inside the analysed area, which is the
tissue (:class:`~denuc.source.tissue.TissueMask`: the automatic mask, a ``--tissue-mask`` file,
or the whole image with ``--tissue none``) intersected with the regions of interest when
``--roi`` is given. Every density is (nuclei inside an area) / (that area): the top-level one
over the analysed area, each region's over that region ∩ tissue. Areas are exact level-0
areas (mask pixels are boxes of level-0 px, polygons are polygons), in µm² here and mm² in
summaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from denuc.source.roi import RegionsOfInterest
from denuc.source.tissue import TissueMask

UM2_PER_MM2 = 1e6


def tissue_boxes(tissue: TissueMask, size: tuple[int, int]) -> np.ndarray:
    """``(K, 4)`` level-0 boxes ``x0, y0, x1, y1`` whose union is the tissue: one per run of
    tissue pixels in a mask row (:meth:`TissueMask.edges` with the slide's ``size``)."""
    m = tissue.mask.astype(np.int8)
    d = np.diff(np.pad(m, ((0, 0), (1, 1))), axis=1)
    rs, cs = np.nonzero(d == 1)  # row-major order: starts and ends pair up
    _, ce = np.nonzero(d == -1)
    xe, ye = tissue.edges(size)
    return np.stack([xe[cs], ye[rs], xe[ce], ye[rs + 1]], axis=1) if len(rs) else np.zeros((0, 4))


def _area_in_tissue(geom: Any, boxes: Any, tree: Any) -> float:
    """Level-0 px² of ``geom`` ∩ the union of the (disjoint) tissue ``boxes``."""
    import shapely

    idx = tree.query(geom, predicate="intersects")
    if not len(idx):
        return 0.0
    cand = boxes[idx]
    inside = shapely.contains_properly(geom, cand)
    full = float(shapely.area(cand[inside]).sum())
    part = float(shapely.area(shapely.intersection(cand[~inside], geom)).sum()) if (~inside).any() else 0.0
    return full + part


@dataclass
class AnalysedArea:
    """Tissue ∩ ROIs of one input (module docstring).

    Attributes:
        tissue: the tissue mask (``method == "none"``: the whole image, nothing is filtered).
        rois: regions of interest, or None.
        size: level-0 ``(width, height)``.
        mpp: level-0 µm per pixel.
    """

    tissue: TissueMask
    rois: RegionsOfInterest | None
    size: tuple[int, int]
    mpp: float
    tissue_area_um2: float = field(init=False)
    roi_areas_um2: dict[str, float] | None = field(init=False)

    def __post_init__(self) -> None:
        self.size = (int(self.size[0]), int(self.size[1]))
        self.mpp = float(self.mpp)
        self.tissue_area_um2 = self.tissue.area_um2(self.mpp, self.size)
        self.roi_areas_um2 = self._roi_areas() if self.rois is not None else None

    @property
    def filters_tissue(self) -> bool:
        """Whether nuclei are filtered by the tissue mask (not with ``--tissue none``)."""
        return self.tissue.method != "none"

    def _roi_areas(self) -> dict[str, float]:
        """Area per ROI name in µm²: each region's own part (first in file order wins overlaps,
        as :meth:`RegionsOfInterest.contains`) ∩ the image ∩ the tissue."""
        import shapely

        assert self.rois is not None
        w, h = self.size
        image = shapely.box(0.0, 0.0, float(w), float(h))
        if self.filters_tissue:
            boxes = shapely.box(*tissue_boxes(self.tissue, self.size).T) if self.tissue.mask.any() else None
            tree = shapely.STRtree(boxes) if boxes is not None else None
        areas: dict[str, float] = {}
        covered = None
        for name, g in zip(self.rois.names, self.rois.geoms, strict=True):
            own = g if covered is None else shapely.difference(g, covered)
            covered = g if covered is None else shapely.union(covered, g)
            own = shapely.intersection(own, image)
            if not self.filters_tissue:
                px = float(shapely.area(own))
            elif boxes is None or own.is_empty:
                px = 0.0
            else:
                shapely.prepare(own)
                px = _area_in_tissue(own, boxes, tree)
            areas[name] = areas.get(name, 0.0) + px * self.mpp ** 2
        return areas

    @property
    def analysed_area_um2(self) -> float:
        """Area of tissue ∩ (union of the ROIs) in µm² (the tissue area without ROIs)."""
        if self.roi_areas_um2 is None:
            return self.tissue_area_um2
        return float(sum(self.roi_areas_um2.values()))

    def keep(self, xy: np.ndarray) -> np.ndarray:
        """``(N, 2)`` level-0 ``(x, y)`` -> ``(N,)`` bool: the centre lies in the tissue (always
        True with ``--tissue none``). ROI membership is asked of :attr:`rois` separately."""
        if not self.filters_tissue:
            return np.ones(len(xy), dtype=bool)
        return self.tissue.contains(xy)

    def mask(self) -> np.ndarray:
        """The analysed area on the tissue mask's grid (``tissue.downsample`` level-0 px per
        pixel): a ``(h', w')`` bool array, tissue ∩ the ROIs by each pixel's centre (the tissue
        mask itself without ROIs; all True with ``--tissue none`` and no ROIs)."""
        m = np.asarray(self.tissue.mask, dtype=bool)
        if not self.filters_tissue:
            m = np.ones_like(m)
        if self.rois is None:
            return m
        ds = float(self.tissue.downsample)
        ys, xs = np.nonzero(m)
        xy = np.stack([(xs + 0.5) * ds, (ys + 0.5) * ds], axis=1)
        out = np.zeros_like(m)
        out[ys, xs] = self.rois.region_index(xy) >= 0
        return out

    def describe(self) -> dict[str, Any]:
        """Each area in mm² and how it was obtained (for ``summary.json``'s ``areas``)."""
        tissue_how = self.tissue.describe(self.mpp)
        out: dict[str, Any] = {"tissue": {"area_mm2": self.tissue_area_um2 / UM2_PER_MM2, "how": tissue_how}}
        if self.roi_areas_um2 is not None:
            within = "tissue" if self.filters_tissue else "the image"
            how = f"ROI polygons minus their holes, first region in file order wins overlaps, ∩ {within}"
            out["rois"] = {n: {"area_mm2": a / UM2_PER_MM2, "how": how} for n, a in self.roi_areas_um2.items()}
            out["analysed"] = {"area_mm2": self.analysed_area_um2 / UM2_PER_MM2,
                               "how": f"union of the ROIs ∩ {within} ({self.rois.source})"}
        else:
            out["analysed"] = {"area_mm2": self.tissue_area_um2 / UM2_PER_MM2, "how": f"tissue: {tissue_how}"}
        return out
