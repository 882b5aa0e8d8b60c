"""Synthetic whole-slide files for tests and benchmarks: tiled pyramidal TIFFs written with
tifffile in three flavours that the slide readers recognise.

* ``"aperio"``: an Aperio-style SVS layout (tiled level 0 with an ``Aperio Image Library``
  description holding ``MPP = <mpp>``, a stripped thumbnail page, then the tiled levels), read
  by OpenSlide as vendor ``aperio`` with ``openslide.mpp-x`` and by tiffslide as ``aperio``.
* ``"generic"``: tiled pages (reduced levels flagged as such) with ``XResolution``/
  ``YResolution`` in pixels per centimeter; OpenSlide's ``generic-tiff``.
* ``"ome"``: OME-TIFF with the levels in SubIFDs and ``PhysicalSizeX/Y`` in µm; read by
  tiffslide (OpenSlide does not read OME pyramids).

``mpp=None`` writes no resolution metadata at all. Level ``k`` with downsample ``d`` (a whole
number) is ``floor(W / d) x floor(H / d)`` px; its pixel ``(i, j)`` is the rounded mean of the
level-0 block ``[i*d, (i+1)*d) x [j*d, (j+1)*d)``. ``compression="none"`` stores pixels
losslessly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from denuc.core.files import atomic_target

#: File layouts :func:`write_pyramidal_tiff` writes.
FLAVORS = ("aperio", "generic", "ome")

#: ``tile_fn(x, y, w, h)`` -> ``(h, w, 3)`` uint8 RGB of the level-0 region with top-left
#: ``(x, y)``, or a ``(1, 1, 3)`` array when the whole region is that one colour (glass).
TileFn = Callable[[int, int, int, int], np.ndarray]

#: Longest side (level-0 px) of one ``tile_fn`` request when building reduced levels.
_CHUNK = 2048

#: Longest side of the Aperio thumbnail page.
_THUMB_SIDE = 768


def write_pyramidal_tiff(path: str | os.PathLike[str], image: np.ndarray, mpp: float | None, *, tile: int = 256,
                         downsamples: Sequence[int] = (1, 4, 16), compression: str = "jpeg", quality: int = 90,
                         flavor: str = "aperio") -> Path:
    """Write the ``(H, W, 3)`` uint8 RGB ``image`` as a tiled pyramidal TIFF (see the module
    docstring for the flavours).

    Args:
        path: output file (written atomically; parent folders are created).
        mpp: level-0 µm per pixel to record, or ``None`` for no resolution metadata.
        tile: tile side in px (a multiple of 16).
        downsamples: whole-number level downsamples, the first 1, increasing.
        compression: ``"jpeg"`` (at ``quality``), ``"none"`` (lossless), or another tifffile
            codec name (``"deflate"``, ``"lzw"``, ``"jpeg2000"``, ...).
        flavor: ``"aperio"``, ``"generic"`` or ``"ome"``.
    """
    rgb = np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8; got {rgb.shape} {rgb.dtype}")

    def tile_fn(x: int, y: int, w: int, h: int) -> np.ndarray:
        return rgb[y:y + h, x:x + w]

    return write_pyramidal_tiff_tiles(path, (rgb.shape[1], rgb.shape[0]), tile_fn, mpp, tile=tile,
                                      downsamples=downsamples, compression=compression, quality=quality,
                                      flavor=flavor)


def write_pyramidal_tiff_tiles(path: str | os.PathLike[str], size: tuple[int, int], tile_fn: TileFn,
                               mpp: float | None, *, tile: int = 256, downsamples: Sequence[int] = (1, 4, 16),
                               compression: str = "jpeg", quality: int = 90, flavor: str = "aperio") -> Path:
    """Like :func:`write_pyramidal_tiff`, but the pixels come from ``tile_fn`` one region at a
    time, so a 100,000 x 100,000 px slide is written without holding it in memory.

    Args:
        size: ``(width, height)`` of level 0 in px.
        tile_fn: ``tile_fn(x, y, w, h)`` -> ``(h, w, 3)`` uint8 RGB of the level-0 region at
            ``(x, y)`` (always inside the image), or a ``(1, 1, 3)`` array meaning "all this
            colour" (cheap for glass). Level 0 asks for one tile at a time; reduced levels ask
            for blocks of at most 2048 x 2048 level-0 px and average them, so memory stays
            bounded by a few such blocks whatever the slide size.

    Other arguments as in :func:`write_pyramidal_tiff`.
    """
    import tifffile

    width, height = (int(v) for v in size)
    if width < 1 or height < 1:
        raise ValueError(f"size must be positive; got {size}")
    if flavor not in FLAVORS:
        raise ValueError(f"unknown flavor {flavor!r}; known: {', '.join(FLAVORS)}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16; got {tile}")
    ds = [int(d) for d in downsamples]
    if not ds or ds[0] != 1 or any(b <= a for a, b in zip(ds, ds[1:])) or any(d != float(x) for d, x in
                                                                            zip(ds, downsamples)):
        raise ValueError(f"downsamples must be increasing whole numbers starting at 1; got {tuple(downsamples)}")
    if mpp is not None and not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number or None; got {mpp!r}")
    if min(width, height) < ds[-1]:
        raise ValueError(f"downsample {ds[-1]} is larger than the image's shorter side ({min(width, height)} px)")
    sizes = [(width // d, height // d) for d in ds]
    comp: Any = None if compression == "none" else compression
    comp_args = {"level": int(quality)} if compression == "jpeg" else None
    raw = sum(w * h * 3 for w, h in sizes)
    bigtiff = raw > 2**31

    def common(level: int) -> dict[str, Any]:
        kw: dict[str, Any] = {"photometric": "rgb", "compression": comp, "compressionargs": comp_args,
                              "dtype": np.uint8, "shape": (sizes[level][1], sizes[level][0], 3),
                              "tile": (tile, tile), "metadata": None}
        if flavor == "generic" and mpp is not None:
            px_per_cm = 1e4 / (mpp * ds[level])
            kw["resolution"] = (px_per_cm, px_per_cm)
            kw["resolutionunit"] = "CENTIMETER"
        return kw

    p = Path(path)
    with atomic_target(p) as tmp, tifffile.TiffWriter(tmp, bigtiff=bigtiff, ome=flavor == "ome") as tw:
        for k in range(len(ds)):
            tiles = _level_tiles(tile_fn, (width, height), sizes[k], ds[k], tile)
            kw = common(k)
            if flavor == "aperio":
                if k == 0:
                    tw.write(tiles, description=_aperio_description(width, height, tile, compression, quality, mpp),
                             **kw)
                    thumb = _thumbnail(tile_fn, width, height)
                    tw.write(thumb, photometric="rgb", compression=comp, compressionargs=comp_args, metadata=None)
                else:  # Aperio marks its levels as full images (NewSubfileType 0), as tifffile expects
                    tw.write(tiles, **kw)
            elif flavor == "generic":
                tw.write(tiles, subfiletype=1 if k else 0, **kw)
            else:  # ome: level 0 carries the OME-XML, reduced levels go to its SubIFDs
                if k == 0:
                    meta: dict[str, Any] = {"axes": "YXS", "Name": p.stem}
                    if mpp is not None:
                        meta.update(PhysicalSizeX=float(mpp), PhysicalSizeY=float(mpp), PhysicalSizeXUnit="µm",
                                    PhysicalSizeYUnit="µm")
                    kw["metadata"] = meta
                    tw.write(tiles, subifds=len(ds) - 1, **kw)
                else:
                    tw.write(tiles, subfiletype=1, **kw)
    return p


def _aperio_description(width: int, height: int, tile: int, compression: str, quality: int,
                        mpp: float | None) -> str:
    """An ImageDescription in the Aperio layout (OpenSlide keys on the leading ``Aperio``)."""
    codec = {"jpeg": f"JPEG/RGB Q={int(quality)}", "none": "RAW/RGB"}.get(compression, f"{compression}/RGB")
    fields = [f"Aperio Image Library DeNuC test slide\r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) "
              f"{codec}", "ScanScope ID = DENUC-TEST"]
    if mpp is not None:
        fields += [f"AppMag = {10.0 / mpp:.4g}", f"MPP = {mpp:.6g}"]
    return "|".join(fields)


def _region(tile_fn: TileFn, x: int, y: int, w: int, h: int) -> np.ndarray:
    """``tile_fn`` output checked: ``(h, w, 3)`` or ``(1, 1, 3)`` uint8."""
    a = np.asarray(tile_fn(x, y, w, h))
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[2] != 3 or a.shape[:2] not in ((h, w), (1, 1)):
        raise ValueError(f"tile_fn({x}, {y}, {w}, {h}) returned {a.shape} {a.dtype}; expected ({h}, {w}, 3) or "
                         "(1, 1, 3) uint8")
    return a


def _reduced(tile_fn: TileFn, lx: int, ly: int, lw: int, lh: int, d: int) -> np.ndarray:
    """Level pixels ``[lx, lx+lw) x [ly, ly+lh)`` of the level with downsample ``d``: rounded
    means of ``d x d`` level-0 blocks, fetched in blocks of at most :data:`_CHUNK` level-0 px.
    Returns ``(1, 1, 3)`` when every fetched block was one and the same colour."""
    if d == 1:
        return _region(tile_fn, lx, ly, lw, lh)
    step = max(1, _CHUNK // d)
    out: np.ndarray | None = None
    colour: np.ndarray | None = None
    for cy in range(ly, ly + lh, step):
        ch = min(step, ly + lh - cy)
        for cx in range(lx, lx + lw, step):
            cw = min(step, lx + lw - cx)
            a = _region(tile_fn, cx * d, cy * d, cw * d, ch * d)
            if a.shape[:2] == (1, 1):
                if out is None and (colour is None or np.array_equal(colour, a)):
                    colour = a
                    continue
                block = np.broadcast_to(a, (ch, cw, 3))
            else:
                s = a.reshape(ch, d, cw, d, 3).sum(axis=(1, 3), dtype=np.uint32)
                block = ((s + (d * d) // 2) // (d * d)).astype(np.uint8)
            if out is None:
                out = np.empty((lh, lw, 3), dtype=np.uint8)
                if colour is not None:
                    out[:] = colour
            out[cy - ly:cy - ly + ch, cx - lx:cx - lx + cw] = block
    if out is None:
        assert colour is not None
        return colour
    return out


def _level_tiles(tile_fn: TileFn, size0: tuple[int, int], size: tuple[int, int], d: int,
                 tile: int) -> Iterator[np.ndarray]:
    """Tiles of one level in row-major order, each ``(tile, tile, 3)``; edge tiles are padded by
    repeating their last row/column (which keeps JPEG ringing off the image edge)."""
    lw, lh = size
    uniform: dict[bytes, np.ndarray] = {}  # one read-only tile per colour, yielded again and again
    for ty in range(0, lh, tile):
        for tx in range(0, lw, tile):
            w, h = min(tile, lw - tx), min(tile, lh - ty)
            a = _reduced(tile_fn, tx, ty, w, h, d)
            if a.shape[:2] == (1, 1):
                key = a.tobytes()
                if key not in uniform:
                    uniform[key] = np.ascontiguousarray(np.broadcast_to(a, (tile, tile, 3)))
                    uniform[key].flags.writeable = False
                yield uniform[key]
                continue
            if (h, w) != (tile, tile):
                a = np.pad(a, ((0, tile - h), (0, tile - w), (0, 0)), mode="edge")
            yield np.ascontiguousarray(a)


def _thumbnail(tile_fn: TileFn, width: int, height: int) -> np.ndarray:
    """A small RGB overview (longest side at most :data:`_THUMB_SIDE`) for the Aperio layout."""
    d = max(1, min(math.ceil(max(width, height) / _THUMB_SIDE), width, height))
    tw, th = max(1, width // d), max(1, height // d)
    a = _reduced(tile_fn, 0, 0, tw, th, d)
    return np.ascontiguousarray(np.broadcast_to(a, (th, tw, 3)))
