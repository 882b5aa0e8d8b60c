"""What the processes that tests/test_cohort.py starts run (``spawn``: each imports this module,
which imports no more than the claims need, so that they start quickly)."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

from denuc.cohort.claims import claimed_inputs, try_claim


def claim_and_report(out: str, stem: str, q: mp.Queue, done: Any = None) -> None:
    c = try_claim(Path(out), stem)
    q.put(None if c is None else c.token)
    if c is not None and done is not None:
        done.wait(30)
        q.put(c.heartbeat())
        c.release()


def beat_then_fall_silent(out: str, stem: str, q: mp.Queue, beating: Any, done: Any) -> None:
    c = try_claim(Path(out), stem)
    q.put(None if c is None else c.token)
    if c is not None:
        beating.set()
        for _ in range(10):
            time.sleep(0.1)
            c.heartbeat()
        beating.clear()
        done.wait(30)
        c.release()


def claim_and_die(out: str, stem: str) -> None:
    c = try_claim(Path(out), stem)
    assert c is not None
    os._exit(0)  # no release


ROUNDS = 40


def race(out: str, stale_after: float, barrier: Any, q: mp.Queue) -> None:
    won = []
    for r in range(ROUNDS):
        barrier.wait(30)
        won.append(try_claim(Path(out), f"s{r}", stale_after=stale_after) is not None)
    q.put(won)


def worker(inputs: list[str], out: str, rank: int, world_size: int) -> None:
    def done(p: Path) -> bool:
        return (Path(out) / f"{p.stem}.done").exists()

    for p, claim in claimed_inputs([Path(x) for x in inputs], Path(out), done, rank, world_size):
        with open(Path(out) / "log.txt", "a") as f:  # appends of one short line are atomic
            f.write(f"{rank} {p.stem}\n")
        time.sleep(0.01)
        (Path(out) / f"{p.stem}.done").write_text("ok")
        claim.release()
