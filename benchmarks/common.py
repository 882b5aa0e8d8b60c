"""Shared output step of the benchmark scripts: provenance fields and atomic JSON writes.

Every benchmark writes ``benchmarks/results/<name>.json`` (git-ignored); the numbers quoted in
README come from the copies in ``benchmarks/reported/``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from denuc.core.files import atomic_copy, atomic_write_text

HERE = Path(__file__).resolve().parent


def cpu_name() -> str:
    """The CPU model and core count, for a result's record."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{os.cpu_count()} cores"


def run_info(script: str, one_thread: bool = False) -> dict[str, Any]:
    """``command`` (this invocation, re-runnable), ``python`` and ``torch`` versions."""
    import torch

    prefix = "OMP_NUM_THREADS=1 " if one_thread else ""
    return {"command": f"{prefix}python benchmarks/{script} " + shlex.join(sys.argv[1:]),
            "python": platform.python_version(), "torch": torch.__version__}


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON to ``path`` atomically and say so."""
    atomic_write_text(path, json.dumps(payload, indent=2))
    print(f"wrote {path}")
    return path


def write_result(name: str, result: dict[str, Any], report: bool) -> Path:
    """Write ``benchmarks/results/<name>.json``; with ``report`` also copy it to ``reported/``."""
    out = write_json(HERE / "results" / f"{name}.json", result)
    if report:
        atomic_copy(out, HERE / "reported" / out.name)
    return out
