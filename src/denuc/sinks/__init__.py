"""Output writers ("sinks") of a run: nucleus tables, QuPath detections, a summary and an overlay,
each written chunk by chunk with memory bounded by one chunk, and moved into place atomically.

Typical use by a pipeline::

    info = OutputInfo(stem, out_dir, "slide", class_names, colors, mpp, (width, height), thumbnail=...)
    sinks = output_sinks(info, parse_formats("csv,geojson"))
    try:
        for chunk in chunks:            # Nuclei, xy in level-0 px, in any order
            for s in sinks:
                s.write(chunk)
        paths = [s.close(run_facts) for s in sinks]
    except BaseException:
        for s in sinks:
            s.abort()
        raise
"""

from denuc.sinks.base import KINDS, OutputInfo, Sink
from denuc.sinks.formats import ALWAYS, SINKS, output_paths, output_sinks, parse_formats
from denuc.sinks.geojson import GeoJsonSink
from denuc.sinks.overlay import OverlaySink, thumbnail_of
from denuc.sinks.summary import SummarySink
from denuc.sinks.tabular import CsvSink, ParquetSink

__all__ = [
    "ALWAYS",
    "KINDS",
    "SINKS",
    "CsvSink",
    "GeoJsonSink",
    "OutputInfo",
    "OverlaySink",
    "ParquetSink",
    "Sink",
    "SummarySink",
    "output_paths",
    "output_sinks",
    "parse_formats",
    "thumbnail_of",
]
