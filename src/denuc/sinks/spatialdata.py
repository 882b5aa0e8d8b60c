"""``<stem>.zarr``: the nuclei of one input as a SpatialData store (for napari-spatialdata,
squidpy and the other scverse tools that read SpatialData). Needs the optional extra
``pip install 'denuc[spatialdata]'``; ``spatialdata`` is imported only when this format is chosen.

Elements (every one in **level-0 pixels** of the input, pixel-edge frame, (x, y) = (column,
row); two coordinate systems: ``global`` = level-0 pixels (identity), ``micrometers`` = µm
from the top-left edge of level 0 (a scale by the level-0 mpp)):

* ``points['nuclei']``: a ``PointsModel`` element, one point per nucleus with columns ``x, y``
  (float64, the CSV's ``x, y``), in the order of the CSV's rows; its index is the instance id
  ``0 .. N-1``.
* ``tables['table']``: an AnnData with the obs, ``obsm`` and ``uns`` of the ``h5ad`` output
  (:mod:`denuc.sinks.anndata`: ``class``, scores, ``prob_<class>``, ``roi``, ``tile``;
  ``obsm['spatial']``, ``obsm['X_denuc']``, ``uns['denuc']``) plus the two obs columns that link
  it to the points (``region`` = ``"nuclei"``, categorical, and ``instance_id`` = the point's
  index, int64), declared as the table's ``region_key``/``instance_key`` (it annotates
  ``nuclei``; an input without nuclei has an empty table that annotates no element, as
  SpatialData wants). ``uns['denuc']['slide']`` is the input's path (the slide itself is not copied;
  the store's ``attrs['denuc']`` holds it too, with ``mpp`` and ``size``).
* ``shapes['tissue']`` (when the run has a tissue mask): the tissue found (or given) as
  ``ShapesModel`` polygons, the union of the mask's pixels (axis-aligned, at the mask's
  resolution: ``OutputInfo.tissue_downsample`` level-0 px per mask pixel), one row per
  connected part, holes kept.
* ``shapes['rois']`` (with ``--roi``): the regions of interest as given (polygons and
  multipolygons, holes kept), column ``name``.

Writing and memory: the table is written chunk by chunk as the ``h5ad`` output is (this sink is
an :class:`~denuc.sinks.anndata.AnnDataSink` whose HDF5 file is a hidden temporary one), so
during the run it holds one chunk. On close it builds the store in a hidden temporary folder
beside the final one: SpatialData writes whole elements, so the points (16 bytes per nucleus)
and the table without its features (obs and ``obsm['spatial']``: a few hundred bytes per
nucleus, the string index included; see docs/spatial.md) are read back into memory then, and
``obsm['X_denuc']`` is copied from the temporary file into the store in blocks of
:data:`COPY_ROWS` rows (memory bounded by one block, not by the slide). The folder is renamed
into place when complete (an older store of the same name is removed first) and the temporary
HDF5 file is removed; a failed run leaves neither.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from denuc.errors import InputError
from denuc.sinks.anndata import AnnDataSink
from denuc.sinks.base import OutputInfo

#: name of the points element, and the ``region`` its table rows annotate
POINTS = "nuclei"
#: name of the table element
TABLE = "table"
#: obs columns that link the table to the points
REGION_KEY, INSTANCE_KEY = "region", "instance_id"
#: coordinate systems of every element: level-0 pixels, and µm
GLOBAL, MICROMETERS = "global", "micrometers"
#: rows of ``obsm['X_denuc']`` copied at a time from the temporary HDF5 file into the store
COPY_ROWS = 16384


def _require_spatialdata() -> Any:
    try:
        import spatialdata
    except ImportError:
        raise InputError("--format spatialdata needs spatialdata: pip install 'denuc[spatialdata]'") from None
    return spatialdata


class SpatialDataSink(AnnDataSink):
    """Writes ``<stem>.zarr`` (see the module docstring)."""

    suffix = ".zarr"

    def __init__(self, info: OutputInfo) -> None:
        _require_spatialdata()
        super().__init__(info)
        self._h5_path = self._tmp.with_name(f"{self._tmp.name}.h5ad")  # the table while the run goes on

    @classmethod
    def check_available(cls) -> None:
        super().check_available()
        _require_spatialdata()

    def _finish(self, summary: dict[str, Any]) -> None:
        super()._finish(summary)  # completes (and closes) the temporary .h5ad
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # zarr's notices about future defaults
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # ome-zarr's, about its own defaults
            self._write_store(summary)
        self._h5_path.unlink(missing_ok=True)

    def _write_store(self, summary: dict[str, Any]) -> None:
        import h5py
        import pandas as pd
        import zarr
        from anndata import AnnData
        from spatialdata import SpatialData
        from spatialdata.models import PointsModel, ShapesModel, TableModel

        info = self.info
        with h5py.File(self._h5_path, "r") as f:
            obs, uns = _read_elem(f["obs"]), _read_elem(f["uns"])
            xy = np.asarray(f["obsm/spatial"][()], dtype=np.float64).reshape(-1, 2)
            n = len(xy)
            obs[REGION_KEY] = pd.Categorical.from_codes(np.zeros(n, np.int8), categories=[POINTS])
            obs[INSTANCE_KEY] = np.arange(n, dtype=np.int64)
            slide = str(summary.get("input") or "")
            uns.setdefault("denuc", {})["slide"] = slide
            # SpatialData refuses a table that names a region none of its rows is in: an input
            # without nuclei gets a table that annotates no element
            table = TableModel.parse(AnnData(obs=obs, obsm={"spatial": xy}, uns=uns), region=POINTS if n else [],
                                     region_key=REGION_KEY, instance_key=INSTANCE_KEY)
            points = PointsModel.parse(pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]}), coordinates={"x": "x", "y": "y"},
                                       transformations=_transformations(info.mpp))
            shapes = {}
            tissue = tissue_polygons(info)
            if tissue is not None:
                shapes["tissue"] = ShapesModel.parse(tissue, transformations=_transformations(info.mpp))
            rois = info.sink_options.get("roi_shapes")
            if rois:
                shapes["rois"] = ShapesModel.parse(_frame([str(k) for k, _ in rois], [g for _, g in rois]),
                                                   transformations=_transformations(info.mpp))
            sdata = SpatialData(points={POINTS: points}, shapes=shapes, tables={TABLE: table})
            sdata.attrs["denuc"] = {"slide": slide, "mpp": float(info.mpp), "size": [int(v) for v in info.size]}
            try:
                sdata.write(self._tmp)
            except OSError as e:
                raise InputError(f"{self._path}: cannot write ({e.strerror or e})") from None
            if "X_denuc" in f["obsm"]:  # the features, a block at a time
                src = f["obsm/X_denuc"]
                obsm = zarr.open_group(str(self._tmp / "tables" / TABLE / "obsm"), mode="a")
                rows = max(1, min(COPY_ROWS, len(src)))
                create = getattr(obsm, "create_array", None) or obsm.create_dataset  # zarr 3, zarr 2
                dst = create("X_denuc", shape=src.shape, dtype=src.dtype, chunks=(rows, max(1, src.shape[1])))
                dst.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
                for s0 in range(0, len(src), COPY_ROWS):
                    dst[s0:s0 + COPY_ROWS] = src[s0:s0 + COPY_ROWS]
                zarr.consolidate_metadata(str(self._tmp))

    def _commit(self) -> None:
        if self._path.is_dir() and not self._path.is_symlink():
            shutil.rmtree(self._path)
        elif self._path.exists() or self._path.is_symlink():
            self._path.unlink()
        os.replace(self._tmp, self._path)

    def abort(self) -> None:
        done = self._state == "closed"
        super().abort()
        if done:
            return
        for p in (getattr(self, "_h5_path", None),):
            if p is not None:
                try:
                    p.unlink(missing_ok=True)
                except OSError:
                    pass
        if self._tmp.is_dir():
            shutil.rmtree(self._tmp, ignore_errors=True)


def _transformations(mpp: float) -> dict[str, Any]:
    from spatialdata.transformations import Identity, Scale

    return {GLOBAL: Identity(), MICROMETERS: Scale([float(mpp), float(mpp)], axes=("x", "y"))}


def _read_elem(node: Any) -> Any:
    try:
        from anndata.io import read_elem
    except ImportError:  # anndata < 0.11
        from anndata.experimental import read_elem
    return read_elem(node)


def _frame(names: list[str], geoms: list[Any]) -> Any:
    import geopandas as gpd

    return gpd.GeoDataFrame({"name": names}, geometry=list(geoms))


def tissue_polygons(info: OutputInfo) -> Any:
    """The tissue of ``info`` as a GeoDataFrame of level-0 polygons (one row per connected part,
    holes kept, column ``name`` = ``"tissue"``), or None without a tissue mask or tissue.

    The polygons are the union of the mask's tissue pixels, each covering level-0
    ``[i*ds, (i+1)*ds) x [j*ds, (j+1)*ds)`` (the last column and row run to the input's edge,
    as :meth:`denuc.source.tissue.TissueMask.edges` has them)."""
    import shapely

    from denuc.source.area import tissue_boxes
    from denuc.source.tissue import TissueMask

    if info.tissue_mask is None or not np.asarray(info.tissue_mask).any():
        return None
    boxes = tissue_boxes(TissueMask(np.asarray(info.tissue_mask), info.tissue_downsample, "mask"), info.size)
    union = shapely.union_all(shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]))
    union = shapely.simplify(union, 0.0)  # drops the vertices between collinear edges of pixels only
    parts = [p for p in shapely.get_parts(union) if p.geom_type == "Polygon" and not p.is_empty]
    if not parts:
        return None
    return _frame(["tissue"] * len(parts), parts)


def read_store(path: str | os.PathLike[str]) -> Any:
    """Open a ``<stem>.zarr`` written by :class:`SpatialDataSink` (``spatialdata.read_zarr``)."""
    sd = _require_spatialdata()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return sd.read_zarr(Path(path))
