"""What every output writer ("sink") of a whole-slide or image run shares.

A run builds one :class:`OutputInfo` per input, opens its sinks, hands every chunk of
classified nuclei to each sink's :meth:`Sink.write` as tiles finish (chunks in any order,
each nucleus exactly once, empty chunks allowed), then calls :meth:`Sink.close` with the run's
facts; on any failure it calls :meth:`Sink.abort`. A sink writes to a hidden temporary file
beside its final path (same file system) and moves it into place atomically on close, so a
reader never sees a half-written output and a failed run leaves nothing behind. A sink
holds at most one chunk (plus fixed-size state such as counts or a thumbnail canvas), never
every nucleus of a slide.

Frame and units: chunk ``xy`` is (x, y) = (column, row) in **level-0 pixels** of the input,
pixel-edge frame (pixel (i, j) has its centre at (i + 0.5, j + 0.5)); ``mpp`` is the level-0
µm per pixel; sizes are ``(width, height)`` in level-0 pixels (unlike
:attr:`Nuclei.image_size <denuc.core.Nuclei>`, which is (height, width)).
"""

from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from denuc.core.files import file_mode
from denuc.core.palette import RGB, resolve_colors
from denuc.core.result import Nuclei
from denuc.errors import DenucError, InputError

#: ``OutputInfo.kind`` values: a whole-slide image, or an ordinary image (PNG/JPEG/TIFF tile).
KINDS = ("slide", "image")

#: Key of a chunk's ``meta`` that holds the tile of each nucleus: ``(N,)`` int64 index of the
#: tile of the input's tile plan (:class:`denuc.tiles.plan.TilePlan`, row-major over the
#: detector frame's tile cells) whose core the nucleus lies in, i.e. the streaming window that
#: produced it. The stream's chunks carry it; a sink that stores it (``h5ad``, ``spatialdata``)
#: gets the plan's level-0 core boxes as ``OutputInfo.sink_options["tile_cores"]``. Like every
#: ``meta`` entry it describes the chunk as made: :meth:`Nuclei.select` and
#: :meth:`Nuclei.concat` do not carry it along.
TILE_KEY = "tile"


