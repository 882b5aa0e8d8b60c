"""``<stem>.overlay.png``: the input's thumbnail with every nucleus ringed in its class colour,
the analysed area outlined, and a legend with the count of each class.

The canvas is ``OutputInfo.thumbnail`` (``thumb_downsample`` level-0 px per canvas px; the
pipeline gives a slide's thumbnail, or an image itself downscaled to at most
:data:`MAX_SIDE` px, see :func:`thumbnail_of`), or a white canvas of that size when there is
none. The tissue mask's boundary is drawn (black) when a mask is given; each nucleus is drawn
as it comes as a ring around canvas pixel (floor(x / ds), floor(y / ds)) of its level-0
(x, y), leaving the pixels inside (the nucleus) as they were, with a radius of about a
nucleus (:func:`ring_radius`); where rings overlap the last drawn wins. At the end the ROI
outlines, holes included, are drawn on top (yellow), and a legend strip is added below the
picture (the picture keeps its size and geometry above it): each class's ring colour and
count, unclassified nuclei, the tissue outline and the ROIs. The PNG is written atomically.
Memory: the canvas and one counter per class, whatever the number of nuclei.
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
#: a nucleus's radius in µm, which the rings go around (the ring's radius in canvas px is this
#: plus one px, kept within [RING_MIN, RING_MAX] px)
NUCLEUS_UM = 4.0
RING_MIN, RING_MAX = 2, 8


def ring_radius(downsample: float, mpp: float) -> int:
    """Ring radius in canvas px for a canvas of ``downsample`` level-0 px per px at ``mpp``."""
    r = NUCLEUS_UM / (downsample * mpp)
    return int(min(RING_MAX, max(RING_MIN, round(r) + 1)))


def ring_offsets(r: int) -> tuple[np.ndarray, np.ndarray]:
    """``(dy, dx)`` of the pixels one px wide at distance ``r`` from a centre pixel."""
    dy, dx = np.mgrid[-r - 1:r + 2, -r - 1:r + 2]
    d = np.hypot(dx, dy)
    on = (d >= r - 0.5) & (d < r + 0.5)
    return dy[on], dx[on]


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
        #: ring radius in canvas px (about a nucleus's radius plus a px)
        self.radius = ring_radius(self.downsample, info.mpp)
        self._ring = ring_offsets(self.radius)
        self._counts = np.zeros(len(info.class_names) + 1, dtype=np.int64)  # last: unclassified
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
        k = np.where(ids < 0, len(self._lut) - 1, ids)
        self._counts += np.bincount(k, minlength=len(self._counts))
        rgb = self._lut[k]
        for dy, dx in zip(*self._ring, strict=True):
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
        img = self._with_legend(img)
        buf = io.BytesIO()
        img.save(buf, format="PNG", compress_level=1)  # fast: same pixels, a larger file
        assert self._fh is not None
        self._fh.write(buf.getbuffer())

    def legend_entries(self) -> list[tuple[str, RGB, str]]:
        """``(label, colour, mark)`` rows of the legend; mark ``ring`` or ``line``."""
        i = self.info
        rows = [(f"{c}: {int(n):,}", tuple(int(v) for v in self._lut[k]), "ring")
                for k, (c, n) in enumerate(zip(i.class_names, self._counts[:-1], strict=True))]
        if self._counts[-1]:
            rows.append((f"unclassified: {int(self._counts[-1]):,}", UNCLASSIFIED, "ring"))
        if i.tissue_mask is not None:
            rows.append(("tissue outline", TISSUE_OUTLINE, "line"))
        if i.roi_outlines:
            rows.append(("regions of interest (and holes)", ROI_OUTLINE, "line"))
        return rows  # type: ignore[return-value]

    def _with_legend(self, img: Any) -> Any:
        """``img`` with a white legend strip below it (wider than ``img`` only when the text needs)."""
        from PIL import Image, ImageDraw, ImageFont

        rows = self.legend_entries()
        w, h = img.size
        size = int(min(28, max(11, round(max(w, h) / 70))))
        try:
            font = ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1: one bitmap size
            font = ImageFont.load_default()
        probe = ImageDraw.Draw(img)
        line = size + size // 2
        pad = size // 2
        mark = 2 * size
        text_w = max((probe.textlength(t, font=font) for t, _, _ in rows), default=0)
        out_w = max(w, int(pad * 3 + mark + text_w) + 1)
        out = Image.new("RGB", (out_w, h + pad * 2 + line * len(rows)), (255, 255, 255))
        out.paste(img, (0, 0))
        draw = ImageDraw.Draw(out)
        for k, (text, colour, kind) in enumerate(rows):
            y = h + pad + k * line
            cy = y + line // 2
            if kind == "ring":
                r = max(3, size // 3)
                draw.ellipse([pad + mark // 2 - r, cy - r, pad + mark // 2 + r, cy + r], outline=colour,
                             width=max(2, r // 3))
            else:
                draw.line([pad, cy, pad + mark, cy], fill=colour, width=max(2, size // 6))
            draw.text((pad * 2 + mark, y + (line - size) // 2), text, fill=(0, 0, 0), font=font)
        return out
