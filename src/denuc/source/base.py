"""Pixel sources with pyramid levels and a level-0 resolution: one interface for whole-slide
images, plain image files and in-memory arrays.

Frames and units used throughout :mod:`denuc.source`:

* Coordinates are ``(x, y)`` = (column, row) in pixels, origin at the top-left edge of the
  image (pixel-edge frame: pixel ``(i, j)`` covers ``[i, i+1) x [j, j+1)``, centre
  ``(i + 0.5, j + 0.5)``).
* *Level-0 pixels* are pixels of the finest level. :meth:`SlideSource.read` takes the
  coordinates of the level it reads; level ``k`` pixel ``x`` starts at level-0
  ``x * level_downsamples[k]``.
* ``mpp`` is µm per pixel (isotropic) of level 0; level ``k`` has ``mpp * level_downsamples[k]``.

:func:`denuc.source.opening.open_source` picks the source class: arrays ->
:class:`~denuc.source.array.ArraySource`, plain images -> :class:`~denuc.source.array.ImageSource`,
slides -> the first of :data:`~denuc.source.opening.SOURCE_BACKENDS` that opens the file
(OpenSlide, then tiffslide).
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from denuc.core.mpp import MPP_MAX, MPP_MIN, check_mpp
from denuc.errors import DenucError, InputError, MissingMppError, ResolutionError

#: File extensions of whole-slide images. ``.tif``/``.tiff`` files are slides only when their
#: content says so (tiled with several levels, OME-XML, a scanner's description), see
#: :func:`is_slide_path`; every other suffix here is a slide by name alone.
SLIDE_SUFFIXES: tuple[str, ...] = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu",
                                   ".svslide", ".dcm")

#: Suffixes shared with plain images: the file's content decides.
_AMBIGUOUS_SUFFIXES = (".tif", ".tiff")

#: Relative difference between x and y µm per pixel above which pixels count as anisotropic.
ANISOTROPY_TOLERANCE = 0.01

#: ``best_level`` accepts a level whose mpp exceeds the target by at most this factor (rounding
#: in the file's resolution tags and level sizes).
LEVEL_MPP_SLACK = 1.001

#: Largest number of pixels :meth:`SlideSource.thumbnail` reads in one piece.
_THUMB_CHUNK_PX = 2**25


class BackendDeclined(Exception):
    """Raised by a :data:`SOURCE_BACKENDS` opener that cannot read a file, so that the next one
    is tried. The message says why (one line)."""


class SlideSource(ABC):
    """A pyramid of RGB pixel levels with a known level-0 µm per pixel.

    Attributes:
        name: stem of the file, or the given name for arrays.
        path: the file or folder read, ``None`` for arrays.
        backend: ``"openslide"``, ``"tiffslide"``, ``"image"`` or ``"array"``.
        mpp: level-0 µm per pixel (isotropic, checked by :func:`denuc.core.mpp.check_mpp`).
        mpp_source: where :attr:`mpp` came from, e.g. ``"openslide.mpp-x/mpp-y"``, ``"--mpp"``.
        level_dimensions: ``(width, height)`` per level, level 0 first.
        level_downsamples: level-0 px per level px, ``1.0`` for level 0.

    Sources are context managers (``close()`` on exit) and :meth:`read` is safe to call from
    several threads at once.
    """

    name: str
    path: Path | None
    backend: str
    mpp: float
    mpp_source: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]

    # ------------------------------------------------------------------ geometry
    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """``(width, height)`` of level 0 in pixels."""
        return self.level_dimensions[0]

    def level_mpp(self, level: int) -> float:
        """µm per pixel of ``level``: ``mpp * level_downsamples[level]``."""
        return self.mpp * self.level_downsamples[self._check_level(level)]

    def best_level(self, target_mpp: float) -> int:
        """The coarsest level whose µm per pixel is at most ``target_mpp`` (within
        :data:`LEVEL_MPP_SLACK`), i.e. never coarser than the target; level 0 when no level
        qualifies (the target is finer than level 0)."""
        ok = [k for k in range(self.level_count) if self.level_mpp(k) <= float(target_mpp) * LEVEL_MPP_SLACK]
        return max(ok, key=lambda k: self.level_downsamples[k], default=0)

    def _check_level(self, level: int) -> int:
        if isinstance(level, bool) or not isinstance(level, (int, np.integer)) or not 0 <= level < self.level_count:
            raise ValueError(f"{self.name}: level {level!r} does not exist; levels 0..{self.level_count - 1}")
        return int(level)

    # ------------------------------------------------------------------ pixels
    def read(self, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """Pixels of the ``w`` x ``h`` region at ``(x, y)`` of ``level`` as ``(h, w, 3)`` uint8 RGB.

        ``(x, y)`` is the top-left corner in pixels *of that level* (not level 0); ``w`` and
        ``h`` are in that level's pixels. The region may extend past the level's bounds (or
        start at negative coordinates): that part is white (255). Transparent pixels (e.g.
        outside the scanned area of an MRXS slide) are composited onto white. Safe to call
        from several threads at once. A read the backend fails at (a corrupt tile) raises
        :class:`InputError` naming the file.
        """
        level = self._check_level(level)
        x, y, w, h = (_as_int(v, n) for v, n in ((x, "x"), (y, "y"), (w, "w"), (h, "h")))
        if w < 0 or h < 0:
            raise ValueError(f"{self.name}: region size must not be negative; got w={w}, h={h}")
        out = np.full((h, w, 3), 255, dtype=np.uint8)
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x1 <= x0 or y1 <= y0:
            return out
        try:
            part = self._read_region(x0, y0, x1 - x0, y1 - y0, level)
        except DenucError:
            raise
        except MemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - decoder/backends raise many types
            from denuc.data.image import describe_exception

            raise InputError(f"{self._where()}: cannot read region x={x0}, y={y0}, {x1 - x0} x {y1 - y0} px at "
                             f"level {level} ({describe_exception(e)})") from None
        out[y0 - y:y1 - y, x0 - x:x1 - x] = part
        return out

    @abstractmethod
    def _read_region(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        """``(h, w, 3)`` uint8 RGB of a region lying wholly inside ``level`` (level coordinates,
        ``w, h >= 1``), transparency already composited onto white."""

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """An RGB thumbnail and its downsample (level-0 px per thumbnail px).

        The downsample ``ds`` is ``max(width, height) / max_side`` (at least 1: never
        upsampled) and the size is ``floor(dimension / ds)`` per axis (at least 1 px), so both
        axes share ``ds``: thumbnail pixel ``(i, j)`` covers level-0
        ``[i*ds, (i+1)*ds) x [j*ds, (j+1)*ds)``. Pixels are area averages read from the
        coarsest level at least as fine as the thumbnail, a band at a time (memory stays
        bounded; level 0 of a big slide is never read whole).

        Returns:
            ``(thumb, ds)``: ``(h, w, 3)`` uint8 and the downsample (float).
        """
        from PIL import Image

        if isinstance(max_side, bool) or int(max_side) != max_side or max_side < 1:
            raise ValueError(f"max_side must be a positive whole number of pixels; got {max_side!r}")
        ds, (tw, th) = thumbnail_geometry(self.dimensions, int(max_side))
        level = max((k for k in range(self.level_count) if self.level_downsamples[k] <= ds * LEVEL_MPP_SLACK),
                    key=lambda k: self.level_downsamples[k], default=0)
        lw, lh = self.level_dimensions[level]
        # scale from level px to thumbnail px per axis (level sizes are rounded, so use both axes)
        fx = ds * lw / self.dimensions[0]
        fy = ds * lh / self.dimensions[1]
        if abs(fx - 1.0) < 1e-9 and abs(fy - 1.0) < 1e-9 and (tw, th) == (lw, lh):
            return self.read(0, 0, lw, lh, level), ds
        rows = max(1, min(th, int(_THUMB_CHUNK_PX / max(1.0, lw * fy))))
        out = np.empty((th, tw, 3), dtype=np.uint8)
        for r0 in range(0, th, rows):
            r1 = min(th, r0 + rows)
            top, bottom = r0 * fy, r1 * fy
            ry0, ry1 = int(math.floor(top)), min(lh, int(math.ceil(bottom)))
            band = self.read(0, ry0, lw, max(1, ry1 - ry0), level)
            im = Image.fromarray(band).resize((tw, r1 - r0), Image.Resampling.BOX,
                                              box=(0.0, top - ry0, tw * fx, bottom - ry0))
            out[r0:r1] = np.asarray(im)
        return out, ds

    # ------------------------------------------------------------------ bookkeeping
    def close(self) -> None:
        """Release file handles. Reading afterwards is an error."""

    def __enter__(self) -> SlideSource:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        """Plain-JSON summary: name, path, backend, mpp, mpp_source, levels."""
        return {"name": self.name, "path": str(self.path) if self.path is not None else None,
                "backend": self.backend, "mpp": self.mpp, "mpp_source": self.mpp_source,
                "level_dimensions": [list(d) for d in self.level_dimensions],
                "level_downsamples": list(self.level_downsamples)}

    def __repr__(self) -> str:
        w, h = self.dimensions
        return (f"{type(self).__name__}({self.name!r}, {w} x {h} px, {self.level_count} level(s), "
                f"mpp={self.mpp:g} from {self.mpp_source}, backend={self.backend!r})")

    def _where(self) -> str:
        return str(self.path) if self.path is not None else self.name


def _as_int(v: object, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            return int(v)
        raise ValueError(f"{what} must be a whole number of pixels; got {v!r}")
    return int(v)


def thumbnail_geometry(size: tuple[int, int], max_side: int) -> tuple[float, tuple[int, int]]:
    """``(ds, (w, h))`` of a thumbnail of an image of ``size = (width, height)`` level-0 px
    whose longest side is at most ``max_side``: ``ds = max(1, max(size) / max_side)``,
    ``w = max(1, floor(width / ds))`` and likewise ``h``."""
    width, height = int(size[0]), int(size[1])
    ds = max(1.0, max(width, height) / float(max_side))
    tw = max(1, min(max_side, int(math.floor(width / ds + 1e-9))))
    th = max(1, min(max_side, int(math.floor(height / ds + 1e-9))))
    return ds, (tw, th)


def composite_on_white(a: np.ndarray) -> np.ndarray:
    """``(h, w, 3)`` uint8 RGB from uint8 ``(h, w)``, ``(h, w, 1..4)`` pixels: gray replicated,
    alpha (non-premultiplied) composited onto white. No warnings (used for tiles)."""
    if a.ndim == 2:
        a = a[:, :, None]
    c = a.shape[2]
    if c in (2, 4):
        rgb = a[:, :, :c - 1].astype(np.uint16)
        al = a[:, :, c - 1:].astype(np.uint16)
        if al.min() < 255:
            a = ((rgb * al + 255 * (255 - al) + 127) // 255).astype(np.uint8)
        else:
            a = a[:, :, :c - 1]
        c -= 1
    if c == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a, dtype=np.uint8)


# ---------------------------------------------------------------------- mpp from metadata
def resolve_mpp(where: str, override: float | None, found: tuple[float, float, str] | None,
                why_missing: str = "") -> tuple[float, str]:
    """``(mpp, mpp_source)`` from the ``--mpp`` override or from metadata.

    Args:
        where: the file, for messages.
        override: the user's value; wins over metadata (source ``"--mpp"``).
        found: ``(mpp_x, mpp_y, source)`` read from the file's metadata, or ``None``.
        why_missing: appended to the "no µm per pixel" error (e.g. tags that were not trusted).

    Raises:
        ResolutionError: no mpp anywhere, an implausible value, or x and y differing by more
            than :data:`ANISOTROPY_TOLERANCE`.
    """
    if override is not None:
        return check_mpp(override, f"{where}: --mpp"), "--mpp"
    if found is None:
        extra = f" ({why_missing})" if why_missing else ""
        raise MissingMppError(f"{where}: no µm per pixel in the file's metadata{extra}; pass --mpp "
                              "(Python: mpp=...), e.g. --mpp 0.25 for a 40x scan")
    mx, my, src = found
    for v in (mx, my):
        if not (math.isfinite(v) and MPP_MIN <= v <= MPP_MAX):
            raise ResolutionError(f"{where}: the file's metadata gives {v:g} µm/px ({src}), outside the plausible "
                                  f"range [{MPP_MIN:g}, {MPP_MAX:g}]; pass the right value with --mpp (Python: mpp=...)")
    if abs(mx - my) > ANISOTROPY_TOLERANCE * min(mx, my):
        raise ResolutionError(f"{where}: pixels are not square: {mx:g} µm/px in x but {my:g} µm/px in y "
                              f"({src}); DeNuC needs isotropic pixels (resample the slide, or pass --mpp to "
                              "override)")
    return (mx + my) / 2.0, src


# ---------------------------------------------------------------------- slide detection
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _is_tiff_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def tiff_slide_kind(path: str | os.PathLike[str]) -> str:
    """Why a TIFF file is a slide, or ``""`` when it is a plain image (or not a readable TIFF).

    Reads the TIFF header and page chain only (no pixels). A TIFF is a slide when it holds
    OME-XML, an Aperio/Philips/Leica/Hamamatsu/Ventana description, when its first page is
    tiled and there is more than one page or level (pyramid; or the tiled file is damaged,
    so that the slide readers report how), or when its first page is larger than
    :data:`denuc.data.image.MAX_IMAGE_PIXELS` (too big to read whole).
    """
    from denuc.data.image import MAX_IMAGE_PIXELS, quiet_tifffile
    from denuc.source.tiffmeta import truncation

    p = Path(path)
    try:
        import tifffile

        with quiet_tifffile() as notes, tifffile.TiffFile(p) as tf:
            for flag in ("ome", "svs", "philips", "scn", "ndpi", "bif"):
                if getattr(tf, f"is_{flag}", False):
                    return flag
            page: Any = tf.pages.first
            if int(page.imagewidth) * int(page.imagelength) > MAX_IMAGE_PIXELS:
                return "large"  # too big to read whole: a slide reader reads it region by region
            if not page.is_tiled:
                return ""
            if len(tf.pages) > 1 or page.subifds:
                return "tiled pyramid"
            if truncation(tf, p.stat().st_size) or any("invalid page" in n for n in notes):
                return "damaged tiled TIFF"  # the slide readers report the damage
    except Exception:  # noqa: BLE001 - not a TIFF tifffile can parse: a plain image path decides
        return ""
    return ""


def is_slide_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a whole-slide image (cheap: reads at most a TIFF header).

    True for a folder holding ``.dcm`` files (DICOM slide), a file whose suffix is in
    :data:`SLIDE_SUFFIXES` other than ``.tif``/``.tiff``, an ``.ome.tif(f)`` file, and a TIFF
    (any suffix but the plain-image ones) that :func:`tiff_slide_kind` finds to be a slide.
    """
    p = Path(path)
    if p.is_dir():
        return any(q.suffix.lower() == ".dcm" for q in p.iterdir())
    name = p.name.lower()
    suffix = p.suffix.lower()
    if name.endswith((".ome.tif", ".ome.tiff")):
        return True
    if suffix in SLIDE_SUFFIXES and suffix not in _AMBIGUOUS_SUFFIXES:
        return True
    if suffix in (".png", ".jpg", ".jpeg", ".bmp") or not p.is_file() or not _is_tiff_file(p):
        return False
    return bool(tiff_slide_kind(p))