@dataclass
class OutputInfo:
    """Facts about one input that its sinks need before the first nucleus arrives.

    Attributes:
        stem: the input's stem; outputs are ``out_dir / f"{stem}{suffix}"``.
        out_dir: output folder (must exist).
        kind: ``"slide"`` or ``"image"``.
        class_names: class vocabulary of the chunks (``("nucleus",)`` for detection only).
        colors: class name -> ``(r, g, b)`` 0-255; classes missing here get the default palette.
        mpp: level-0 µm per pixel.
        size: level-0 ``(width, height)`` in pixels.
        thumbnail: ``(h, w, 3)`` uint8 RGB picture of the whole input for the overlay, or None.
        thumb_downsample: level-0 pixels per thumbnail pixel.
        tissue_mask: ``(h', w')`` bool tissue mask of the whole input at any resolution, or None.
        tissue_downsample: level-0 pixels per mask pixel.
        analysed_mask: the analysed area (tissue ∩ ROIs) on the tissue mask's grid, or None (then
            the tissue mask is the analysed area).
        tissue_area_um2: tissue area in µm² (0 = no tissue found), or None when unknown.
        analysed_area_um2: area in µm² where nuclei were reported (tissue ∩ ROIs), or None
            (then the tissue area).
        roi_areas_um2: ROI name -> area in µm² (the region ∩ tissue) when regions of interest
            were given, else None.
        roi_outlines: level-0 ``(K, 2)`` (x, y) rings to draw on the overlay, or None.
        sink_options: settings of particular sinks (e.g. ``embeddings`` for ``h5ad``,
            ``density_grid_um`` for ``density``; from a streamed run also ``tile_cores``, the
            plan's ``(T, 4)`` level-0 tile cores, and ``tile_grid``, its ``(nx, ny)``, see
            :data:`TILE_KEY`; with ROIs ``roi_shapes``, ``(name, shapely geometry)`` pairs in
            level-0 px); each sink reads its own keys with defaults.
    """

    stem: str
    out_dir: Path
    kind: str
    class_names: tuple[str, ...]
    colors: dict[str, RGB]
    mpp: float
    size: tuple[int, int]
    thumbnail: np.ndarray | None = None
    thumb_downsample: float = 1.0
    tissue_mask: np.ndarray | None = None
    tissue_downsample: float = 1.0
    analysed_mask: np.ndarray | None = None
    tissue_area_um2: float | None = None
    analysed_area_um2: float | None = None
    roi_areas_um2: dict[str, float] | None = None
    roi_outlines: list[np.ndarray] | None = None
    sink_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        if self.kind not in KINDS:
            raise InputError(f"{self.stem}: output kind must be one of {KINDS}; got {self.kind!r}")
        self.class_names = tuple(str(c) for c in self.class_names)
        if not self.class_names:
            raise InputError(f"{self.stem}: outputs need at least one class name")
        self.colors = resolve_colors(self.class_names, self.colors or {})
        mpp = float(self.mpp)
        if not (math.isfinite(mpp) and mpp > 0):
            raise InputError(f"{self.stem}: mpp must be a positive number of µm per pixel; got {self.mpp!r}")
        self.mpp = mpp
        w, h = (int(v) for v in self.size)
        if w <= 0 or h <= 0:
            raise InputError(f"{self.stem}: size must be a positive (width, height); got {self.size!r}")
        self.size = (w, h)
        for what in ("thumb_downsample", "tissue_downsample"):
            v = float(getattr(self, what))
            if not (math.isfinite(v) and v > 0):
                raise InputError(f"{self.stem}: {what} must be a positive number; got {v!r}")
            setattr(self, what, v)
        if self.thumbnail is not None:
            t = np.asarray(self.thumbnail)
            if t.ndim != 3 or t.shape[2] != 3 or t.dtype != np.uint8:
                raise InputError(f"{self.stem}: thumbnail must be an (h, w, 3) uint8 RGB array; "
                                 f"got {t.dtype} {t.shape}")
        if self.tissue_mask is not None and np.asarray(self.tissue_mask).ndim != 2:
            raise InputError(f"{self.stem}: tissue mask must be a 2-d array; got shape {np.shape(self.tissue_mask)}")
        if self.tissue_area_um2 is not None:
            a = float(self.tissue_area_um2)
            if not (math.isfinite(a) and a >= 0):
                raise InputError(f"{self.stem}: tissue area must be >= 0 µm²; got {self.tissue_area_um2!r}")
            self.tissue_area_um2 = a
        if self.roi_areas_um2 is not None:
            self.roi_areas_um2 = {str(k): float(v) for k, v in self.roi_areas_um2.items()}

    def final_path(self, suffix: str) -> Path:
        """``out_dir / f"{stem}{suffix}"``."""
        return self.out_dir / f"{self.stem}{suffix}"


