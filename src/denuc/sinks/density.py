"""Per-class nucleus densities on a regular grid: :class:`DensitySink`.

The input's level-0 plane is cut into square cells of ``density_grid_um`` µm
(``OutputInfo.sink_options``, default :data:`DEFAULT_GRID_UM`), starting at its top-left edge;
cell ``(i, j)`` covers level-0 px ``[j * g, (j + 1) * g) x [i * g, (i + 1) * g)`` with
``g = grid_um / mpp`` (the last row and column are cut at the image edge). Every nucleus is
counted in the cell that holds its (x, y), per class. The **analysed area** of a cell is its area
inside the image times the fraction of analysed area (tissue ∩ ROIs, ``OutputInfo.analysed_mask``,
else ``OutputInfo.tissue_mask``) among the mask pixels whose centres fall in it (the whole cell
when there is no mask): counts and areas are both of the analysed area.

Outputs:

* ``<stem>.density.geojson``: one QuPath ``tile`` object per cell with analysed area or nuclei
  (``Polygon`` in level-0 px), measurements ``Area µm^2`` (analysed), ``Num nuclei``,
  ``Num <class>``, ``Density nuclei per mm^2`` and ``Density <class> per mm^2`` (0 where the
  analysed area is 0). QuPath shows a measurement as a heat map (Measure > Show measurement
  maps).
* ``<stem>.density.<class>.png``: one heat map per class, one pixel per cell (nearest-upscaled
  to at least :data:`MIN_PNG_SIDE` px), black where nothing was analysed, else a dark-to-bright
  ramp of the class colour from 0 to the class's highest density (written in the PNG's text
  chunk ``max_density_per_mm2``).

Memory: a ``(rows, cols, classes)`` count grid, whatever the number of nuclei.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any

import numpy as np

from denuc.core.files import file_mode
from denuc.core.result import Nuclei
from denuc.errors import InputError
from denuc.sinks.base import OutputInfo, Sink, class_ids_of

#: grid cell side in µm when none is given
DEFAULT_GRID_UM = 50.0
#: most grid cells a density output may have (a finer grid on a large slide is refused)
MAX_CELLS = 4_000_000
#: smallest side of a density PNG (small grids are upscaled by an integer factor)
MIN_PNG_SIDE = 256


def grid_shape(info: OutputInfo, grid_um: float) -> tuple[int, int, float]:
    """``(rows, cols, g)``: the grid of ``info``'s input and its cell side ``g`` in level-0 px."""
    g = float(grid_um) / info.mpp
    w, h = info.size
    return math.ceil(h / g), math.ceil(w / g), g


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "class"


