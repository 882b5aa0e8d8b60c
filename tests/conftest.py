"""Shared fixtures. Real-data tests skip with a reason when ../shared/data is absent."""

from __future__ import annotations

import os

# One thread per test process: `make test` runs two pytest workers (pytest-xdist) on the two
# cores, and the processes tests spawn inherit the setting (results compared across processes
# are computed with the same thread count). Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest

from denuc.data.paths import brca_m2c_dir

# The suite runs the PyTorch reference wherever the runtime is "auto" (ONNX exports take seconds
# per model and results equal PyTorch's only to float32 rounding); tests/test_runtime.py checks the
# ONNX Runtime path against it.
os.environ.setdefault("DENUC_RUNTIME", "torch")

# Property tests draw new examples on every run here; under CI (CI set) they draw a fixed
# sequence, so a CI result can be reproduced and does not depend on luck.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="session")
def brca_dir() -> Path:
    """The BRCA-M2C folder; skips the test when it is not present on this machine."""
    d = brca_m2c_dir()
    if not (d / "brca_ds_test.txt").is_file():
        pytest.skip(f"real data not found at {d} (set DENUC_DATA to the folder holding brca-m2c/)")
    return d


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random detector checkpoint (score threshold 0.3), one per test module."""
    from model_fixtures import tiny_detector_checkpoint

    return tiny_detector_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", score_threshold=0.3)
