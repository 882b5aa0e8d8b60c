"""Table outputs, one row per nucleus: :class:`CsvSink` (``<stem>.csv``) and
:class:`ParquetSink` (``<stem>.parquet``).

Columns, in order: ``x, y`` (level-0 px, (x, y) = (column, row)), ``x_um, y_um``
(``x * mpp``, ``y * mpp``: µm from the top-left edge of level 0), ``class`` (name),
``score`` (detection score x class probability for classified nuclei), ``det_score`` (the
detector's own confidence), ``prob_<class>`` (one per class), ``roi`` (region name).

* ``x ... class`` are always there; ``roi`` exactly when the input has regions of interest
  (``OutputInfo.roi_areas_um2`` is not None).
* ``score``, ``det_score`` and ``prob_<class>`` follow the first chunk that has nuclei
  (present when its field is); every later chunk with nuclei must carry the same fields.
  An output without nuclei gets those of the first (empty) chunk written to it.

The CSV numbers are written as :meth:`Nuclei.to_csv <denuc.core.Nuclei.to_csv>` writes them
(shortest text that reads back to the same float64 / float32), so
:meth:`Nuclei.read_csv <denuc.core.Nuclei.read_csv>` (what ``denuc evaluate`` reads) gets the
nuclei back exactly; it ignores ``x_um``/``y_um``. Unclassified nuclei and nuclei outside
every ROI have empty ``class``/``roi`` cells in the CSV and nulls in Parquet.
"""

from __future__ import annotations

import csv
import io
import json
from abc import abstractmethod
from typing import Any

import numpy as np

from denuc.core.result import Nuclei
from denuc.errors import InputError
from denuc.sinks.base import OutputInfo, Sink, class_ids_of, roi_of

#: Optional columns a chunk can carry: (score, det_score, prob_<class>...).
Fields = tuple[bool, bool, bool]


def chunk_fields(chunk: Nuclei, class_names: tuple[str, ...]) -> Fields:
    """Which optional columns ``chunk`` fills: ``(score, det_score, probs)``."""
    return (chunk.scores is not None, chunk.det_scores is not None,
            chunk.probs is not None and chunk.class_names == class_names)


def _describe(f: Fields) -> str:
    names = [n for n, on in zip(("score", "det_score", "prob_*"), f) if on]
    return "{" + ", ".join(names) + "}"


class TableSink(Sink):
    """A sink whose output is a table with the columns of the module docstring."""

    def __init__(self, info: OutputInfo) -> None:
        super().__init__(info)
        self._fields: Fields | None = None  # fixed by the first chunk with nuclei
        self._fallback: Fields | None = None  # the first empty chunk's, for an output without nuclei
        self.rows = 0

    def column_names(self) -> list[str]:
        """The columns of this output (final once the first chunk with nuclei was written)."""
        score, det, probs = self._fields or (False, False, False)
        cols = ["x", "y", "x_um", "y_um", "class"]
        cols += ["score"] * score + ["det_score"] * det
        cols += [f"prob_{c}" for c in self.info.class_names] if probs else []
        return cols + ["roi"] * (self.info.roi_areas_um2 is not None)

    def columns_of(self, chunk: Nuclei) -> dict[str, np.ndarray]:
        """Column name -> ``(N,)`` array of ``chunk`` (``class`` as int64 ids, -1 = none;
        ``roi`` as an object array of names, ``""`` = none)."""
        score, det, probs = self._fields or (False, False, False)
        mpp = self.info.mpp
        cols: dict[str, np.ndarray] = {"x": chunk.xy[:, 0], "y": chunk.xy[:, 1],
                                       "x_um": chunk.xy[:, 0] * mpp, "y_um": chunk.xy[:, 1] * mpp,
                                       "class": class_ids_of(chunk)}
        if score:
            assert chunk.scores is not None
            cols["score"] = chunk.scores
        if det:
            assert chunk.det_scores is not None
            cols["det_score"] = chunk.det_scores
        if probs:
            assert chunk.probs is not None
            for j, c in enumerate(self.info.class_names):
                cols[f"prob_{c}"] = chunk.probs[:, j]
        if self.info.roi_areas_um2 is not None:
            cols["roi"] = roi_of(chunk)
        return cols

    def _write(self, chunk: Nuclei) -> None:
        f = chunk_fields(chunk, self.info.class_names)
        if not len(chunk):
            if self._fallback is None:
                self._fallback = f
            return
        if self._fields is None:
            self._fields = f
            self._start()
        elif f != self._fields:
            raise InputError(f"{self._path}: a chunk carries {_describe(f)} but the first one carried "
                             f"{_describe(self._fields)}; every chunk must have the same fields")
        self._rows(self.columns_of(chunk))
        self.rows += len(chunk)

    def _finish(self, summary: dict[str, Any]) -> None:
        if self._fields is None:
            self._fields = self._fallback or (False, False, False)
            self._start()
        self._end()

    @abstractmethod
    def _start(self) -> None:
        """Open the temporary file and write what precedes the rows (columns are final now)."""

    @abstractmethod
    def _rows(self, cols: dict[str, np.ndarray]) -> None:
        """Append the rows of one non-empty chunk (see :meth:`columns_of`)."""

    def _end(self) -> None:
        """Write what follows the rows (the file is closed and moved by :meth:`Sink.close`)."""