class DensitySink(Sink):
    """``<stem>.density.geojson`` plus ``<stem>.density.<class>.png`` (see the module docstring)."""

    suffix = ".density.geojson"

    def __init__(self, info: OutputInfo) -> None:
        super().__init__(info)
        grid = info.sink_options.get("density_grid_um", DEFAULT_GRID_UM)
        try:
            self.grid_um = float(grid)
        except (TypeError, ValueError):
            raise InputError(f"--density-grid must be a number of µm; got {grid!r}") from None
        if not (math.isfinite(self.grid_um) and self.grid_um > 0):
            raise InputError(f"--density-grid must be a positive number of µm; got {grid!r}")
        self.rows, self.cols, self.g = grid_shape(info, self.grid_um)
        if self.rows * self.cols > MAX_CELLS:
            raise InputError(f"{self._path}: a {self.grid_um:g} µm grid has {self.rows} x {self.cols} cells on this "
                             f"input (at most {MAX_CELLS}); choose a larger --density-grid")
        k = len(info.class_names)
        self.counts = np.zeros((self.rows, self.cols, k), np.int64)  # classified, per class
        self.total = np.zeros((self.rows, self.cols), np.int64)  # every nucleus
        self._pngs: dict[str, tuple[Any, Any]] = {}  # class -> (tmp, final)
        for c in info.class_names:
            final = info.final_path(f".density.{_safe(c)}.png")
            self._pngs[c] = (final.with_name(f".{final.name}.{os.getpid()}.tmp"), final)

    def cell_of(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(row, col)`` of the cells holding level-0 points ``xy (N, 2)``."""
        col = np.clip(np.floor(xy[:, 0] / self.g).astype(np.int64), 0, self.cols - 1)
        row = np.clip(np.floor(xy[:, 1] / self.g).astype(np.int64), 0, self.rows - 1)
        return row, col

    def _write(self, chunk: Nuclei) -> None:
        if not len(chunk):
            return
        row, col = self.cell_of(chunk.xy)
        np.add.at(self.total, (row, col), 1)
        ids = class_ids_of(chunk)
        ok = ids >= 0
        np.add.at(self.counts, (row[ok], col[ok], ids[ok]), 1)

    def area_um2(self) -> np.ndarray:
        """``(rows, cols)`` analysed area (tissue ∩ ROIs) of each cell in µm²: the cell's area
        inside the image times the fraction of its mask pixels (by their centres) that are in the
        analysed area (:attr:`OutputInfo.analysed_mask`, else the tissue mask)."""
        info = self.info
        w, h = info.size
        xs = np.minimum(np.arange(1, self.cols + 1) * self.g, w) - np.arange(self.cols) * self.g
        ys = np.minimum(np.arange(1, self.rows + 1) * self.g, h) - np.arange(self.rows) * self.g
        full = np.outer(ys, xs) * info.mpp ** 2
        grid = info.analysed_mask if info.analysed_mask is not None else info.tissue_mask
        if grid is None:
            return full
        mask = np.asarray(grid).astype(bool)
        ds = info.tissue_downsample
        mh, mw = mask.shape
        col = np.clip(np.floor((np.arange(mw) + 0.5) * ds / self.g).astype(np.int64), 0, self.cols - 1)
        row = np.clip(np.floor((np.arange(mh) + 0.5) * ds / self.g).astype(np.int64), 0, self.rows - 1)
        cell = (row[:, None] * self.cols + col[None, :]).ravel()
        n = self.rows * self.cols
        every = np.bincount(cell, minlength=n).reshape(self.rows, self.cols)
        tissue = np.bincount(cell, weights=mask.ravel(), minlength=n).reshape(self.rows, self.cols)
        # a cell smaller than a mask pixel takes the tissue state of the mask pixel at its centre
        cy = np.clip(((np.arange(self.rows) + 0.5) * self.g / ds).astype(np.int64), 0, mh - 1)
        cx = np.clip(((np.arange(self.cols) + 0.5) * self.g / ds).astype(np.int64), 0, mw - 1)
        at_centre = mask[np.ix_(cy, cx)].astype(np.float64)
        frac = np.where(every > 0, tissue / np.maximum(every, 1), at_centre)
        return full * frac

    def _finish(self, summary: dict[str, Any]) -> None:
        import orjson

        area = self.area_um2()
        names = self.info.class_names
        with np.errstate(divide="ignore", invalid="ignore"):
            dens = np.where(area[..., None] > 0, self.counts / (area[..., None] / 1e6), 0.0)
            dens_all = np.where(area > 0, self.total / (area / 1e6), 0.0)
        w, h = self.info.size
        ii, jj = np.nonzero((area > 0) | (self.total > 0))
        x0, y0 = np.round(jj * self.g, 3), np.round(ii * self.g, 3)
        x1, y1 = np.round(np.minimum((jj + 1) * self.g, w), 3), np.round(np.minimum((ii + 1) * self.g, h), 3)
        cols: list[tuple[str, np.ndarray]] = [("Area µm^2", np.round(area[ii, jj], 3)),
                                              ("Num nuclei", self.total[ii, jj])]
        cols += [(f"Num {c}", self.counts[ii, jj, k]) for k, c in enumerate(names)]
        cols += [("Density nuclei per mm^2", np.round(dens_all[ii, jj], 3))]
        cols += [(f"Density {c} per mm^2", np.round(dens[ii, jj, k], 3)) for k, c in enumerate(names)]
        fh = self._open_tmp()
        head = {"type": "FeatureCollection", "grid_um": self.grid_um, "rows": self.rows, "cols": self.cols}
        fh.write(orjson.dumps(head)[:-1] + b',"features":[')
        step = 8192  # cells turned into dicts at a time (bounded memory on fine grids)
        for s0 in range(0, len(ii), step):
            sl = slice(s0, s0 + step)
            values = [(n, v[sl].tolist()) for n, v in cols]
            feats = [{"type": "Feature", "id": f"cell-{i}-{j}",
                      "geometry": {"type": "Polygon",
                                   "coordinates": [[[a, b], [c, b], [c, d], [a, d], [a, b]]]},
                      "properties": {"objectType": "tile", "name": f"cell {i},{j}",
                                     "measurements": {n: v[r] for n, v in values}}}
                     for r, (i, j, a, b, c, d) in enumerate(zip(ii[sl].tolist(), jj[sl].tolist(), x0[sl].tolist(),
                                                                 y0[sl].tolist(), x1[sl].tolist(), y1[sl].tolist()))]
            if s0:
                fh.write(b",")
            fh.write(orjson.dumps(feats)[1:-1])
        fh.write(b"]}\n")
        for k, c in enumerate(names):
            self._png(c, dens[..., k], area > 0)
        for c, (tmp, final) in self._pngs.items():
            os.chmod(tmp, file_mode())
            os.replace(tmp, final)

    def _png(self, name: str, dens: np.ndarray, analysed: np.ndarray) -> None:
        from PIL import Image, PngImagePlugin

        top = float(dens.max()) if dens.size else 0.0
        t = dens / top if top > 0 else np.zeros_like(dens)
        rgb = np.asarray(self.info.colors[name], np.float64)
        lo = rgb * 0.12 + 20
        img = lo + t[..., None] * (np.maximum(rgb, 60) - lo)
        img = np.where(analysed[..., None], img, 0.0)
        img = np.clip(np.round(img), 0, 255).astype(np.uint8)
        up = max(1, math.ceil(MIN_PNG_SIDE / max(1, max(img.shape[:2]))))
        if up > 1:
            img = np.repeat(np.repeat(img, up, axis=0), up, axis=1)
        meta = PngImagePlugin.PngInfo()
        meta.add_text("max_density_per_mm2", f"{top:.6g}")
        meta.add_text("grid_um", f"{self.grid_um:g}")
        tmp = self._pngs[name][0]
        try:
            Image.fromarray(img).save(tmp, format="PNG", pnginfo=meta)
        except OSError as e:
            raise InputError(f"{self._pngs[name][1]}: cannot write ({e.strerror or e})") from None

    def abort(self) -> None:
        for tmp, _ in getattr(self, "_pngs", {}).values():
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
        super().abort()
