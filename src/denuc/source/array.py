"""One-level sources: an in-memory array (:class:`ArraySource`) and a plain image file read
whole (:class:`ImageSource`, PNG/JPEG/BMP/single-level TIFF through
:func:`denuc.data.image.read_image`, so pixels are exactly what ``read_image`` gives)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from denuc.core.files import file_stem
from denuc.core.mpp import check_mpp
from denuc.data.image import image_size, read_image, to_rgb_uint8
from denuc.errors import MissingMppError, ResolutionError
from denuc.source.base import SlideSource, resolve_mpp


class _OneLevel(SlideSource):
    """A source holding its one level as an ``(H, W, 3)`` uint8 array."""

    _pixels: np.ndarray

    def _set_pixels(self, rgb: np.ndarray) -> None:
        self._pixels = rgb
        h, w = rgb.shape[:2]
        self.level_dimensions = ((int(w), int(h)),)
        self.level_downsamples = (1.0,)

    def _read_region(self, x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
        return self._pixels[y:y + h, x:x + w].copy()

    def close(self) -> None:
        """Nothing to release: the pixels are dropped with the object."""


class ArraySource(_OneLevel):
    """An in-memory image as a one-level source (``backend = "array"``).

    Args:
        array: any layout :func:`denuc.data.image.to_rgb_uint8` accepts (gray, RGB, RGBA,
            uint8/uint16/float/bool). An ``(H, W, 3)`` uint8 C-contiguous array is used as is,
            not copied: do not modify it while the source is in use.
        mpp: µm per pixel; required (an array carries no metadata).
        name: names the array in messages and results.
    """

    def __init__(self, array: np.ndarray, mpp: float | None, name: str = "array") -> None:
        self.name = name or "array"
        self.path = None
        self.backend = "array"
        if mpp is None:
            raise MissingMppError(f"{self.name}: an array carries no µm per pixel; pass mpp=... (CLI: --mpp), "
                                  "e.g. mpp=0.25 for a 40x scan")
        self.mpp = check_mpp(mpp, self.name)
        self.mpp_source = "argument"
        self._set_pixels(to_rgb_uint8(array, source=self.name))


class ImageSource(_OneLevel):
    """A plain image file (PNG, JPEG, BMP, single-level TIFF) read whole with
    :func:`~denuc.data.image.read_image` as a one-level source (``backend = "image"``).

    µm per pixel: ``mpp`` if given (source ``"--mpp"``), else a TIFF's resolution tags when they
    are present and plausible (:func:`~denuc.source.tiffmeta.tiff_resolution_mpp`), else a
    :class:`ResolutionError` naming the file. The file's readability is checked first, so a
    corrupt file gives an :class:`~denuc.errors.InputError` rather than a resolution error.
    """

    def __init__(self, path: str | os.PathLike[str], mpp: float | None = None, name: str = "") -> None:
        p = Path(path)
        self.path = p
        self.name = name or file_stem(p)
        self.backend = "image"
        image_size(p)  # cheap header read: a missing, empty or non-image file fails here
        found, why = (None, "")
        if mpp is None and p.suffix.lower() in (".tif", ".tiff"):
            found, why = _tiff_tags_mpp(p)
        self.mpp, self.mpp_source = resolve_mpp(str(p), mpp, found, why)
        self._set_pixels(read_image(p))


def _tiff_tags_mpp(p: Path) -> tuple[tuple[float, float, str] | None, str]:
    """Resolution tags of a TIFF's first page (OME-XML included), or ``(None, why)``."""
    from denuc.data.image import quiet_tifffile
    from denuc.source.tiffmeta import tiff_file_mpp

    try:
        import tifffile

        with quiet_tifffile(), tifffile.TiffFile(p) as tf:
            return tiff_file_mpp(tf)
    except Exception:  # noqa: BLE001 - an odd TIFF: no metadata; read_image reports real damage
        return None, ""