class CsvSink(TableSink):
    """``<stem>.csv``: the columns of the module docstring, header first (also without nuclei)."""

    suffix = ".csv"

    def __init__(self, info: OutputInfo) -> None:
        super().__init__(info)
        self._open_tmp()  # now: an unwritable folder fails before any work
        self._names = np.array([*info.class_names, ""], dtype=object)  # id -1 -> ""

    def _start(self) -> None:
        assert self._fh is not None
        self._fh.write(csv_text({c: np.zeros(0) for c in self.column_names()}, header=True).encode("utf-8"))

    def _rows(self, cols: dict[str, np.ndarray]) -> None:
        cols["class"] = self._names[cols["class"]]
        assert self._fh is not None
        self._fh.write(csv_text(cols, header=False).encode("utf-8"))


def _cell_texts(v: np.ndarray) -> list[str]:
    """The CSV text of each value of a column: floats as their shortest exact text (numpy's, the
    text ``pandas.DataFrame.to_csv`` and so :meth:`Nuclei.to_csv <denuc.core.Nuclei.to_csv>` write;
    NaN as an empty cell), integers in decimal, anything else as ``str`` (None as empty)."""
    if v.dtype.kind == "f":
        t = v.astype(str)
        nan = np.isnan(v)
        return (np.where(nan, "", t) if nan.any() else t).tolist()
    if v.dtype.kind in "iub":
        return v.astype(str).tolist()
    return ["" if x is None else str(x) for x in v.tolist()]


def csv_text(cols: dict[str, np.ndarray], header: bool) -> str:
    """Rows of ``cols`` (column name -> ``(N,)`` array, all the same N) as CSV text, ``\\n`` line
    ends, fields quoted only where needed: byte for byte what ``pandas.DataFrame(cols).to_csv(
    index=False, header=header)`` writes, without importing pandas (about 0.5 s of a command's
    start)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if header:
        w.writerow(list(cols))
    texts = [_cell_texts(np.asarray(v)) for v in cols.values()]
    if texts and texts[0]:
        w.writerows(zip(*texts, strict=True))
    return buf.getvalue()


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise InputError("Parquet output needs pyarrow: pip install denuc[parquet]") from None
    return pyarrow


class ParquetSink(TableSink):
    """``<stem>.parquet`` (needs pyarrow: ``pip install denuc[parquet]``), one row group per
    chunk with nuclei.

    Types: ``x, y, x_um, y_um`` float64; ``class`` dictionary<int32, string> over the class
    vocabulary (null = no class); ``score, det_score, prob_*`` float32; ``roi`` string
    (null = outside every ROI). The schema's metadata key ``denuc`` holds JSON with ``stem``,
    ``kind``, ``mpp``, ``size`` (level-0 width, height), ``class_names`` and ``colors``.
    """

    suffix = ".parquet"

    @classmethod
    def check_available(cls) -> None:
        _pyarrow()

    def __init__(self, info: OutputInfo) -> None:
        self._pa = _pyarrow()
        super().__init__(info)
        self._open_tmp()
        self._writer: Any = None
        self._dictionary = self._pa.array(list(info.class_names), type=self._pa.string())

    def _schema(self) -> Any:
        pa = self._pa
        f64, f32 = pa.float64(), pa.float32()
        types = {"x": f64, "y": f64, "x_um": f64, "y_um": f64, "class": pa.dictionary(pa.int32(), pa.string()),
                 "score": f32, "det_score": f32, "roi": pa.string()}
        i = self.info
        meta = {"stem": i.stem, "kind": i.kind, "mpp": i.mpp, "size": list(i.size),
                "class_names": list(i.class_names), "colors": {k: list(v) for k, v in i.colors.items()}}
        return pa.schema([(c, types.get(c, f32)) for c in self.column_names()],
                         metadata={"denuc": json.dumps(meta)})

    def _start(self) -> None:
        import pyarrow.parquet as pq

        self._arrow_schema = self._schema()
        self._writer = pq.ParquetWriter(self._fh, self._arrow_schema)

    def _rows(self, cols: dict[str, np.ndarray]) -> None:
        pa = self._pa
        ids = cols["class"]
        arrays: dict[str, Any] = dict(cols)
        arrays["class"] = pa.DictionaryArray.from_arrays(pa.array(ids.astype(np.int32), mask=ids < 0),
                                                         self._dictionary)
        if "roi" in cols:
            roi = cols["roi"]
            arrays["roi"] = pa.array(roi, type=pa.string(), mask=roi == "")
        table = pa.Table.from_pydict(arrays, schema=self._arrow_schema)
        self._writer.write_table(table, row_group_size=len(ids))

    def _end(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        w, self._writer = getattr(self, "_writer", None), None
        if w is not None:
            try:
                w.close()
            except Exception:  # the error that made us abort matters, not this one
                pass
        super().abort()
