"""PUMA (Panoptic segmentation of nUclei and tissue in advanced MelAnoma, Schuiveling et al.
2024/2025): nucleus polygons of ten types, turned into centroid points.

Published layout (the training release, unzipped side by side)::

    ROOT/01_training_dataset_tif_ROIs/<stem>.tif                    # 1024 x 1024 ROIs (RGBA TIFF)
    ROOT/01_training_dataset_geojson_nuclei/<stem>_nuclei.geojson   # QuPath GeoJSON polygons
    ROOT/splits.yaml                                                # optional, yours (see below)

``<stem>`` is e.g. ``training_set_primary_roi_001`` or ``training_set_metastatic_roi_042``.
Any folder whose name contains ``tif_ROIs`` (not ``context``) holds images and any whose
name contains ``geojson_nuclei`` holds nuclei, so a later release folder with the same
naming is picked up too. Each GeoJSON feature is one nucleus: a ``Polygon`` (or
``MultiPolygon``, area-weighted) with ``properties.classification.name`` one of
:data:`PUMA_TYPES`. The point is the polygon's area centroid (x = column, y = row, ROI pixels).

Class mappings (``mapping=``):

* ``paper`` (DeNuC): tumor / lymphocyte / other; plasma cells -> other.
* ``challenge`` (PUMA track 1): tumor / tils / other; plasma cells and lymphocytes -> tils.

Resolution: the ROIs are 40x scans; ``mpp`` defaults to 0.25 µm/px (the value DeNuC uses;
the PUMA description gives ~0.23), override with ``mpp=``.

Splits: the release has no split file. Pass ``splits=<file>`` or put ``splits.yaml`` in ROOT
(``{train: [stem, ...], val: [...], test: [...]}``, see :mod:`denuc.data.splits`); without
one every ROI is listed by ``stems(None)`` and no split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from denuc.core.mpp import check_mpp
from denuc.core.result import Nuclei
from denuc.data.base import PointDataset, register_dataset
from denuc.data.geojson_points import read_geojson_points
from denuc.data.readers.generic import files_by_stem
from denuc.data.splits import SplitLists, ordered_stems, parse_splits, read_splits_file
from denuc.errors import InputError
from denuc.registry import Registry

#: The ten nucleus types of the PUMA release (``classification.name``).
PUMA_TYPES = (
    "nuclei_tumor",
    "nuclei_lymphocyte",
    "nuclei_plasma_cell",
    "nuclei_histiocyte",
    "nuclei_melanophage",
    "nuclei_neutrophil",
    "nuclei_stroma",
    "nuclei_endothelium",
    "nuclei_epithelium",
    "nuclei_apoptosis",
)
PUMA_MPP = 0.25
NUCLEI_SUFFIXES = ("_nuclei.geojson", "_nuclei.geojson.gz")
SPLITS_FILE = "splits.yaml"


@dataclass(frozen=True)
class PumaMapping:
    """How the ten PUMA types fold into a class vocabulary."""

    classes: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    of_type: dict[str, str]

    def class_id(self, puma_type: str) -> int:
        return self.classes.index(self.of_type[puma_type])


def _fold(tumor: str, lymph: str, plasma: str) -> dict[str, str]:
    m = {t: "other" for t in PUMA_TYPES}
    m.update({"nuclei_tumor": tumor, "nuclei_lymphocyte": lymph, "nuclei_plasma_cell": plasma})
    return m


_COLORS = ((200, 0, 0), (0, 160, 0), (0, 90, 220))
PUMA_MAPPINGS: Registry[PumaMapping] = Registry("PUMA class mapping")
PUMA_MAPPINGS.register("paper", PumaMapping(("tumor", "lymphocyte", "other"), _COLORS,
                                            _fold("tumor", "lymphocyte", "other")))
PUMA_MAPPINGS.register("challenge", PumaMapping(("tumor", "tils", "other"), _COLORS, _fold("tumor", "tils", "tils")))


def _folders(root: Path, needle: str) -> list[Path]:
    return sorted(d for d in root.iterdir()
                  if d.is_dir() and needle in d.name.lower() and "context" not in d.name.lower())


def _detect(p: Path) -> bool:
    return bool(_folders(p, "geojson_nuclei")) and bool(_folders(p, "tif_rois"))


@register_dataset("puma", _detect)
class Puma(SplitLists, PointDataset):
    """The PUMA release folder (module docstring)."""

    accepts_mpp = True

    def __init__(
        self,
        root: str | os.PathLike[str],
        outside: str = "error",
        mapping: str = "paper",
        mpp: float = PUMA_MPP,
        splits: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(root, outside)
        self.mapping_name = mapping
        self.mapping = PUMA_MAPPINGS.get(mapping)
        self.classes = self.mapping.classes
        self.colors = self.mapping.colors
        self.mpp = check_mpp(mpp, "PUMA mpp")
        img_dirs, nuc_dirs = _folders(self.root, "tif_rois"), _folders(self.root, "geojson_nuclei")
        if not img_dirs or not nuc_dirs:
            raise InputError(f"{self.root}: PUMA needs a *_tif_ROIs folder and a *_geojson_nuclei folder")
        self._images = files_by_stem(img_dirs, (".tif", ".tiff"), "image")
        self._labels = files_by_stem(nuc_dirs, NUCLEI_SUFFIXES, "nuclei")
        if not self._images:
            raise InputError(f"{self.root}: no .tif ROIs in {[d.name for d in img_dirs]}")
        missing = sorted(set(self._images) - set(self._labels))
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise InputError(f"PUMA {self.root}: no <stem>_nuclei.geojson for {len(missing)} ROI(s): "
                             f"{missing[:5]}{more}")
        if splits is None and (self.root / SPLITS_FILE).is_file():
            splits = self.root / SPLITS_FILE
        self.splits_file = Path(splits) if splits is not None else None
        known = set(self._images)
        self._splits = read_splits_file(splits, known) if splits is not None else parse_splits(None, "", known)
        self._order = ordered_stems(self._splits, known)

    def image_path(self, stem: str) -> Path:
        if stem not in self._images:
            raise InputError(f"PUMA {self.root}: no ROI {stem!r}")
        return self._images[stem]

    def _read_points(self, stem: str) -> Nuclei:
        self.image_path(stem)
        path = self._labels[stem]
        g = read_geojson_points(path)
        unknown = sorted({"(unclassified)" if n is None else n for n in g.names if n not in self.mapping.of_type})
        if unknown:
            raise InputError(f"{path}: unknown nucleus type(s) {unknown}; known: {list(PUMA_TYPES)}")
        ids = np.array([self.mapping.class_id(n) for n in g.names], dtype=np.int64)  # type: ignore[arg-type]
        return Nuclei(g.xy, None, ids, self.classes)
