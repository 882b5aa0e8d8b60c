"""Which sinks a run opens: the ``--format`` registry and the outputs every input always gets."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from denuc.errors import InputError
from denuc.sinks.anndata import AnnDataSink
from denuc.sinks.base import KINDS, OutputInfo, Sink
from denuc.sinks.density import DensitySink
from denuc.sinks.geojson import GeoJsonSink
from denuc.sinks.overlay import OverlaySink
from denuc.sinks.spatialdata import SpatialDataSink
from denuc.sinks.summary import SummarySink
from denuc.sinks.tabular import CsvSink, ParquetSink

#: ``--format`` name -> sink class (the nucleus tables / detections a user chooses).
SINKS: dict[str, type[Sink]] = {"csv": CsvSink, "geojson": GeoJsonSink, "parquet": ParquetSink, "h5ad": AnnDataSink,
                                "density": DensitySink, "spatialdata": SpatialDataSink}
#: Sinks every input gets besides the chosen formats (the overlay unless turned off).
ALWAYS: tuple[type[Sink], ...] = (SummarySink, OverlaySink)


def parse_formats(text: str) -> tuple[str, ...]:
    """``"geojson,csv,parquet"`` -> ``("geojson", "csv", "parquet")``: comma-separated names of
    :data:`SINKS`, spaces and case ignored, repeats dropped, order kept.

    Raises:
        InputError: an empty list or an unknown name (listing the choices), or a format whose
            optional dependency is missing (e.g. ``parquet`` without pyarrow).
    """
    names = [s.strip().lower() for s in str(text).split(",")]
    names = [s for s in names if s]
    choices = ", ".join(SINKS)
    if not names:
        raise InputError(f"--format {text!r}: give one or more of {choices}, comma-separated")
    unknown = [s for s in names if s not in SINKS]
    if unknown:
        raise InputError(f"--format {text!r}: unknown format(s) {unknown}; choose from {choices}, comma-separated")
    out = tuple(dict.fromkeys(names))
    for s in out:
        SINKS[s].check_available()
    return out


def _sink_classes(formats: Sequence[str], overlay: bool) -> list[type[Sink]]:
    for f in formats:
        if f not in SINKS:
            raise InputError(f"unknown output format {f!r}; choose from {', '.join(SINKS)}")
    return [SINKS[f] for f in dict.fromkeys(formats)] + [c for c in ALWAYS if overlay or c is not OverlaySink]


def output_sinks(info: OutputInfo, formats: Sequence[str], overlay: bool = True) -> list[Sink]:
    """Open the sinks of one input: one per format, then the summary and (unless ``overlay``
    is False) the overlay. If one cannot be opened, those already open are aborted."""
    sinks: list[Sink] = []
    try:
        for cls in _sink_classes(formats, overlay):
            sinks.append(cls(info))
    except BaseException:
        for s in sinks:
            s.abort()
        raise
    return sinks


def output_paths(stem: str, out_dir: str | os.PathLike[str], kind: str, formats: Sequence[str],
                 overlay: bool = True) -> list[Path]:
    """The final files a finished input has (in :func:`output_sinks` order): an input whose
    files all exist can be skipped."""
    if kind not in KINDS:
        raise InputError(f"{stem}: output kind must be one of {KINDS}; got {kind!r}")
    return [Path(out_dir) / f"{stem}{cls.suffix_for(kind)}" for cls in _sink_classes(formats, overlay)]
