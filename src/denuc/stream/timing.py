"""Per-stage wall-clock timing that waits for the GPU (so a stage's time is its own)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

#: stage names in pipeline order (as shown by ``denuc predict --profile``).
STAGES = ("plan", "tissue", "read", "wait", "detect", "encode", "query", "classify", "write")
#: stages timed in the loader threads: they overlap the main thread's stages (and each other).
OVERLAPPED = ("read",)


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
        """A printable per-stage table. With the wall time: the main thread's stages as shares of
        it plus ``other`` (untimed work: stain estimate, journal, ...), which add up to 100 %;
        then the stages of the loader threads (:data:`OVERLAPPED`), which run at the same time
        as those, as busy time (summed over threads) next to the wall."""
        d = self.as_dict()
        main = {k: v for k, v in d.items() if k not in OVERLAPPED}
        side = {k: v for k, v in d.items() if k in OVERLAPPED}
        wall_ms = wall_s * 1e3 if wall_s else None

        def share(v: float) -> str:
            return f"{100 * v / wall_ms:6.1f}%" if wall_ms else ""

        rows = [f"{'stage':<10} {'ms':>12} {'share':>7}"]
        for s, v in main.items():
            rows.append(f"{s:<10} {v:>12.1f} {share(v):>7}")
        if wall_ms is not None:
            other = max(0.0, wall_ms - sum(main.values()))
            rows.append(f"{'other':<10} {other:>12.1f} {share(other):>7}")
            rows.append(f"{'wall':<10} {wall_ms:>12.1f} {share(wall_ms):>7}")
        if side:
            rows.append("loader threads, overlapping the stages above (busy time summed over threads):")
            for s, v in side.items():
                rows.append(f"{s:<10} {v:>12.1f} {share(v):>7}")
        return "\n".join(rows)
