"""Reading images into the one array layout DeNuC uses: ``(H, W, 3)`` uint8 RGB.

RGBA is composited on white (slide background), grayscale is replicated to three channels,
16-bit and float images are scaled to 8 bit. Unreadable, truncated or empty files, and images
larger than :data:`MAX_IMAGE_PIXELS`, raise :class:`~denuc.errors.InputError` naming the file.

Warnings are one line naming the file: grayscale input and images under :data:`MIN_IMAGE_SIDE`
px a side are accepted with a warning; Pillow's own warnings while opening a file are re-issued
naming the file, or dropped where they tell the user nothing (corrupt EXIF blocks, the
decompression-bomb warning for images that DeNuC refuses with its own error anyway).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from denuc.errors import DenucError, InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

#: Largest image (width x height, pixels) DeNuC reads from one file: 2**28 px, e.g. 16384 x 16384
#: (805 MB as 8-bit RGB) held in memory at once. Larger inputs are slides: tiled TIFFs and slide
#: formats are read tile by tile (:mod:`denuc.source`), other formats are refused with a hint. Pillow's own "decompression bomb" limit
#: (89 Mpx by default) is raised to this bound when DeNuC first reads an image (a larger limit,
#: or none, set by the caller is kept); above it :func:`read_image` refuses the file with an
#: :class:`InputError`.
MAX_IMAGE_PIXELS = 2**28

#: Images with a side shorter than this (px) are read with a warning: a nucleus is about 16-40 px
#: across at 0.25-0.5 µm/px, so such an image cannot hold much to detect.
MIN_IMAGE_SIDE = 16

#: Pillow warnings that say nothing a DeNuC user can act on; they are dropped. Corrupt or
#: truncated EXIF/MakerNote blocks and over-long metadata tags do not affect the pixels; the
#: palette-transparency note concerns a conversion DeNuC already does (to RGBA).
_PILLOW_SILENT = re.compile(r"corrupt EXIF|Metadata Warning|Palette images with Transparency", re.IGNORECASE)

#: Serialises :func:`_pillow_warnings`: ``warnings.catch_warnings`` swaps process-wide state, so
#: two threads (e.g. :func:`prefetch_images` readers) must not enter it at once.
_WARN_LOCK = threading.Lock()


def _check_pixels(p: Path, h: int, w: int) -> None:
    """Refuse an image of ``h`` x ``w`` pixels above :data:`MAX_IMAGE_PIXELS` (before decoding it)."""
    if h * w > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{p}: image is {w} x {h} px ({h * w / 1e6:.0f} Mpx), more than DeNuC reads from one file "
            f"({MAX_IMAGE_PIXELS / 1e6:.0f} Mpx) into memory at once; save it as a tiled pyramidal TIFF "
            "(e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`, with its resolution) and give "
            "DeNuC that file: slides are read tile by tile")


def _pillow_image() -> Any:
    """``PIL.Image`` with its decompression-bomb limit raised to :data:`MAX_IMAGE_PIXELS`."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    return Image


@contextmanager
def _pillow_warnings(p: Path) -> Iterator[None]:
    """Re-issue warnings raised by Pillow inside the block as one line naming ``p``.

    Pillow's ``DecompressionBombWarning`` is dropped (images above :data:`MAX_IMAGE_PIXELS` are
    refused by :func:`_check_pixels` with an :class:`InputError`), and so are the messages in
    :data:`_PILLOW_SILENT`. Other Pillow warnings become ``"<file>: <message> (Pillow)"``.
    Warnings from other code that land in the block (another thread's) are passed on unchanged.
    Keep the block short (opening and converting, not decoding): it holds a process-wide lock.
    """
    with _WARN_LOCK:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    from PIL import Image

    seen: set[str] = set()
    for w in caught:
        fname = os.path.normcase(str(w.filename))
        from_pillow = (f"{os.sep}PIL{os.sep}" in fname or issubclass(w.category, Image.DecompressionBombWarning))
        if not from_pillow:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            continue
        msg = " ".join(str(w.message).split())
        if issubclass(w.category, Image.DecompressionBombWarning) or _PILLOW_SILENT.search(msg) or msg in seen:
            continue
        seen.add(msg)
        warnings.warn(f"{p}: {msg} (Pillow)", UserWarning, stacklevel=4)


_quiet = threading.local()


