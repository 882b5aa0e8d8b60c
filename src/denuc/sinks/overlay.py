"""``<stem>.overlay.png``: the input's thumbnail with every nucleus as a dot in its class colour.

The canvas is ``OutputInfo.thumbnail`` (``thumb_downsample`` level-0 px per canvas px; the
pipeline gives a slide's thumbnail, or an image itself downscaled to at most
:data:`MAX_SIDE` px, see :func:`thumbnail_of`), or a white canvas of that size when there is
none. The tissue mask's boundary is drawn when a mask is given, nuclei are drawn as they
come (a nucleus at level-0 (x, y) lands on canvas pixel (floor(x / ds), floor(y / ds));
where several share a pixel the last one drawn wins), ROI outlines are drawn on top at the
end, and the PNG is written atomically. Memory: the canvas, whatever the number of nuclei.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from denuc.core.palette import RGB
from denuc.core.result import Nuclei
from denuc.errors import InputError
from denuc.sinks.base import OutputInfo, Sink, class_ids_of

#: Longest side of a canvas made without a thumbnail, and of :func:`thumbnail_of`.
MAX_SIDE = 2048
TISSUE_OUTLINE: RGB = (0, 0, 0)
ROI_OUTLINE: RGB = (255, 255, 0)
UNCLASSIFIED: RGB = (64, 64, 64)


def thumbnail_of(image: np.ndarray, max_side: int = MAX_SIDE) -> tuple[np.ndarray, float]:
    """An ``(h, w, 3)`` uint8 RGB image downscaled (area average) so its longest side is at
    most ``max_side``, and its downsample (level-0 px per thumbnail px; 1.0 when it already fits)."""
    from PIL import Image

    img = np.asarray(image)
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return np.ascontiguousarray(img), 1.0
    ds = max(h, w) / max_side
    size = (max(1, round(w / ds)), max(1, round(h / ds)))
    return np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BOX)), ds


def _mask_on_canvas(mask: np.ndarray, mask_ds: float, shape: tuple[int, int], ds: float) -> np.ndarray:
    """The mask value at the centre of every canvas pixel: ``shape`` (h, w) bool."""
    m = np.asarray(mask).astype(bool, copy=False)
    rows = np.clip(((np.arange(shape[0]) + 0.5) * ds / mask_ds).astype(np.int64), 0, m.shape[0] - 1)
    cols = np.clip(((np.arange(shape[1]) + 0.5) * ds / mask_ds).astype(np.int64), 0, m.shape[1] - 1)
    return m[rows[:, None], cols[None, :]]


class OverlaySink(Sink):
    """The PNG overlay of the module docstring."""

    suffix = ".overlay.png"

    def __init__(self, info: OutputInfo) -> None:
        super().__init__(info)
        self._open_tmp()  # now: an unwritable folder fails before any work
        if info.thumbnail is not None:
            self.canvas = np.array(info.thumbnail, dtype=np.uint8, copy=True)
            self.downsample = info.thumb_downsample
        else:
            w, h = info.size
            self.downsample = max(1.0, max(w, h) / MAX_SIDE)
            shape = (max(1, math.ceil(h / self.downsample)), max(1, math.ceil(w / self.downsample)), 3)
            self.canvas = np.full(shape, 255, dtype=np.uint8)
        #: dot half-width in canvas px: 5x5 dots when a canvas px is about a level-0 px, else 3x3
        self.radius = 2 if self.downsample < 2 else 1
        self._lut = np.array([*(info.colors[c] for c in info.class_names), UNCLASSIFIED], dtype=np.uint8)
        if info.tissue_mask is not None:
            self._draw_tissue(info.tissue_mask, info.tissue_downsample)

    def _draw_tissue(self, mask: np.ndarray, mask_ds: float) -> None:
        from scipy import ndimage

        h, w = self.canvas.shape[:2]
        m = _mask_on_canvas(mask, mask_ds, (h, w), self.downsample)
        width = max(1, round(max(h, w) / 1000))
        edge = m & ~ndimage.binary_erosion(m, iterations=width, border_value=1)
        self.canvas[edge] = TISSUE_OUTLINE

    def _write(self, chunk: Nuclei) -> None:
        if not len(chunk):
            return
        h, w = self.canvas.shape[:2]
        cols = np.floor(chunk.xy[:, 0] / self.downsample).astype(np.int64)
        rows = np.floor(chunk.xy[:, 1] / self.downsample).astype(np.int64)
        ids = class_ids_of(chunk)
        rgb = self._lut[np.where(ids < 0, len(self._lut) - 1, ids)]
        r = self.radius
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                rr, cc = rows + dy, cols + dx
                ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
                self.canvas[rr[ok], cc[ok]] = rgb[ok]

    def _finish(self, summary: dict[str, Any]) -> None:
        from PIL import Image, ImageDraw

        img = Image.fromarray(self.canvas)
        if self.info.roi_outlines:
            draw = ImageDraw.Draw(img)
            width = max(2, round(max(img.size) / 800))
            for k, ring in enumerate(self.info.roi_outlines):
                pts = np.asarray(ring, dtype=np.float64)
                if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 2 or not np.all(np.isfinite(pts)):
                    raise InputError(f"{self._path}: ROI outline {k} must be a (K, 2) array of finite (x, y), "
                                     f"K >= 2; got shape {pts.shape}")
                xy = [(float(x), float(y)) for x, y in pts / self.downsample]
                draw.line([*xy, xy[0]], fill=ROI_OUTLINE, width=width, joint="curve")
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)  # fast: same pixels, a larger file
        assert self._fh is not None
        self._fh.write(buf.getbuffer())
