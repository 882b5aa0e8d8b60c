"""Whole-slide readers: OpenSlide (``openslide-python`` with the ``openslide-bin`` wheel) and
tiffslide (pure Python on tifffile; JPEG/JPEG 2000 tiles through imagecodecs).

Both raise :class:`~denuc.source.base.BackendDeclined` when they cannot open a file, so that
:func:`~denuc.source.opening.open_source` tries the next reader, and check at open time that the
first and last pixel of every level decode (a truncated file fails there, not mid-run).

µm per pixel comes from (first found): the ``mpp`` argument; OME-XML ``PhysicalSizeX/Y``; the
reader's vendor metadata (``openslide.mpp-x/mpp-y``, e.g. Aperio ``MPP``; tiffslide's); the TIFF
resolution tags when plausible.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from denuc.errors import DenucError, InputError
from denuc.source.base import BackendDeclined, SlideSource, composite_on_white, resolve_mpp
from denuc.data.image import quiet_tifffile
from denuc.source.tiffmeta import Found, tiff_file_mpp, truncation


class _TiffInfo:
    """What DeNuC reads itself from a TIFF-based slide: whether it is OME-TIFF, the µm per pixel
    in its OME-XML or resolution tags, and why the file is damaged (``""`` when intact)."""

    def __init__(self, p: Path) -> None:
        self.is_tiff = False
        self.is_ome = False
        self.found: Found | None = None
        self.why_no_mpp = ""
        self.damage = ""
        if not p.is_file():
            return
        try:
            import tifffile

            with quiet_tifffile() as notes, tifffile.TiffFile(p) as tf:
                self.is_tiff = True
                self.is_ome = bool(tf.is_ome)
                self.found, self.why_no_mpp = tiff_file_mpp(tf)
                self.damage = truncation(tf, p.stat().st_size)
                broken = [n for n in notes if "invalid page" in n]
                if broken and not self.damage:
                    self.damage = f"its page structure is broken (tifffile: {broken[0]})"
        except Exception:  # noqa: BLE001 - not a TIFF tifffile can parse (MRXS, DICOM, ...): readers decide
            self.damage = _broken_tiff_header(p)
            return


def _broken_tiff_header(p: Path) -> str:
    """Why a file that starts like a TIFF (byte order mark and magic number) cannot be parsed:
    cut before its first image directory ends, or that directory lies beyond the end; ``""`` for
    a file that does not start like a TIFF (other readers decide)."""
    import struct

    try:
        with open(p, "rb") as fh:
            head = fh.read(16)
        size = p.stat().st_size
    except OSError:
        return ""
    if len(head) < 4 or head[:2] not in (b"II", b"MM"):
        return ""
    bo = "<" if head[:2] == b"II" else ">"
    magic = struct.unpack(bo + "H", head[2:4])[0]
    if magic not in (42, 43):
        return ""
    need = 8 if magic == 42 else 16
    if len(head) < need:
        return f"the file is truncated: it has {size} bytes, less than a TIFF header ({need} bytes)"
    first = struct.unpack(bo + "I", head[4:8])[0] if magic == 42 else struct.unpack(bo + "Q", head[8:16])[0]
    if first >= size:
        return f"the file is truncated: it has {size} bytes but its first image directory starts at byte {first}"
    return f"the file is truncated or corrupt: its first image directory (at byte {first} of {size}) does not parse"


def _one_line(e: BaseException) -> str:
    from denuc.data.image import describe_exception

    return describe_exception(e)


class _Pyramid(SlideSource):
    """Shared set-up of the slide readers.

    A reader can be pickled (it is reopened from its path on unpickling, e.g. in a worker
    process), and a process forked from the one that opened it gets its own file handles on
    first read instead of sharing the parent's file offsets.
    """

    vendor: str
    properties: dict[str, str]
    _args: tuple[str, float | None, str]

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self._args)

    def _finish(self, info: _TiffInfo, mpp: float | None, vendor_mpp: Found | None) -> None:
        """Check every level's first and last pixel decode, then set ``mpp``/``mpp_source``
        (override, OME, vendor metadata, TIFF tags)."""
        assert self.path is not None
        for k, (w, h) in enumerate(self.level_dimensions):
            if w < 1 or h < 1:
                raise BackendDeclined(f"level {k} is empty ({w} x {h} px)")
            for x, y in ((0, 0), (w - 1, h - 1)):
                try:
                    self._read_region(x, y, 1, 1, k)
                except DenucError:
                    raise
                except Exception as e:  # noqa: BLE001 - truncated or corrupt data
                    raise BackendDeclined(f"level {k} does not decode at x={x}, y={y} ({_one_line(e)}); "
                                          "the file is truncated or corrupt") from None
        found = info.found if info.is_ome and info.found is not None else vendor_mpp or info.found
        self.mpp, self.mpp_source = resolve_mpp(str(self.path), mpp, found, info.why_no_mpp)


def _damaged(p: Path, info: _TiffInfo) -> None:
    """A truncated or broken TIFF is an :class:`InputError` (no other reader would do better)."""
    if info.damage:
        raise InputError(f"{p}: cannot open slide: {info.damage}")


class OpenSlideSource(_Pyramid):
    """A slide read by OpenSlide (``backend = "openslide"``): SVS, NDPI, MRXS, SCN, BIF, VMS,
    Philips TIFF, DICOM folders, generic tiled TIFF. OME-TIFF is declined (OpenSlide reads
    neither its SubIFD pyramid nor its ``PhysicalSize``), as is any file OpenSlide does not
    recognise. OpenSlide is thread-safe: one handle serves all threads.

    Level reads map the level's ``(x, y)`` to level 0 as ``round(x * downsample)``, which is
    exact for integer downsamples (OpenSlide's API takes level-0 positions).
    """

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None, name: str = "") -> None:
        p = Path(path)
        self.path, self.name, self.backend = p, name or _stem(p), "openslide"
        self._args = (str(p), mpp, name)
        self._pid = os.getpid()
        self._reopen_lock = threading.Lock()
        try:
            import openslide
        except Exception as e:  # noqa: BLE001 - ImportError, or the native library failing to load
            raise BackendDeclined(f"openslide-python is not usable ({_one_line(e)})") from None
        info = _TiffInfo(p)
        _damaged(p, info)
        if info.is_ome:
            raise BackendDeclined("OME-TIFF is left to tiffslide (OpenSlide reads neither its pyramid nor its "
                                  "PhysicalSize)")
        self._target = _dicom_file(p) if p.is_dir() else p
        try:
            fmt = openslide.OpenSlide.detect_format(str(self._target))
        except Exception as e:  # noqa: BLE001
            raise BackendDeclined(_one_line(e)) from None
        if fmt is None:
            raise BackendDeclined("not a slide format OpenSlide recognises")
        try:
            self._osr = openslide.OpenSlide(str(self._target))
        except Exception as e:  # noqa: BLE001 - OpenSlideUnsupportedFormatError, OpenSlideError
            raise BackendDeclined(_one_line(e)) from None
        try:
            props = dict(self._osr.properties)
            self.properties = props
            self.vendor = props.get("openslide.vendor", fmt)
            self.level_dimensions = tuple((int(w), int(h)) for w, h in self._osr.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in self._osr.level_downsamples)
            vendor_mpp: Found | None = None
            if self.vendor != "generic-tiff" and "openslide.mpp-x" in props and "openslide.mpp-y" in props:
                # generic TIFF: OpenSlide's mpp comes from the resolution tags, which
                # tiff_resolution_mpp reads with a plausibility check and a clearer source
                try:
                    vendor_mpp = (float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"]),
                                  "openslide.mpp-x/mpp-y")
                except ValueError:
                    vendor_mpp = None
            self._finish(info, mpp, vendor_mpp)
        except BaseException:
            self._osr.close()
            raise

    def _handle(self) -> Any:
        """The OpenSlide handle of this process (reopened once after a fork)."""
        if self._pid != os.getpid():
            with self._reopen_lock:
                if self._pid != os.getpid():
                    import openslide

                    self._osr = openslide.OpenSlide(str(self._target))
                    self._pid = os.getpid()
        return self._osr

    def _read_region(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        loc = (int(round(x * ds)), int(round(y * ds)))
        im = self._handle().read_region(loc, level, (w, h))
        return composite_on_white(np.asarray(im))

    def close(self) -> None:
        """Close the OpenSlide handle."""
        self._osr.close()


class TiffSlideSource(_Pyramid):
    """A TIFF-based slide read by tiffslide (``backend = "tiffslide"``): SVS, NDPI, SCN, BIF,
    Philips TIFF, OME-TIFF, generic tiled TIFF. Each thread gets its own handle (tifffile file
    handles are not shared between threads); all are closed by :meth:`close`. Pixels must be
    8-bit gray, RGB or RGBA.
    """

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None, name: str = "") -> None:
        p = Path(path)
        self.path, self.name, self.backend = p, name or _stem(p), "tiffslide"
        self._args = (str(p), mpp, name)
        self._local = threading.local()
        self._handles: list[Any] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        info = _TiffInfo(p)
        _damaged(p, info)
        ts = self._handle()
        try:
            props = dict(ts.properties)
            self.properties = {k: str(v) for k, v in props.items()}
            self.vendor = str(props.get("tiffslide.vendor") or "generic-tiff")
            self.level_dimensions = tuple((int(w), int(h)) for w, h in ts.level_dimensions)
            self.level_downsamples = tuple(float(d) for d in ts.level_downsamples)
            self._check_pixels(ts, props)
            vendor_mpp: Found | None = None
            from_tags = "tiff.XResolution" in props  # tiffslide fell back to the resolution tags
            if not from_tags and props.get("tiffslide.mpp-x") is not None and props.get("tiffslide.mpp-y") is not None:
                vendor_mpp = (float(props["tiffslide.mpp-x"]), float(props["tiffslide.mpp-y"]),
                              "tiffslide.mpp-x/mpp-y")
            self._finish(info, mpp, vendor_mpp)
        except BaseException:
            self.close()
            raise

    def _handle(self) -> Any:
        """This thread's tiffslide handle (opened on first use; fresh ones after a fork)."""
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():  # the parent's handles stay the parent's
                    self._local, self._handles, self._pid = threading.local(), [], os.getpid()
        ts = getattr(self._local, "ts", None)
        if ts is not None:
            return ts
        try:
            import tiffslide
        except Exception as e:  # noqa: BLE001
            raise BackendDeclined(f"tiffslide is not usable ({_one_line(e)})") from None
        try:
            with quiet_tifffile():
                ts = tiffslide.TiffSlide(str(self.path))
                _ = ts.properties  # parses the metadata: malformed files fail here
        except Exception as e:  # noqa: BLE001 - TiffFileError, NotImplementedError, ...
            raise BackendDeclined(_one_line(e)) from None
        with self._lock:
            self._handles.append(ts)
        self._local.ts = ts
        return ts

    def _check_pixels(self, ts: Any, props: dict[str, Any]) -> None:
        axes = str(props.get("tiffslide.series-axes", ""))
        series = ts.ts_tifffile.series[int(props.get("tiffslide.series-index", 0) or 0)]
        dtype = np.dtype(series.dtype)
        shape = tuple(series.shape)
        ok = dtype == np.uint8 and (axes == "YX" or (axes == "YXS" and shape[-1] in (1, 2, 3, 4)))
        if not ok:
            raise InputError(f"{self.path}: slide pixels are {dtype} with axes {axes or '?'} {shape}; DeNuC reads "
                             "8-bit gray/RGB bright-field slides")

    def _read_region(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        ts = self._handle()
        ds = self.level_downsamples[level]
        # tiffslide maps a level-0 location to level px as int(loc / ds); pick the level-0
        # location that lands exactly on (x, y)
        loc = [_level0_for(v, ds) for v in (x, y)]
        with quiet_tifffile():
            arr = ts.read_region(tuple(loc), level, (w, h), as_array=True, padding=False)
        arr = np.asarray(arr)
        if arr.shape[:2] != (h, w):
            raise InputError(f"{self.path}: tiffslide returned {arr.shape[:2]} px for a {h} x {w} px region")
        return composite_on_white(arr)

    def close(self) -> None:
        """Close every thread's handle."""
        with self._lock:
            handles, self._handles = self._handles, []
        for ts in handles:
            try:
                ts.close()
            except Exception:  # noqa: BLE001 - closing twice or a handle already broken
                pass
        self._local = threading.local()


def _level0_for(v: int, ds: float) -> int:
    """The smallest level-0 coordinate ``u`` with ``int(u / ds) == v`` (``v >= 0``)."""
    u = int(math.ceil(v * ds))
    while u > 0 and int((u - 1) / ds) == v:
        u -= 1
    while int(u / ds) < v:
        u += 1
    return u


def _dicom_file(folder: Path) -> Path:
    """A ``.dcm`` file of a DICOM slide folder (OpenSlide finds the other levels beside it)."""
    files = sorted(q for q in folder.iterdir() if q.suffix.lower() == ".dcm")
    if not files:
        raise BackendDeclined("folder holds no .dcm file")
    return files[0]


def _stem(p: Path) -> str:
    """File stem without a compound slide suffix (``a.ome.tif`` -> ``a``; :func:`denuc.core.files.file_stem`)."""
    from denuc.core.files import file_stem

    return file_stem(p)