class _QuietFilter(logging.Filter):
    """Holds back tifffile's log records in threads inside :func:`quiet_tifffile`; the records
    are collected for the caller instead of reaching stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        sink = getattr(_quiet, "sink", None)
        if sink is None:
            return True
        sink.append(record.getMessage())
        return False


_FILTER = _QuietFilter()
_FILTER_LOCK = threading.Lock()


@contextmanager
def quiet_tifffile() -> Iterator[list[str]]:
    """Within the block, tifffile's log messages *from this thread* are collected into the
    yielded list instead of being printed (other threads are not affected). Used while DeNuC
    probes or opens files whose problems it reports itself, in one line."""
    with _FILTER_LOCK:
        log = logging.getLogger("tifffile")
        if _FILTER not in log.filters:
            log.addFilter(_FILTER)
    outer = getattr(_quiet, "sink", None)
    sink: list[str] = []
    _quiet.sink = sink
    try:
        yield sink
    finally:
        _quiet.sink = outer
        if outer is not None:
            outer.extend(sink)


def describe_exception(e: BaseException) -> str:
    """One line naming an unexpected exception: ``"Type: message"``, ``"out of memory (MemoryError)"``."""
    if isinstance(e, MemoryError):
        return "out of memory (MemoryError)"
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def uint16_depth(a: np.ndarray) -> int:
    """Bit depth (8, 10, 12, 14 or 16) of uint16 image data: the smallest whose full scale
    holds the maximum value."""
    hi = int(a.max()) if a.size else 0
    return next(b for b in (8, 10, 12, 14, 16) if hi < (1 << b))


def to_rgb_uint8(arr: np.ndarray, source: str = "array", warn: bool = True) -> np.ndarray:
    """Normalise any 2-D/3-D image array to ``(H, W, 3)`` uint8 RGB.

    * ``(H, W)`` grayscale -> replicated; ``(H, W, 1)`` likewise; ``(H, W, 2)`` gray + alpha ->
      composited on white, then replicated. With ``warn``, grayscale input gets one warning
      naming ``source`` (H&E models expect colour), and so does an image with a side under
      :data:`MIN_IMAGE_SIDE` px.
    * ``(H, W, 4)`` RGBA -> alpha-composited on white.
    * uint16 -> scaled from its bit depth to 8 bit: 16-bit full scale, unless no value exceeds
      the 8/10/12/14-bit full scale, which is then taken as the data's depth (cameras store
      10-14-bit data in 16-bit files; bright-field background is near full scale, so the depth
      shows in the maximum), with a warning naming ``source``; float in [0, 1] -> x255;
      bool -> 0/255.
    """
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 2, 3, 4):
        raise InputError(f"{source}: image looks channels-first {a.shape}; DeNuC wants (H, W, C)")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise InputError(f"{source}: expected an (H, W), (H, W, 3) or (H, W, 4) image; got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"{source}: image is empty ({a.shape[0]}x{a.shape[1]} px)")
    if warn and a.shape[2] in (1, 2):
        warnings.warn(f"{source}: grayscale image: replicated to RGB; H&E models expect colour", stacklevel=2)
    if warn and min(a.shape[0], a.shape[1]) < MIN_IMAGE_SIDE:
        warnings.warn(f"{source}: image is only {a.shape[1]} x {a.shape[0]} px (under {MIN_IMAGE_SIDE} px a "
                      "side), too small to hold more than a nucleus", stacklevel=2)
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        bits = uint16_depth(a)
        if bits < 16:
            warnings.warn(f"{source}: 16-bit image whose values stay within {bits} bits (max {int(a.max())}); "
                          f"read as {bits}-bit data", stacklevel=2)
        full = (1 << bits) - 1
        a = ((a.astype(np.uint32) * 255 + full // 2) // full).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise InputError(f"{source}: float image contains NaN or inf")
        hi = float(a.max()) if a.size else 0.0
        scale = 255.0 if hi <= 1.0 else 1.0
        a = np.clip(a * scale + 0.5, 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer) and a.size and a.min() >= 0 and a.max() <= 255:
            a = a.astype(np.uint8)
        else:
            raise InputError(f"{source}: unsupported pixel type {a.dtype}")
    c = a.shape[2]
    if c == 1:
        a = np.repeat(a, 3, axis=2)
    elif c == 2:  # gray + alpha
        g, al = a[:, :, :1].astype(np.float32), a[:, :, 1:2].astype(np.float32) / 255.0
        a = np.repeat(np.clip(g * al + 255.0 * (1 - al) + 0.5, 0, 255).astype(np.uint8), 3, axis=2)
    elif c == 4:
        rgb, al = a[:, :, :3].astype(np.float32), a[:, :, 3:4].astype(np.float32) / 255.0
        a = np.clip(rgb * al + 255.0 * (1 - al) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def _read_tiff(p: Path) -> tuple[np.ndarray | None, str]:
    """Read a TIFF with tifffile into a layout :func:`to_rgb_uint8` understands.

    Handles what Pillow cannot (16-bit and float RGB) and converts planar samples
    (``(S, H, W)`` -> ``(H, W, S)``), MINISWHITE (inverted), PALETTE (through the colormap) and
    CMYK (``SEPARATED``; ``rgb = (max - cmy) (max - k) / max`` like Pillow). Returns
    ``(None, why)`` when Pillow should read the file instead: tifffile is missing, the
    photometric interpretation is not converted here (YCbCr, CIELab, ...), or tifffile cannot
    decode it (e.g. LZW/JPEG compression without the optional ``imagecodecs`` package).
    """
    try:
        import tifffile
        from tifffile import PHOTOMETRIC, PLANARCONFIG
    except ImportError:
        return None, "tifffile is not installed"
    try:
        with quiet_tifffile() as notes, tifffile.TiffFile(p) as tf:
            if not tf.pages:
                return None, "no image in the file"
            page: Any = tf.pages[0]
            _check_pixels(p, int(page.imagelength), int(page.imagewidth))
            photometric, spp, bits = page.photometric, int(page.samplesperpixel), int(page.bitspersample)
            series = tuple(tf.series[0].shape) if tf.series else tuple(page.shape)
            if series != tuple(page.shape):
                raise InputError(f"{p}: TIFF holds a stack of images {series}; DeNuC reads one 2-D "
                                 "image per file (save each plane as its own file)")
            if photometric not in (PHOTOMETRIC.MINISBLACK, PHOTOMETRIC.MINISWHITE, PHOTOMETRIC.RGB,
                                   PHOTOMETRIC.PALETTE, PHOTOMETRIC.SEPARATED):
                return None, f"photometric {photometric.name} is left to Pillow"
            if photometric == PHOTOMETRIC.SEPARATED and (spp != 4 or int(page.tags.valueof(332, 1)) != 1):
                return None, "a separated TIFF that is not plain CMYK is left to Pillow"
            arr = page.asarray()
            if spp > 1 and page.planarconfig == PLANARCONFIG.SEPARATE and arr.ndim == 3 and arr.shape[0] == spp:
                arr = np.moveaxis(arr, 0, -1)
            if photometric == PHOTOMETRIC.PALETTE:
                if page.colormap is None or not np.issubdtype(arr.dtype, np.integer) or arr.ndim != 2:
                    return None, "palette TIFF without a usable colormap"
                cmap = np.asarray(page.colormap).astype(np.uint32)  # (3, 2**bits), 16-bit per the spec
                # to 8 bit: the high byte serves writers that scale by 256 (Pillow) and by 257
                # alike; some writers store 8-bit values directly
                cmap = (cmap if cmap.max() < 256 else cmap >> 8).astype(np.uint8)
                arr = np.moveaxis(cmap[:, np.clip(arr, 0, cmap.shape[1] - 1)], 0, -1)
            elif photometric == PHOTOMETRIC.MINISWHITE:
                if arr.dtype == np.bool_ and arr.ndim == 2:
                    arr = ~arr
                elif np.issubdtype(arr.dtype, np.unsignedinteger) and arr.ndim == 2:
                    top = (1 << bits) - 1 if 0 < bits < arr.dtype.itemsize * 8 else np.iinfo(arr.dtype).max
                    arr = (top - np.minimum(arr, top)).astype(arr.dtype)
                else:
                    return None, f"MINISWHITE {arr.dtype} {arr.shape} is left to Pillow"
            elif photometric == PHOTOMETRIC.SEPARATED:
                if not np.issubdtype(arr.dtype, np.unsignedinteger) or arr.ndim != 3:
                    return None, f"CMYK {arr.dtype} is left to Pillow"
                full = float(np.iinfo(arr.dtype).max)
                cmy, k = arr[..., :3].astype(np.float64), arr[..., 3:4].astype(np.float64)
                arr = ((full - cmy) * (full - k) / full + 0.5).astype(arr.dtype)
            return arr, ""
    except (DenucError, MemoryError):
        raise
    except Exception as e:  # any tifffile failure (missing codec, odd or corrupt file): Pillow tries
        why = describe_exception(e)
        return None, f"{why} ({'; '.join(notes)})" if notes else why


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB.

    PNG/JPEG/BMP go through Pillow. TIFF goes through tifffile when installed (16-bit, float,
    planar, palette, MINISWHITE and CMYK, see :func:`_read_tiff`), and through Pillow when
    tifffile is missing or cannot decode the file (e.g. LZW/JPEG compression without
    ``imagecodecs``; Pillow reads those). Raises :class:`InputError` naming the file when it is
    missing, truncated, corrupt, of an unsupported layout or larger than :data:`MAX_IMAGE_PIXELS`.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such image file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: image file is empty (0 bytes)")
    arr: np.ndarray | None = None
    tiff_why = ""
    if p.suffix.lower() in (".tif", ".tiff"):
        arr, tiff_why = _read_tiff(p)
    if arr is None:
        from PIL import UnidentifiedImageError

        Image = _pillow_image()
        try:
            with _pillow_warnings(p):  # header and tags are parsed here (EXIF, size check)
                im = Image.open(p)
            with im:
                _check_pixels(p, im.size[1], im.size[0])
                im.load()  # forces decoding: truncated files fail here
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im).astype(np.uint16 if im.mode.startswith("I;16") else np.int64)
                    if arr.dtype == np.int64:
                        arr = np.clip(arr, 0, 65535).astype(np.uint16)
                elif im.mode in ("P", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                    with _pillow_warnings(p):
                        arr = np.asarray(im.convert("RGBA" if "transparency" in im.info else "RGB"))
                elif im.mode == "F":
                    arr = np.asarray(im)
                else:
                    arr = np.asarray(im)
        except (DenucError, MemoryError):
            raise
        except Image.DecompressionBombError as e:  # above twice Pillow's limit, which a caller set
            raise InputError(f"{p}: image too large to read ({e}); treat it as a whole-slide image: cut "
                             "it into tiles and process the tiles") from None
        except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
            if tiff_why:
                raise InputError(f"{p}: cannot read TIFF (tifffile: {tiff_why}; Pillow: "
                                 f"{describe_exception(e)})") from None
            if isinstance(e, UnidentifiedImageError):
                raise InputError(f"{p}: not a readable image (unknown or corrupt format)") from None
            raise InputError(f"{p}: corrupt or truncated image ({e})") from None
    return to_rgb_uint8(arr, source=str(p))


def as_rgb_image(image: Any, source: str = "image") -> np.ndarray:
    """An image given to the Python API as ``(H, W, 3)`` uint8 RGB.

    ``image`` is a file path (read with :func:`read_image`) or an array that
    :func:`to_rgb_uint8` converts: ``(H, W)``/``(H, W, 1)`` gray, ``(H, W, 2)`` gray + alpha,
    ``(H, W, 3)`` RGB, ``(H, W, 4)`` RGBA; uint8, uint16, bool or float. Anything else raises
    :class:`InputError` naming ``source``.
    """
    if isinstance(image, (str, os.PathLike)):
        return read_image(image)
    arr = np.asarray(image)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{source}: expected an image array (H, W, 3) or an image file path; got "
                         f"{type(image).__name__} of {arr.dtype}")
    return to_rgb_uint8(arr, source=source)


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(height, width)`` of an image file without decoding all pixels where possible."""
    from PIL import UnidentifiedImageError

    p = Path(path)
    Image = _pillow_image()
    try:
        with _pillow_warnings(p):
            im = Image.open(p)
        with im:
            w, h = im.size
            return h, w
    except (FileNotFoundError, UnidentifiedImageError, OSError, Image.DecompressionBombError):
        h, w = read_image(p).shape[:2]
        return h, w


def prefetch_images(paths: Sequence[str | os.PathLike[str]], ahead: int = 2
                    ) -> Iterator[tuple[Path, np.ndarray | DenucError]]:
    """``(path, image)`` for each path in order, read by ``ahead`` background threads while the
    caller works on earlier images (decoders release the GIL, so reading overlaps compute).

    A file that cannot be read yields ``(path, error)`` (a :class:`DenucError`) instead of
    stopping the iteration; an unexpected exception while reading (a decoder bug, MemoryError)
    becomes an :class:`InputError` naming the file and the exception type. ``ahead=0`` reads in
    the caller's thread.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def load(p: Path) -> np.ndarray | DenucError:
        try:
            return read_image(p)
        except DenucError as e:
            return e
        except Exception as e:
            return InputError(f"{p}: cannot read image ({describe_exception(e)})")

    files = [Path(p) for p in paths]
    if ahead <= 0:
        for p in files:
            yield p, load(p)
        return
    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="denuc-read") as pool:
        pending: deque = deque()
        it = iter(files)
        for p in it:
            pending.append((p, pool.submit(load, p)))
            if len(pending) > ahead:
                break
        while pending:
            p, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
            yield p, fut.result()
