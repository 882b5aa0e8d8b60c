"""Per-stage wall-clock timing that waits for the GPU (so a stage's time is its own)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

#: stage names in pipeline order (as shown by ``denuc predict --profile``).
STAGES = ("plan", "tissue", "read", "wait", "detect", "encode", "query", "classify", "write")


class StageTimer:
    """Milliseconds per stage, summed over a run.

    ``with timer("detect"): ...`` adds the block's wall time. On CUDA the device is synchronised
    before the clock is read at both ends, so asynchronous kernels count in the stage that
    launched them. ``read`` is summed over loader threads (it overlaps the other stages);
    ``wait`` is the time the main loop waited for data.
    """

    def __init__(self, device: object = None) -> None:
        self.ms: dict[str, float] = defaultdict(float)
        self._cuda = False
        try:
            import torch

            self._cuda = device is not None and torch.device(device).type == "cuda"  # type: ignore[arg-type]
        except (ImportError, TypeError, RuntimeError):
            self._cuda = False

    def _sync(self) -> None:
        if self._cuda:
            import torch

            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.ms[stage] += (time.perf_counter() - t0) * 1e3

    def add(self, stage: str, ms: float) -> None:
        self.ms[stage] += float(ms)

    def as_dict(self) -> dict[str, float]:
        order = [s for s in STAGES if s in self.ms] + sorted(s for s in self.ms if s not in STAGES)
        return {s: round(self.ms[s], 2) for s in order}

    def table(self, wall_s: float | None = None) -> str:
        """A printable per-stage table (ms and share of the wall time when given)."""
        rows = [f"{'stage':<10} {'ms':>12} {'share':>7}"]
        for s, v in self.as_dict().items():
            share = f"{100 * v / (wall_s * 1e3):6.1f}%" if wall_s else ""
            rows.append(f"{s:<10} {v:>12.1f} {share:>7}")
        if wall_s is not None:
            rows.append(f"{'wall':<10} {wall_s * 1e3:>12.1f}")
        return "\n".join(rows)
