"""One table for a cohort: merge the per-input ``<stem>.summary.json`` files into ``summary.csv``.

Each processed input leaves ``<stem>.summary.json`` in the output folder (a JSON object:
counts, densities, the image's mpp and size, ...). :func:`write_summary_table` flattens each into
one row, nested objects into dotted columns (``{"count": {"tumor": 3}}`` -> ``count.tumor``), and
keeps only fields that describe results: keys in :data:`EXCLUDED_KEYS` (timings, hosts, process
ids, clock times) are dropped at any depth. The table is therefore the same byte for byte whether
one process or many, on any hosts, in any order, produced the summaries.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from denuc.cohort.inputs import input_stem
from denuc.core.files import atomic_write_text
from denuc.errors import InputError

#: Suffix of the per-input summary files.
SUMMARY_SUFFIX = ".summary.json"
#: Name of the merged table in the output folder.
TABLE_NAME = "summary.csv"
#: Keys (at any depth) that describe how and where a run went, not its results.
EXCLUDED_KEYS = frozenset({"timings", "timing", "timings_ms", "wall_s", "resumed_tiles", "profile", "host", "pid",
                           "started", "finished", "elapsed", "fingerprint"})
#: First column: the input's stem (outputs are named ``<stem>.*``).
STEM_COLUMN = "stem"


def _cell(v: Any) -> str:
    """A JSON value as CSV text: ``null`` -> empty, booleans ``true``/``false``, numbers in
    their shortest round-trip form, lists as compact JSON."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, (int, str)):
        return str(v)
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def flatten_summary(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``d`` as ``column -> cell text``: nested objects become ``parent.child`` columns (in the
    file's key order), lists JSON text; :data:`EXCLUDED_KEYS` are dropped at any depth."""
    out: dict[str, str] = {}
    for k, v in d.items():
        if k in EXCLUDED_KEYS:
            continue
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_summary(v, f"{name}."))
        else:
            out[name] = _cell(v)
    return out


def read_summary(path: Path) -> dict[str, Any]:
    """One ``<stem>.summary.json``. Raises :class:`InputError` naming it when it is not a JSON object."""
    try:
        d = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: cannot read summary ({getattr(e, 'strerror', None) or e})") from None
    if not isinstance(d, dict):
        raise InputError(f"{path}: summary is not a JSON object")
    return d


def write_summary_table(out_dir: str | os.PathLike[str], inputs: Sequence[str] | None = None) -> Path:
    """Merge the ``<stem>.summary.json`` files in ``out_dir`` into ``out_dir/summary.csv``.

    Args:
        inputs: restrict the table to these inputs (stems, or paths whose ``Path(x).stem`` is
            :func:`~denuc.cohort.inputs.input_stem` is used); an input without summary (not
            processed, or failed) gets a row with only its stem. ``None``: every summary in
            ``out_dir``.

    Returns:
        The table's path. One row per input sorted by stem; the first column ``stem``, then
        every field in the order first met (rows in stem order, each file's key order);
        missing fields are empty. Written atomically.

    Raises:
        InputError: ``out_dir`` is not a folder, a summary is not a JSON object, or (with
            ``inputs=None``) there is no summary.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: no such folder")
    found = {p.name[: -len(SUMMARY_SUFFIX)]: p for p in out_dir.glob(f"*{SUMMARY_SUFFIX}")
             if p.is_file() and not p.name.startswith(".")}
    if inputs is None:
        if not found:
            raise InputError(f"{out_dir}: no per-input summary (*{SUMMARY_SUFFIX}) to merge")
        stems = sorted(found)
    else:
        stems = sorted({Path(s).name if Path(s).name in found else input_stem(Path(s)) for s in inputs})
    rows: list[dict[str, str]] = []
    columns: dict[str, None] = {STEM_COLUMN: None}
    for stem in stems:
        row = flatten_summary(read_summary(found[stem])) if stem in found else {}
        row.pop(STEM_COLUMN, None)
        row = {STEM_COLUMN: stem, **row}
        columns.update(dict.fromkeys(row))
        rows.append(row)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return atomic_write_text(out_dir / TABLE_NAME, buf.getvalue())
