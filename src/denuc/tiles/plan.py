"""The tile plan: which regions of a source are processed, and who owns each point.

Frames. A stage works at its own mpp (the detector's, the encoder's) on a *working frame*:
the source's pyramid level ``L`` (the coarsest one no coarser than the stage's mpp) resampled
by ``f = level_mpp / work_mpp`` (:mod:`denuc.tiles.resample`), so working pixel ``u`` and
level-0 pixel ``x`` relate by ``x = u * work_mpp / mpp0`` (pixel-edge frame, (x, y) order).

Ownership. Along each axis of the detector's working frame (length ``n``), detector windows
sit on one global lattice (origins ``0, s, 2s, ...`` and one last window flush with the end,
exactly :func:`denuc.merge.tiling.window_origins`), and window ``j`` keeps points in
``[j s + m, j s + w - m)`` (margin ``m``). Tile cores are cells of ``c`` strides:
``[m + k c s, m + (k+1) c s)``, the first one starting at 0 and the last one running to ``n``,
so every point has exactly one owner. A tile reads the windows ``k c - 1 .. (k+1) c`` (one
window of context on each side, clipped to the frame): inside it, window origins, the margin
rule and NMS neighbourhoods of the core's points are those of one whole-image pass, so a
point in the core comes out as the whole-image pass gives it (NMS chains longer than a
stride aside). The encoder's windows likewise sit on the encoder frame's global lattice
(:meth:`TilePlan.encoder_crop`).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from denuc.data.resample import resample_factor, resampled_size
from denuc.errors import InputError
from denuc.merge.tiling import window_origins


@dataclass(frozen=True)
class AxisPlan:
    """Tile cells along one axis of the detector's working frame.

    Attributes:
        length: frame length (px at the detector's mpp).
        window, stride: detector window side and step (px).
        margin: the detector's inner margin (px).
        cells: core size in strides.
    """

    length: int
    window: int
    stride: int
    margin: float
    cells: int

    @property
    def core(self) -> int:
        return self.cells * self.stride

    @property
    def count(self) -> int:
        """Number of cells (at least 1)."""
        return 1 + max(0, math.ceil((self.length - self.margin) / self.core) - 1)

    def bounds(self, k: int) -> tuple[float, float]:
        """Half-open core ``[a, b)`` of cell ``k`` (the first starts at 0, the last ends at ``length``)."""
        a = 0.0 if k == 0 else self.margin + k * self.core
        b = float(self.length) if k == self.count - 1 else self.margin + (k + 1) * self.core
        return a, b

    def read_range(self, k: int) -> tuple[int, int]:
        """Half-open working-frame range ``[start, end)`` tile ``k`` reads (its windows)."""
        start = max(0, (k * self.cells - 1) * self.stride)
        end = self.length if k == self.count - 1 else min(self.length, (k + 1) * self.cells * self.stride + self.window)
        if end == self.length:  # a range reaching the end holds the frame's last window, flush with it
            start = min(start, max(0, self.length - self.window))
        return start, end


@dataclass(frozen=True)
class Frame:
    """A stage's working frame over a source level.

    Attributes:
        level: source pyramid level read.
        factor: working px per level px.
        size: (width, height) of the frame in working px.
        mpp: the stage's working µm per pixel.
        to_level0: level-0 px per working px (``mpp / mpp0``).
    """

    level: int
    factor: float
    size: tuple[int, int]
    mpp: float
    to_level0: float
    level_size: tuple[int, int]


def make_frame(level_dimensions: tuple[tuple[int, int], ...], level_downsamples: tuple[float, ...], mpp0: float,
               work_mpp: float) -> Frame:
    """The working frame of a stage at ``work_mpp`` over the coarsest level no coarser than it."""
    level = 0
    for i, ds in enumerate(level_downsamples):
        if mpp0 * ds <= work_mpp * 1.001:
            level = i
    w, h = level_dimensions[level]
    f = resample_factor(mpp0 * level_downsamples[level], work_mpp)
    hh, ww = resampled_size((h, w), f)
    return Frame(level, f, (ww, hh), work_mpp, work_mpp / mpp0, (w, h))


@dataclass(frozen=True)
class Tile:
    """One tile: its cell ``(kx, ky)``, core in detector working px (x0, y0, x1, y1; half-open)
    and read box in detector working px."""

    index: int
    kx: int
    ky: int
    core: tuple[float, float, float, float]
    read: tuple[int, int, int, int]


@dataclass
class TilePlan:
    """All tiles of a source and the ones selected for processing.

    Attributes:
        det: the detector's working frame; ``enc``: the encoder's (None for detection only).
        xs, ys: :class:`AxisPlan` of the detector frame.
        selected: indices of the tiles to process (row-major order), after tissue / ROI filters.
        enc_window, enc_stride: encoder window side and step (px at the encoder's mpp).
    """

    det: Frame
    xs: AxisPlan
    ys: AxisPlan
    enc: Frame | None = None
    enc_window: int = 0
    enc_stride: int = 0
    selected: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    _enc_origins: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def count(self) -> int:
        return self.xs.count * self.ys.count

    def tile(self, index: int) -> Tile:
        ky, kx = divmod(index, self.xs.count)
        ax, bx = self.xs.bounds(kx)
        ay, by = self.ys.bounds(ky)
        rx, ry = self.xs.read_range(kx), self.ys.read_range(ky)
        return Tile(index, kx, ky, (ax, ay, bx, by), (rx[0], ry[0], rx[1], ry[1]))

    def core_boxes_level0(self) -> np.ndarray:
        """``(count, 4)`` level-0 cores (x0, y0, x1, y1) of every tile, row-major."""
        t = self.det.to_level0
        xb = np.array([self.xs.bounds(k) for k in range(self.xs.count)]) * t
        yb = np.array([self.ys.bounds(k) for k in range(self.ys.count)]) * t
        yy, xx = np.meshgrid(np.arange(self.ys.count), np.arange(self.xs.count), indexing="ij")
        xx, yy = xx.ravel(), yy.ravel()
        return np.stack([xb[xx, 0], yb[yy, 0], xb[xx, 1], yb[yy, 1]], axis=1)

    def encoder_origins(self) -> tuple[np.ndarray, np.ndarray]:
        """Global window origins (x, y) of the encoder frame (``window_origins`` of its size;
        a frame smaller than a window has one window at 0, padded white)."""
        assert self.enc is not None
        if self._enc_origins is None:  # computed once per plan, asked for every tile
            w, h = self.enc.size
            self._enc_origins = (window_origins(max(w, self.enc_window), self.enc_window, self.enc_stride),
                                 window_origins(max(h, self.enc_window), self.enc_window, self.enc_stride))
        return self._enc_origins

    def key(self) -> str:
        """Hash of everything that decides which points come out of which tile (for resume)."""
        d = {"det": self.det.__dict__, "xs": self.xs.__dict__, "ys": self.ys.__dict__,
             "enc": None if self.enc is None else self.enc.__dict__, "enc_window": self.enc_window,
             "enc_stride": self.enc_stride, "selected": self.selected, "info": self.info}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:32]


def make_plan(level_dimensions: tuple[tuple[int, int], ...], level_downsamples: tuple[float, ...], mpp0: float, *,
              det_mpp: float, det_window: int, det_stride: int, det_margin: float, tile_px: int = 2048,
              enc_mpp: float | None = None, enc_window: int = 0, enc_stride: int = 0,
              max_work_pixels: int | None = None, name: str = "source") -> TilePlan:
    """Plan the tiles of a source.

    Args:
        level_dimensions / level_downsamples / mpp0: the source's pyramid (level 0 first).
        det_mpp, det_window, det_stride, det_margin: the detector's working mpp and window geometry.
        tile_px: about the core side of a tile in detector working px (rounded to whole strides).
        enc_mpp, enc_window, enc_stride: the encoder's (None: detection only).
        max_work_pixels: refuse a detector frame larger than this (None: no bound).

    Raises:
        InputError: the window geometry cannot tile (``stride != window - 2 * margin``).
    """
    if det_stride > det_window - 2 * det_margin + 1e-9:
        raise InputError(f"detector windows must overlap by twice the margin to tile (window {det_window}, "
                         f"stride {det_stride}, margin {det_margin:g})")
    det = make_frame(level_dimensions, level_downsamples, mpp0, det_mpp)
    if max_work_pixels is not None and det.size[0] * det.size[1] > max_work_pixels * 4096:
        raise InputError(f"{name}: {det.size[0]} x {det.size[1]} px at the detector's {det_mpp:g} µm/px is too large")
    cells = max(1, round(tile_px / det_stride))
    xs = AxisPlan(det.size[0], det_window, det_stride, det_margin, cells)
    ys = AxisPlan(det.size[1], det_window, det_stride, det_margin, cells)
    enc = make_frame(level_dimensions, level_downsamples, mpp0, enc_mpp) if enc_mpp else None
    plan = TilePlan(det, xs, ys, enc, int(enc_window), int(enc_stride))
    plan.selected = list(range(plan.count))
    return plan
