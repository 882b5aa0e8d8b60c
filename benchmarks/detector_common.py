"""Shared output step of the detector benchmarks: JSON to results/ (and reported/)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def write_result(name: str, result: dict[str, Any], report: bool) -> Path:
    """Write ``benchmarks/results/<name>.json``; with ``report`` also copy it to ``reported/``."""
    out = HERE / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    if report:
        (HERE / "reported").mkdir(exist_ok=True)
        shutil.copy(out, HERE / "reported" / out.name)
    return out
