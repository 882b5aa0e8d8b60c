"""Tissue masks at thumbnail resolution, and the question tile planners ask of them: does this
level-0 box touch tissue?

The automatic rule (:func:`detect_tissue`), on an RGB thumbnail:

1. *Stained*: HSV saturation ``(max - min) / max`` above a threshold: Otsu's threshold of the
   saturation histogram, kept within ``[SAT_FLOOR, SAT_CEIL]`` (the floor keeps glass with a
   faint colour cast out when the slide is mostly glass; the ceiling keeps pale tissue in
   when the slide is mostly tissue and Otsu splits pale from dark stain).
2. *Not glass, not black*: the brightest channel is below ``GLASS_VALUE`` unless the pixel is
   clearly stained, and above ``BLACK_VALUE`` (black pen, debris, folds of dirt).
3. *H&E hue*: hematoxylin and eosin both absorb green, so in H&E green is the weakest
   channel or close to it. Strongly saturated pixels whose green exceeds red by more than
   ``PEN_GREEN_MARGIN`` (green and teal pen), or that are blue with red far below blue
   (``R < PEN_BLUE_RATIO * B``, blue pen) are pen marks, not tissue. Dark blue-purple
   hematoxylin keeps ``R >= 0.45 B`` and is kept. Red pen looks like eosin and is not caught.
4. *Shape*: binary closing (radius ``CLOSE_UM``), then opening (``OPEN_UM``), hole filling,
   and removal of connected pieces smaller than ``MIN_AREA_UM2`` (radii and area in µm when
   the level-0 mpp is known, else in thumbnail px: 2, 1 and 16 px²).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from denuc.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from denuc.source.base import SlideSource

SAT_FLOOR = 0.07
SAT_CEIL = 0.20
GLASS_VALUE = 0.92
BLACK_VALUE = 0.18
PEN_SATURATION = 0.25
PEN_GREEN_MARGIN = 0.04
PEN_BLUE_RATIO = 0.42
CLOSE_UM = 40.0
OPEN_UM = 20.0
MIN_AREA_UM2 = 20_000.0

#: Longest side of the all-tissue mask of :func:`full_mask` (its size does not matter).
_FULL_MASK_SIDE = 256


@dataclass(eq=False)
class TissueMask:
    """Where the tissue is, at thumbnail resolution.

    Attributes:
        mask: ``(h, w)`` bool; pixel ``(i, j)`` (column ``i``, row ``j``) covers level-0
            ``[i*ds, (i+1)*ds) x [j*ds, (j+1)*ds)`` with ``ds = downsample``. The last column
            and row also cover the remainder of the slide (less than ``ds`` px) when the
            slide size is not a multiple of ``ds``.
        downsample: level-0 px per mask px (the same in x and y).
        method: ``"auto"``, ``"none"`` or ``"file:<path>"``.

    Box queries cache a summed-area table of ``mask``: replace the mask rather than editing
    it in place.
    """

    mask: np.ndarray
    downsample: float
    method: str

    def __post_init__(self) -> None:
        m = np.asarray(self.mask)
        if m.ndim != 2 or m.shape[0] < 1 or m.shape[1] < 1:
            raise ValueError(f"tissue mask must be a non-empty (h, w) array; got shape {m.shape}")
        self.mask = m.astype(bool, copy=False)
        self.downsample = float(self.downsample)
        if not self.downsample > 0:
            raise ValueError(f"downsample must be positive; got {self.downsample}")
        self._sat: np.ndarray | None = None

    def edges(self, size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Level-0 pixel edges ``(xe (w+1,), ye (h+1,))`` of the mask columns and rows: column
        ``i`` covers ``[xe[i], xe[i+1])``. With the slide's ``size = (width, height)`` the last
        column/row runs to the slide's edge (it absorbs the remainder strip); without, every
        pixel is ``downsample`` wide."""
        h, w = self.mask.shape
        xe = np.arange(w + 1, dtype=np.float64) * self.downsample
        ye = np.arange(h + 1, dtype=np.float64) * self.downsample
        if size is not None:
            xe[-1], ye[-1] = float(size[0]), float(size[1])
        return xe, ye

    def area_um2(self, mpp: float, size: tuple[int, int] | None = None) -> float:
        """Tissue area in µm²: the level-0 area of the tissue pixels (:meth:`edges`; with
        ``size`` exact, remainder strips included) x ``mpp²``."""
        xe, ye = self.edges(size)
        return float(np.diff(ye) @ (self.mask @ np.diff(xe))) * float(mpp) ** 2

    def contains(self, xy: np.ndarray) -> np.ndarray:
        """``(N, 2)`` level-0 ``(x, y)`` -> ``(N,)`` bool: the point lies in a tissue pixel (the
        last column/row also covers the remainder strip; points left of or above the slide, and
        NaN, are outside)."""
        pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        h, w = self.mask.shape
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(pts).all(axis=1) & (pts[:, 0] >= 0) & (pts[:, 1] >= 0)
            i = np.clip(np.floor(np.where(ok, pts[:, 0], 0) / self.downsample), 0, w - 1).astype(np.int64)
            j = np.clip(np.floor(np.where(ok, pts[:, 1], 0) / self.downsample), 0, h - 1).astype(np.int64)
        return ok & self.mask[j, i]

    def describe(self, mpp: float | None) -> str:
        """How the mask was obtained, in words (for summaries)."""
        h, w = self.mask.shape
        res = f"{self.downsample * mpp:.3g} µm/px" if mpp else f"{self.downsample:.3g} level-0 px per px"
        if self.method == "auto":
            return f"auto mask on a {res} thumbnail ({w} x {h} px)"
        if self.method == "none":
            return "whole image (--tissue none)"
        if self.method.startswith("file:"):
            return f"mask file {self.method[5:]} ({w} x {h} px, {res})"
        return f"{self.method} ({w} x {h} px, {res})"

    def fraction(self) -> float:
        """Fraction of mask pixels that are tissue (0..1)."""
        return float(self.mask.mean())

    def _index_range(self, lo: np.ndarray, hi: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inclusive mask index range ``[i0, i1]`` touched by level-0 ``[lo, hi)`` on an axis of
        ``n`` mask px, and whether the range is non-empty. ``lo``/``hi`` float arrays."""
        ds = self.downsample
        i0 = np.floor(lo / ds)
        i1 = np.ceil(hi / ds) - 1
        # the last mask px absorbs the remainder strip (< ds px); beyond it is outside the slide
        valid = (hi > lo) & (i1 >= 0) & (i0 <= n)
        i0 = np.clip(i0, 0, n - 1).astype(np.int64)
        i1 = np.clip(i1, 0, n - 1).astype(np.int64)
        return i0, i1, valid

    def touches(self, x0: float, y0: float, x1: float, y1: float) -> bool:
        """Whether the level-0 box ``[x0, x1) x [y0, y1)`` overlaps any tissue mask pixel (every
        mask pixel the box covers even partly counts; an empty box touches nothing)."""
        return bool(self.boxes_touching(np.array([[x0, y0, x1, y1]], dtype=np.float64))[0])

    def boxes_touching(self, boxes: np.ndarray) -> np.ndarray:
        """Vectorised :meth:`touches`: ``(K, 4)`` level-0 boxes ``x0, y0, x1, y1`` -> ``(K,)``
        bool. Uses a summed-area table, so 10^5 boxes take milliseconds."""
        b = np.asarray(boxes, dtype=np.float64)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes must be (K, 4) x0, y0, x1, y1; got shape {b.shape}")
        if self._sat is None:
            sat = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.int64)
            np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.int64), axis=1, out=sat[1:, 1:])
            self._sat = sat
        h, w = self.mask.shape
        c0, c1, vx = self._index_range(b[:, 0], b[:, 2], w)
        r0, r1, vy = self._index_range(b[:, 1], b[:, 3], h)
        s = self._sat
        count = s[r1 + 1, c1 + 1] - s[r0, c1 + 1] - s[r1 + 1, c0] + s[r0, c0]
        return vx & vy & (count > 0)


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` in [0, 1] (between-class variance maximised)."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64)
    if p.sum() == 0:
        return 0.0
    p /= p.sum()
    mids = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    m0 = np.cumsum(p * mids)
    mt = m0[-1]
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mt * w0 - m0) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def _dilate(m: np.ndarray, r: float) -> np.ndarray:
    """Binary dilation by a disk of radius ``r`` px (Euclidean distance transform: the cost
    does not grow with ``r``)."""
    from scipy import ndimage

    if not m.any():
        return m.copy()
    return ndimage.distance_transform_edt(~m) <= r


def _erode(m: np.ndarray, r: float) -> np.ndarray:
    """Binary erosion by a disk of radius ``r`` px; the image border is mirrored, not
    background, so tissue running off the thumbnail is not eaten from the edge."""
    from scipy import ndimage

    pad = int(np.ceil(r)) + 1
    mp = np.pad(m, pad, mode="symmetric")
    if mp.all():
        return m.copy()
    return (ndimage.distance_transform_edt(mp) > r)[pad:-pad, pad:-pad]


def detect_tissue(thumb: np.ndarray, downsample: float, mpp: float | None = None) -> TissueMask:
    """Automatic tissue mask of an RGB thumbnail (rule in the module docstring).

    Args:
        thumb: ``(h, w, 3)`` uint8 RGB thumbnail, e.g. from :meth:`SlideSource.thumbnail`.
        downsample: level-0 px per thumbnail px.
        mpp: level-0 µm per pixel; sets the morphology radii and the smallest kept piece in µm
            (without it they are a few thumbnail px).

    Returns:
        A :class:`TissueMask` with ``method="auto"`` and the thumbnail's shape.
    """
    from scipy import ndimage

    rgb = np.asarray(thumb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8 or 0 in rgb.shape[:2]:
        raise ValueError(f"thumbnail must be (h, w, 3) uint8 RGB; got {rgb.shape} {rgb.dtype}")
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    vmax = np.maximum(np.maximum(r, g), b)  # uint8 channel-wise work: fast on 2048^2 thumbnails
    vmin = np.minimum(np.minimum(r, g), b)
    sat = (vmax - vmin).astype(np.float32) / np.maximum(vmax, 1).astype(np.float32)
    not_black = vmax > BLACK_VALUE * 255
    thr = min(max(_otsu(sat[not_black]) if not_black.any() else 0.0, SAT_FLOOR), SAT_CEIL)
    stained = sat > thr
    glass = (vmax >= GLASS_VALUE * 255) & (sat < 2 * thr)
    green_pen = (g.astype(np.int16) - r) > PEN_GREEN_MARGIN * 255
    blue_pen = (b > g) & (b > r) & (r < PEN_BLUE_RATIO * b.astype(np.float32))
    pen = (sat > PEN_SATURATION) & (green_pen | blue_pen)
    mask = stained & not_black & ~glass & ~pen

    px_um = downsample * mpp if mpp else None
    close_r = max(1.0, CLOSE_UM / px_um) if px_um else 2.0
    open_r = max(1.0, OPEN_UM / px_um) if px_um else 1.0
    min_px = min(MIN_AREA_UM2 / (px_um * px_um) if px_um else 16.0, mask.size / 16)
    if mask.any():
        # work on the bounding box of the candidates plus a margin that the morphology cannot
        # cross (the same result as on the whole thumbnail, much faster on mostly-glass slides)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        margin = int(np.ceil(2 * close_r + 2 * open_r)) + 2
        r0, r1 = max(0, rows[0] - margin), min(mask.shape[0], rows[-1] + 1 + margin)
        c0, c1 = max(0, cols[0] - margin), min(mask.shape[1], cols[-1] + 1 + margin)
        m = mask[r0:r1, c0:c1]
        m = _erode(_dilate(m, close_r), close_r)  # closing: joins stain speckle into tissue
        m = _dilate(_erode(m, open_r), open_r)  # opening: drops thin lines and specks
        m = ndimage.binary_fill_holes(m)
        labels, n = ndimage.label(m)
        if n:
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            keep = sizes >= min_px
            keep[0] = False
            m = keep[labels]
        mask = np.zeros_like(mask)
        mask[r0:r1, c0:c1] = m
    return TissueMask(mask=mask, downsample=float(downsample), method="auto")


def full_mask(source: SlideSource) -> TissueMask:
    """``--tissue none``: every pixel of the slide counts as tissue."""
    from denuc.source.base import thumbnail_geometry

    ds, (w, h) = thumbnail_geometry(source.dimensions, _FULL_MASK_SIDE)
    return TissueMask(mask=np.ones((h, w), dtype=bool), downsample=ds, method="none")


def auto_mask(source: SlideSource, max_side: int = 2048) -> TissueMask:
    """``--tissue auto``: :func:`detect_tissue` on the source's thumbnail."""
    thumb, ds = source.thumbnail(max_side)
    return detect_tissue(thumb, ds, source.mpp)


def load_tissue_mask(path: str | os.PathLike[str], source: SlideSource) -> TissueMask:
    """A user's tissue mask image (nonzero = tissue) for ``source``.

    The mask may have any size whose aspect ratio matches the slide's within 1 %; its own
    downsample (slide width / mask width, averaged with the heights' ratio) maps it to level 0.
    Colour masks count a pixel as tissue when any channel is nonzero (and alpha, if present,
    too). Raises :class:`InputError` naming the file when it is missing, unreadable or of the
    wrong aspect ratio; an all-empty mask only warns.
    """
    from PIL import Image, UnidentifiedImageError

    from denuc.data.image import _pillow_image, _pillow_warnings, describe_exception

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such tissue mask file")
    img_mod = _pillow_image()
    try:
        with _pillow_warnings(p):
            im = img_mod.open(p)
        with im:
            im.load()
            if im.mode in ("1", "L", "I", "I;16", "I;16B", "I;16L", "F"):
                a = np.asarray(im)
                tissue = a != 0
            else:
                rgba = np.asarray(im.convert("RGBA"))
                tissue = rgba[..., :3].any(axis=2) & (rgba[..., 3] > 0)
    except UnidentifiedImageError:
        raise InputError(f"{p}: tissue mask is not a readable image") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{p}: cannot read tissue mask ({describe_exception(e)})") from None
    if tissue.ndim != 2:
        raise InputError(f"{p}: tissue mask must be a single 2-D image; got shape {tissue.shape}")
    mh, mw = tissue.shape
    sw, sh = source.dimensions
    dx, dy = sw / mw, sh / mh
    if abs(dx - dy) > 0.01 * max(dx, dy):
        raise InputError(f"{p}: tissue mask is {mw} x {mh} px, aspect ratio {mw / mh:.4f}, but the slide is "
                         f"{sw} x {sh} px ({sw / sh:.4f}); they must match within 1 %")
    if not tissue.any():
        warnings.warn(f"{p}: tissue mask is empty (no nonzero pixel): nothing will be processed", stacklevel=2)
    return TissueMask(mask=tissue, downsample=(dx + dy) / 2.0, method=f"file:{p}")


#: ``--tissue`` methods: name -> ``builder(source) -> TissueMask``. A path (or ``file:<path>``)
#: is handled by :func:`tissue_mask` through :func:`load_tissue_mask`.
TISSUE_METHODS: dict[str, Callable[[SlideSource], TissueMask]] = {"auto": auto_mask, "none": full_mask}


def tissue_mask(spec: str, source: SlideSource) -> TissueMask:
    """The tissue mask for a ``--tissue`` value: a name in :data:`TISSUE_METHODS`, or
    ``file:<path>`` / a path to a mask image."""
    if spec in TISSUE_METHODS:
        return TISSUE_METHODS[spec](source)
    path = spec[5:] if spec.startswith("file:") else spec
    if spec.startswith("file:") or Path(path).suffix:
        return load_tissue_mask(path, source)
    raise InputError(f"--tissue {spec!r}: not one of {', '.join(TISSUE_METHODS)} nor a mask image path")