class Sink(ABC):
    """One output file of one input, written chunk by chunk (see the module docstring).

    Subclasses set :attr:`suffix` (or override :meth:`suffix_for` when it depends on the
    kind) and implement :meth:`_write` and :meth:`_finish`; a subclass that writes a stream
    opens it with :meth:`_open_tmp`. :meth:`write` and :meth:`close` abort the sink when they
    fail, so a failed output never leaves a file (final or temporary) behind.
    """

    suffix: ClassVar[str] = ""
    #: whether the output keeps each nucleus's point features (the run then asks the stream for them)
    stores_features: ClassVar[bool] = False

    def __init__(self, info: OutputInfo) -> None:
        self.info = info
        self.suffix = type(self).suffix_for(info.kind)  # type: ignore[misc]  # instance value may differ by kind
        self._path = info.final_path(self.suffix)
        self._tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}.tmp")
        self._fh: IO[bytes] | None = None
        self._state = "open"  # -> "closed" | "aborted"

    # ------------------------------------------------------------------ naming
    @classmethod
    def suffix_for(cls, kind: str) -> str:
        """File suffix of this sink's output for an input of ``kind``."""
        return cls.suffix

    @classmethod
    def check_available(cls) -> None:
        """Raise :class:`InputError` when an optional dependency of this sink is missing."""

    @property
    def path(self) -> Path:
        """The final path of the output (exists only after :meth:`close`)."""
        return self._path

    # --------------------------------------------------------------- lifecycle
    def write(self, chunk: Nuclei) -> None:
        """Add a chunk of nuclei (``xy`` level-0 px, classes in ``info.class_names``)."""
        self._check_open("write")
        if not isinstance(chunk, Nuclei):
            self.abort()
            raise InputError(f"{self._path}: a chunk must be a Nuclei; got {type(chunk).__name__}")
        try:
            self._check_chunk(chunk)
            self._write(chunk)
        except BaseException:
            self.abort()
            raise

    def close(self, summary: dict[str, Any]) -> Path:
        """Finish the output, move it into place atomically and return its final path.

        Args:
            summary: run facts from the pipeline (used by :class:`~denuc.sinks.SummarySink`).
        """
        self._check_open("close")
        try:
            self._finish(summary)
            if self._fh is not None:
                self._fh.close()
                self._fh = None
            self._commit()
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return self._path

    def abort(self) -> None:
        """Drop the output: close and remove the temporary file. Safe to call more than once,
        and after :meth:`close` (then it does nothing)."""
        if self._state == "closed":
            return
        self._state = "aborted"
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except Exception:  # a failing close must not hide the error that made us abort
                pass
        try:
            self._tmp.unlink(missing_ok=True)
        except OSError:
            pass

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None:
            self.abort()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self._path)!r}, {self._state})"

    # ------------------------------------------------------------ for subclasses
    def _commit(self) -> None:
        """Move the complete temporary output into place (an atomic rename over the final path)."""
        os.chmod(self._tmp, file_mode())
        os.replace(self._tmp, self._path)

    def _open_tmp(self) -> IO[bytes]:
        """Open the temporary file for binary writing (it is closed and moved on close)."""
        try:
            self._fh = open(self._tmp, "wb")  # noqa: SIM115  # closed by close()/abort()
        except OSError as e:
            self._state = "aborted"
            raise InputError(f"{self._path}: cannot write ({e.strerror or e})") from None
        return self._fh

    def _check_open(self, what: str) -> None:
        if self._state != "open":
            raise DenucError(f"{self._path}: cannot {what}, the output is already {self._state}")

    def _check_chunk(self, chunk: Nuclei) -> None:
        if len(chunk) and chunk.class_ids is not None and chunk.class_names != self.info.class_names:
            raise InputError(f"{self._path}: a chunk has classes {list(chunk.class_names)}; "
                             f"this output's are {list(self.info.class_names)}")
        if len(chunk) and chunk.roi is not None and self.info.roi_areas_um2 is None:
            raise InputError(f"{self._path}: a chunk has ROI names but the output was opened without ROIs "
                             f"(OutputInfo.roi_areas_um2 is None)")

    @abstractmethod
    def _write(self, chunk: Nuclei) -> None:
        """Add one chunk (already checked: classes match ``info.class_names`` when non-empty)."""

    @abstractmethod
    def _finish(self, summary: dict[str, Any]) -> None:
        """Complete the temporary file ``self._tmp`` (streams: write the tail; others: write it)."""


def class_ids_of(chunk: Nuclei) -> np.ndarray:
    """``(N,)`` int64 class ids of a chunk, ``-1`` (no class) everywhere when it has none."""
    if chunk.class_ids is None:
        return np.full(len(chunk), -1, dtype=np.int64)
    return chunk.class_ids


def roi_of(chunk: Nuclei) -> np.ndarray:
    """``(N,)`` object array of ROI names of a chunk, ``""`` everywhere when it has none."""
    if chunk.roi is None:
        return np.full(len(chunk), "", dtype=object)
    return chunk.roi
