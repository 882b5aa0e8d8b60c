"""Opening an image, slide or array as a :class:`~denuc.source.base.SlideSource`: the choice of
reader (:data:`SOURCE_BACKENDS`, tried in order for a slide) sits above the readers themselves
(:mod:`denuc.source.array`, :mod:`denuc.source.slide`), which build on :mod:`denuc.source.base`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from denuc.errors import InputError
from denuc.source.array import ArraySource, ImageSource
from denuc.source.base import BackendDeclined, SlideSource, is_slide_path
from denuc.source.slide import OpenSlideSource, TiffSlideSource

# ---------------------------------------------------------------------- opening
Opener = Callable[[Path, "float | None", str], SlideSource]


def _open_openslide(path: Path, mpp: float | None, name: str) -> SlideSource:
    return OpenSlideSource(path, mpp=mpp, name=name)


def _open_tiffslide(path: Path, mpp: float | None, name: str) -> SlideSource:
    return TiffSlideSource(path, mpp=mpp, name=name)


#: Slide readers, tried in this order: ``name -> opener(path, mpp, name)``. An opener raises
#: :class:`BackendDeclined` when it cannot read the file (the next one is tried) and a
#: :class:`~denuc.errors.DenucError` for a problem no other reader would fix (missing mpp).
SOURCE_BACKENDS: dict[str, Opener] = {"openslide": _open_openslide, "tiffslide": _open_tiffslide}

def open_source(src: str | os.PathLike[str] | np.ndarray, mpp: float | None = None, name: str = "", *,
                backend: str | None = None) -> SlideSource:
    """Open an image, slide or array as a :class:`SlideSource`.

    Args:
        src: an array (any layout :func:`denuc.data.image.to_rgb_uint8` accepts) -> one-level
            :class:`~denuc.source.array.ArraySource`; a plain image file (PNG, JPEG, BMP,
            single-level TIFF) -> :class:`~denuc.source.array.ImageSource`; a slide
            (:func:`is_slide_path`) -> the first reader in :data:`SOURCE_BACKENDS` that opens it.
        mpp: level-0 µm per pixel; overrides the file's metadata. Required for arrays and for
            files without resolution metadata.
        name: the source's name (default: the file's stem, ``"array"`` for arrays).
        backend: force one reader of :data:`SOURCE_BACKENDS` for a slide (default: try each).

    Raises:
        InputError: missing file, unreadable/corrupt file (one line naming it), unknown backend.
        ResolutionError: no µm per pixel anywhere, an implausible one, or anisotropic pixels.
    """
    if isinstance(src, np.ndarray):
        return ArraySource(src, mpp=mpp, name=name or "array")
    if not isinstance(src, (str, os.PathLike)):
        raise InputError(f"expected an image/slide path or a numpy array; got {type(src).__name__}")
    p = Path(src)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if backend is not None and backend not in SOURCE_BACKENDS:
        raise InputError(f"unknown slide reader {backend!r}; known: {', '.join(SOURCE_BACKENDS)}")
    if backend is None and not is_slide_path(p):
        if p.is_dir():
            raise InputError(f"{p}: is a folder, not an image or a slide (a DICOM slide folder holds .dcm files)")
        return ImageSource(p, mpp=mpp, name=name)
    if p.is_file() and p.stat().st_size == 0:
        raise InputError(f"{p}: slide file is empty (0 bytes)")
    names = [backend] if backend is not None else list(SOURCE_BACKENDS)
    why: list[str] = []
    for b in names:
        try:
            return SOURCE_BACKENDS[b](p, mpp, name)
        except BackendDeclined as e:
            why.append(f"{b}: {e}")
    reasons = {w.split(": ", 1)[1] for w in why}
    if len(reasons) == 1:
        raise InputError(f"{p}: cannot open slide: {reasons.pop()}")
    raise InputError(f"{p}: cannot open slide ({'; '.join(why)})")
