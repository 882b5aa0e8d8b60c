"""Point datasets: the common interface every reader implements, and the reader registry.

A dataset is a set of images, each with nucleus points (a :class:`~denuc.core.Nuclei` in
that image's pixels), a class vocabulary, a resolution (µm per pixel) and split lists.
Readers register under a format name (``generic``, ``brca-m2c``, ``ocelot``, ``puma``) with
a ``detect(path) -> bool`` probe, so :func:`open_dataset` can pick the reader itself.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from denuc.core.result import NO_CLASS, Nuclei
from denuc.data.image import read_image
from denuc.errors import InputError
from denuc.registry import Registry

SPLITS = ("train", "val", "test")

#: What to do with a label point outside its image: ``"error"`` raises, ``"drop"`` warns and drops.
OUTSIDE_POLICIES = ("error", "drop")


@dataclass
class Sample:
    """One image of a dataset. ``points`` are in the image's own pixels at ``mpp``."""

    stem: str
    image: np.ndarray  # (H, W, 3) uint8 RGB
    points: Nuclei
    mpp: float
    split: str | None


class PointDataset(ABC):
    """Interface of every point dataset reader.

    Attributes:
        root: the dataset folder.
        classes: class vocabulary, index = class id used in ``Nuclei.class_ids``.
        colors: one ``(r, g, b)`` per class (for overlays and QuPath export).
        mpp: default µm per pixel of the images (a reader may override per image via :meth:`mpp_of`).
        outside: policy for label points outside their image, see :data:`OUTSIDE_POLICIES`.
    """

    format_name: str = ""
    #: whether the reader takes an ``mpp=`` argument (the training commands' ``--data-mpp``): for
    #: formats whose files may lack the resolution or record only a nominal one
    accepts_mpp: bool = False

    def __init__(self, root: str | os.PathLike[str], outside: str = "error") -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"{self.root}: dataset folder does not exist")
        if outside not in OUTSIDE_POLICIES:
            raise InputError(f"outside must be one of {OUTSIDE_POLICIES}; got {outside!r}")
        self.outside = outside
        self.classes: tuple[str, ...] = ()
        self.colors: tuple[tuple[int, int, int], ...] = ()
        self.mpp: float = 0.0

    # -- to implement -------------------------------------------------------
    @abstractmethod
    def stems(self, split: str | None = None) -> list[str]:
        """Image stems of ``split`` (``None`` = all), in a fixed order."""

    @abstractmethod
    def image_path(self, stem: str) -> Path:
        """Path of the image file of ``stem``."""

    @abstractmethod
    def _read_points(self, stem: str) -> Nuclei:
        """Raw points of ``stem`` in image pixels, classes in :attr:`classes` (no bounds check)."""

    # -- provided -----------------------------------------------------------
    def mpp_of(self, stem: str) -> float:
        return self.mpp

    def split_of(self, stem: str) -> str | None:
        for s in SPLITS:
            if stem in set(self.stems(s)):
                return s
        return None

    def read_image(self, stem: str) -> np.ndarray:
        return read_image(self.image_path(stem))

    def points(self, stem: str, image_size: tuple[int, int] | None = None) -> Nuclei:
        """Points of ``stem`` with the outside-image policy applied. ``image_size`` = (H, W).

        The result always has ``class_ids`` (``-1`` = a nucleus of unknown class), ``mpp``,
        ``image_size`` and ``name`` = ``stem``.
        """
        pts = self._read_points(stem)
        if pts.class_ids is None:  # e.g. an empty label file: label points always carry class ids
            pts.class_ids = np.full(len(pts), NO_CLASS, dtype=np.int64)
        pts.mpp = self.mpp_of(stem)
        pts.name = stem
        if image_size is None:
            from denuc.data.image import image_size as _size

            image_size = _size(self.image_path(stem))
        pts.image_size = image_size
        h, w = image_size
        ok = pts.inside(h, w)
        if not ok.all():
            bad = pts.xy[~ok]
            msg = (f"{self.format_name} dataset {self.root}: {len(bad)} point(s) of {stem!r} lie outside the "
                   f"{w}x{h} image, e.g. (x, y) = ({bad[0][0]:.2f}, {bad[0][1]:.2f})")
            if self.outside == "error":
                raise InputError(msg + "; pass --outside drop (Python: outside='drop') to drop them with a warning")
            warnings.warn(msg + "; dropped", stacklevel=2)
            pts = pts.select(ok)
        return pts

    def load(self, stem: str) -> Sample:
        img = self.read_image(stem)
        return Sample(stem, img, self.points(stem, img.shape[:2]), self.mpp_of(stem), self.split_of(stem))

    def samples(self, split: str | None = None) -> Iterator[Sample]:
        for s in self.stems(split):
            yield self.load(s)

    def __len__(self) -> int:
        return len(self.stems())

    def __repr__(self) -> str:
        counts = {s: len(self.stems(s)) for s in SPLITS}
        return f"{type(self).__name__}({str(self.root)!r}, classes={list(self.classes)}, mpp={self.mpp}, splits={counts})"


