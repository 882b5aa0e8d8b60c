"""QuPath detections streamed chunk by chunk: :class:`GeoJsonSink`.

Slides get ``<stem>.geojson.gz`` (gzip, which QuPath reads), images ``<stem>.geojson``. The
file is one ``FeatureCollection`` written as ``{"type":"FeatureCollection","features":[``,
then the features of each chunk as it comes, then ``]}``, so memory holds one chunk. The
features are those of :func:`denuc.export.geojson.geojson_features` (QuPath ``detection``
objects, ``Point`` geometry in level-0 pixels, classification name and colour, measurements
"Detection score", "Class probability", "Score (detection x class)", "Prob <class>", UUID4
ids).
"""

from __future__ import annotations

import gzip
from typing import IO, Any

from denuc.core.result import Nuclei
from denuc.export.geojson import check_finite, dumps_json, geojson_features
from denuc.sinks.base import OutputInfo, Sink

HEAD = b'{"type":"FeatureCollection","features":['
TAIL = b"]}\n"
#: zlib level of ``.geojson.gz``: on DeNuC's features 3 takes half the time of the default 6
#: for a file about 10% larger (random UUIDs and scores compress poorly at any level).
GZIP_LEVEL = 3
#: Nuclei turned into feature dicts at a time: the dicts take ~2 kB per nucleus, so a chunk is
#: written in batches of this many to keep memory well below the chunk's dicts.
BATCH = 8192


class GeoJsonSink(Sink):
    """``<stem>.geojson.gz`` (slides) or ``<stem>.geojson`` (images) of QuPath detections."""

    suffix = ".geojson"

    @classmethod
    def suffix_for(cls, kind: str) -> str:
        return ".geojson.gz" if kind == "slide" else ".geojson"

    def __init__(self, info: OutputInfo) -> None:
        super().__init__(info)
        raw = self._open_tmp()
        self._out: IO[bytes] = raw
        self._gz: gzip.GzipFile | None = None
        self._first = True
        self.features = 0
        try:
            if self.suffix.endswith(".gz"):
                # no name or time stamp in the gzip header: equal features give equal bytes
                self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=GZIP_LEVEL, mtime=0)
                self._out = self._gz
            self._out.write(HEAD)
        except BaseException:
            self.abort()
            raise

    def _write(self, chunk: Nuclei) -> None:
        if not len(chunk):
            return
        check_finite(chunk, self._path)
        for start in range(0, len(chunk), BATCH):
            part = chunk.select(slice(start, start + BATCH))
            body = memoryview(dumps_json(geojson_features(part, self.info.colors)))  # b"[{...},{...}]"
            if not self._first:
                self._out.write(b",")
            self._out.write(body[1:-1])
            self._first = False
            self.features += len(part)

    def _finish(self, summary: dict[str, Any]) -> None:
        self._out.write(TAIL)
        if self._gz is not None:
            self._gz.close()  # writes the gzip trailer; leaves the raw file open
            self._gz = None

    def abort(self) -> None:
        gz, self._gz = getattr(self, "_gz", None), None
        if gz is not None:
            try:
                gz.close()
            except Exception:  # the error that made us abort matters, not this one
                pass
        super().abort()
