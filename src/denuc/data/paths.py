"""Where the project's shared real data lives (tests, benchmarks)."""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[3]


def shared_data_dir() -> Path:
    """``$DENUC_DATA`` if set, else ``<repo>/../shared/data`` (may not exist on a bare clone)."""
    env = os.environ.get("DENUC_DATA")
    return Path(env) if env else _REPO.parent / "shared" / "data"


def brca_m2c_dir() -> Path:
    """The BRCA-M2C folder under :func:`shared_data_dir`."""
    return shared_data_dir() / "brca-m2c"