@dataclass(frozen=True)
class ReaderSpec:
    """A registered dataset format: how to recognise a folder and how to open it."""

    name: str
    cls: type[PointDataset]
    detect: Callable[[Path], bool]


DATASETS: Registry[ReaderSpec] = Registry("dataset format")


def register_dataset(name: str, detect: Callable[[Path], bool]) -> Callable[[type[PointDataset]], type[PointDataset]]:
    """Class decorator registering a :class:`PointDataset` reader under ``name``."""

    def deco(cls: type[PointDataset]) -> type[PointDataset]:
        cls.format_name = name
        DATASETS.register(name, ReaderSpec(name, cls, detect))
        return cls

    return deco


def open_dataset(path: str | os.PathLike[str], format: str | None = None, **kwargs: object) -> PointDataset:
    """Open a dataset folder. ``format=None`` probes every registered reader.

    Raises:
        InputError: the folder does not exist or no reader recognises it.
    """
    p = Path(path)
    if not p.is_dir():
        raise InputError(f"{p}: dataset folder does not exist")
    if format is not None:
        return DATASETS.get(format).cls(p, **kwargs)  # type: ignore[arg-type]
    for name in DATASETS:
        spec = DATASETS.get(name)
        if spec.detect(p):
            return spec.cls(p, **kwargs)  # type: ignore[arg-type]
    raise InputError(
        f"{p}: not a recognised dataset folder (formats: {', '.join(DATASETS.names())}); "
        "the generic layout needs dataset.yaml, images/ and points/"
    )


def open_training_dataset(path: str | os.PathLike[str], *, mpp: float | None = None, outside: str = "error",
                          format: str | None = None) -> PointDataset:
    """:func:`open_dataset` with the options of the training commands.

    Args:
        mpp: µm per pixel of the dataset's images (``--data-mpp``), for a format whose files
            may not say (the generic layout without ``mpp`` in dataset.yaml) or record only a
            nominal value (PUMA); ``None`` = what the files say. Refused (:class:`InputError`)
            for formats that record their own resolution.
        outside: what to do with label points outside their image (``--outside``): ``error``
            or ``drop`` (with a warning).
    """
    if outside not in OUTSIDE_POLICIES:
        raise InputError(f"--outside must be one of {list(OUTSIDE_POLICIES)}; got {outside!r}")
    if mpp is None:
        return open_dataset(path, format, outside=outside)
    from denuc.core.mpp import check_mpp

    mpp = check_mpp(mpp, "--data-mpp (µm per pixel of the dataset's images)")
    p = Path(path)
    fmt = format or next((n for n in DATASETS if p.is_dir() and DATASETS.get(n).detect(p)), None)
    if fmt is None:
        return open_dataset(path, format, outside=outside)  # raises the usual "not a dataset" error
    spec = DATASETS.get(fmt)
    if not spec.cls.accepts_mpp:
        raise InputError(f"{p}: --data-mpp does not apply to {fmt} datasets, which record their own µm per pixel; "
                         "leave it out")
    return spec.cls(p, outside=outside, mpp=mpp)  # type: ignore[call-arg]
