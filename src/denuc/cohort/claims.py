"""Exclusive claims on inputs, shared through the output folder by processes on any hosts.

Processes that share an output folder (a local disk, or a shared file system such as NFS or
Lustre for several hosts) agree on who processes which input without talking to each other:
before working on input ``STEM`` a process creates ``OUT/.STEM.claim`` with
``O_CREAT | O_EXCL``, which only one process can do; the file holds JSON
``{host, node, pid, started, heartbeat, token}``. The owner refreshes the heartbeat while it
works (:meth:`Claim.heartbeat`, e.g. once per chunk of a slide) and removes the file when done
(:meth:`Claim.release`).

A claim is **stale**, and another process takes it over, when

* its owner ran on this machine (same host name, boot and PID namespace) and its PID is no
  longer alive (a crash, ``kill -9``), or
* its heartbeat is older than ``stale_after`` seconds (default :data:`STALE_AFTER` = 600 s):
  the owner's host died or lost the file system. The age is measured from the later of the
  heartbeat written in the file and the file's modification time, so moderate clock skew
  between hosts makes claims look younger, never older. An owner that works longer than
  ``stale_after`` without calling :meth:`Claim.heartbeat` loses its claim; use
  :meth:`Claim.start_heartbeat` around long steps.

Taking over is atomic: a taker first creates the lock ``OUT/.STEM.claim.<token>.takeover``
with ``O_EXCL`` (``<token>`` identifies the stale claim, so of several takers racing for the
same stale claim exactly one gets the lock), checks the claim is still the stale one, renames
it to a unique tombstone, removes the tombstone and creates its own claim with ``O_EXCL``.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from denuc.cohort.inputs import input_stem, shard
from denuc.core.files import pid_alive
from denuc.errors import InputError

#: Seconds without heartbeat after which another process takes a claim over.
STALE_AFTER = 600.0
#: Seconds after which a claim file that holds no valid claim (its writer died) is stale.
EMPTY_CLAIM_GRACE_S = 30.0


def claim_path(out_dir: Path, stem: str) -> Path:
    """Where the claim on input ``stem`` lives: ``out_dir / f".{stem}.claim"``."""
    return Path(out_dir) / f".{stem}.claim"


def _read_first_line(path: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.readline().strip()
    except OSError:
        return ""


def _node_id() -> str:
    """Identifies this kernel boot and PID namespace: two processes with the same host name and
    node id see the same PIDs, so one can test whether the other's PID is alive."""
    boot = _read_first_line("/proc/sys/kernel/random/boot_id")
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = ""
    return f"{boot}|{pidns}"


_HOST = socket.gethostname()
_NODE = _node_id()


@dataclass(frozen=True)
class ClaimInfo:
    """What a claim file says, as read by any process. ``token`` is ``None`` for a file that is
    not (yet) valid JSON, e.g. read between its creation and its first write."""

    token: str | None
    host: str | None
    node: str | None
    pid: int | None
    started: float | None
    heartbeat: float | None
    mtime: float
    ident: str  # token, or file identity for an unreadable claim

    def age(self, now: float | None = None) -> float:
        """Seconds since the later of the written heartbeat and the file's modification time."""
        now = time.time() if now is None else now
        return now - max(self.heartbeat or 0.0, self.mtime)

    def owner_dead(self) -> bool:
        """The owner ran on this machine (same host, boot and PID namespace) and is gone."""
        return (self.host == _HOST and self.node == _NODE and self.pid is not None
                and self.pid != os.getpid() and not pid_alive(self.pid))

    def is_stale(self, stale_after: float = STALE_AFTER) -> bool:
        if self.token is None and self.age() > min(stale_after, EMPTY_CLAIM_GRACE_S):
            return True  # never completed: its creator died between creating and writing it
        return self.owner_dead() or self.age() > stale_after


def read_claim(path: Path) -> ClaimInfo | None:
    """The claim at ``path``, or ``None`` when there is none."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
    finally:
        os.close(fd)
    try:
        d = json.loads(raw.decode("utf-8"))
        if not isinstance(d, dict):
            raise ValueError
    except ValueError:
        d = {}

    def num(k: str) -> float | None:
        v = d.get(k)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    token = d.get("token") if isinstance(d.get("token"), str) else None
    pid = d.get("pid")
    return ClaimInfo(
        token=token,
        host=d.get("host") if isinstance(d.get("host"), str) else None,
        node=d.get("node") if isinstance(d.get("node"), str) else None,
        pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        started=num("started"), heartbeat=num("heartbeat"), mtime=st.st_mtime,
        ident=token if token and token.isalnum() else f"i{st.st_ino}m{st.st_mtime_ns}s{st.st_size}",
    )


@dataclass
class Claim:
    """This process's exclusive claim on input ``stem`` in ``out_dir`` (see the module doc).

    Made by :func:`try_claim`. A context manager: leaving the ``with`` block releases it.
    """

    out_dir: Path
    stem: str
    token: str
    started: float
    _released: bool = field(default=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _stop: threading.Event | None = field(default=None, repr=False)

    @property
    def path(self) -> Path:
        return claim_path(self.out_dir, self.stem)

    def _payload(self) -> bytes:
        now = time.time()
        return json.dumps({"host": _HOST, "node": _NODE, "pid": os.getpid(), "started": self.started,
                           "heartbeat": now, "token": self.token}).encode("utf-8")

    def held(self) -> bool:
        """The claim file is there and still ours (not released, not taken over)."""
        if self._released:
            return False
        info = read_claim(self.path)
        return info is not None and info.token == self.token

    def heartbeat(self) -> bool:
        """Refresh the claim's heartbeat so that no one takes it over.

        Returns:
            ``True`` while the claim is ours; ``False`` when it was released or taken over
            (this process was silent longer than ``stale_after``): the caller may stop, as
            another process now works on the input.
        """
        with self._lock:
            if not self.held():
                return False
            tmp = self.path.with_name(f"{self.path.name}.{self.token}.hb")
            tmp.write_bytes(self._payload())
            os.replace(tmp, self.path)
            return True

    def start_heartbeat(self, interval: float = 60.0) -> None:
        """Call :meth:`heartbeat` every ``interval`` seconds from a daemon thread until
        :meth:`release`: for owners with long steps between their own heartbeats."""
        if self._stop is not None:
            return
        stop = self._stop = threading.Event()

        def beat() -> None:
            while not stop.wait(interval):
                if not self.heartbeat():
                    return

        threading.Thread(target=beat, name=f"denuc-claim-{self.stem}", daemon=True).start()

    def release(self) -> bool:
        """Remove the claim file if it is still ours. Idempotent.

        Returns:
            ``True`` when this call removed it.
        """
        if self._stop is not None:
            self._stop.set()
        with self._lock:
            if self._released:
                return False
            self._released = True
            info = read_claim(self.path)
            if info is None or info.token != self.token:
                return False
            try:
                self.path.unlink()
            except FileNotFoundError:
                return False
            return True

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.release()


def _create(out_dir: Path, stem: str) -> Claim | None:
    """Create the claim file, complete, or ``None`` when it exists.

    The payload is written to a file of this process's own (``.<stem>.claim.<token>.<pid>.tmp``)
    and hard-linked to the claim's name, which fails when the name exists: the claim appears
    with its contents, so a process killed while claiming never leaves an empty claim that others
    would wait on. Where the file system has no hard links, the claim is created with
    ``O_EXCL`` and then written (an empty claim left by a kill is stale after
    :data:`EMPTY_CLAIM_GRACE_S`).
    """
    claim = Claim(out_dir=Path(out_dir), stem=stem, token=secrets.token_hex(16), started=time.time())
    tmp = claim.path.with_name(f"{claim.path.name}.{claim.token}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(claim._payload())
    except FileNotFoundError:
        raise InputError(f"{out_dir}: output folder does not exist") from None
    try:
        os.link(tmp, claim.path)
        return claim
    except FileExistsError:
        return None
    except OSError:  # no hard links here: exclusive create, then write
        pass
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(claim.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        return None
    try:
        os.write(fd, claim._payload())
    finally:
        os.close(fd)
    return claim


def _take_over(out_dir: Path, stem: str, stale: ClaimInfo, stale_after: float) -> Claim | None:
    """Replace the stale claim ``stale`` by ours, or ``None`` when another process wins."""
    path = claim_path(out_dir, stem)
    lock = path.with_name(f"{path.name}.{stale.ident}.takeover")
    try:
        os.close(os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except FileExistsError:
        # another taker is at work; one that died between its lock and its claim (a window of
        # microseconds) must not block the input forever: clear its lock for the next try
        try:
            if time.time() - lock.stat().st_mtime > stale_after:
                dead = lock.with_name(f"{lock.name}.{secrets.token_hex(8)}.dead")
                os.rename(lock, dead)
                dead.unlink()
        except OSError:
            pass
        return None
    try:
        cur = read_claim(path)
        if cur is None:
            return _create(out_dir, stem)
        if cur.ident != stale.ident:
            return None  # refreshed, released and re-made, or taken over meanwhile
        tomb = path.with_name(f"{path.name}.{secrets.token_hex(8)}.stale")
        try:
            os.rename(path, tomb)
        except FileNotFoundError:
            return _create(out_dir, stem)
        moved = read_claim(tomb)
        if moved is not None and moved.ident != stale.ident:
            # the stale owner released and a fresh claim appeared between the check and the
            # rename: put the fresh claim back (never over a newer one) and give way
            try:
                os.link(tomb, path)
            except OSError:
                pass
            tomb.unlink(missing_ok=True)
            return None
        tomb.unlink(missing_ok=True)
        return _create(out_dir, stem)
    finally:
        lock.unlink(missing_ok=True)


def try_claim(out_dir: Path, stem: str, stale_after: float = STALE_AFTER) -> Claim | None:
    """Claim input ``stem`` in ``out_dir`` for this process.

    Returns:
        The :class:`Claim` (release it when done), or ``None`` when another live process holds
        it. A stale claim (see the module doc) is taken over.
    """
    out_dir = Path(out_dir)
    for _ in range(4):
        claim = _create(out_dir, stem)
        if claim is not None:
            return claim
        info = read_claim(claim_path(out_dir, stem))
        if info is None:
            continue  # released between our attempt and the read: try again
        if not info.is_stale(stale_after):
            return None
        return _take_over(out_dir, stem, info, stale_after)
    return None


def claim_order(n: int, rank: int, world: int) -> list[int]:
    """Indices ``0 .. n-1`` in the order rank ``rank`` of ``world`` visits them: its own shard
    (``rank, rank + world, ...``) first, then the other ranks' shards, each from its end (they
    work from the front, so stealing from the back rarely meets them), in rank order after
    ``rank``."""
    idx = list(range(n))
    order = shard(idx, rank, world)
    for k in range(1, world):
        order += shard(idx, (rank + k) % world, world)[::-1]
    return order


def claimed_inputs(
    inputs: Sequence[Path],
    out_dir: Path,
    is_done: Callable[[Path], bool],
    rank: int,
    world: int,
    stale_after: float = STALE_AFTER,
) -> Iterator[tuple[Path, Claim]]:
    """Share ``inputs`` dynamically between processes writing to ``out_dir``.

    Every process (of any rank, on any host, also several runs started independently) calls
    this with the same ``inputs`` and gets the inputs it should process now: not done
    (``is_done(input)`` false, checked again after claiming, as another process may have just
    finished it) and not claimed by another live process. Rank ``rank`` of ``world`` visits its
    own static shard first, then the others' (:func:`claim_order`), so each rank works mostly
    on its own inputs and no rank idles while another has a queue.

    One pass: an input skipped because another live process held it is not revisited; inputs of
    a process that crashed are taken over by the next run over the same folder (immediately on
    the same host, after ``stale_after`` seconds elsewhere).

    Yields:
        ``(input, claim)``; process the input, then call ``claim.release()`` (a claim still held
        when the caller asks for the next input, or leaves the loop, is released then).
    """
    queue = ClaimQueue(inputs, out_dir, is_done, rank, world, stale_after)
    while (item := queue.next()) is not None:
        path, claim = item
        try:
            yield path, claim
        finally:
            claim.release()


class ClaimQueue:
    """The inputs of :func:`claimed_inputs` handed out one at a time to the threads of one
    process: :meth:`next` is thread-safe, and the claim it returns stays held until its caller
    releases it (so several threads each hold the claim of the input they run).

    Args: as :func:`claimed_inputs`.
    """

    def __init__(self, inputs: Sequence[Path], out_dir: Path, is_done: Callable[[Path], bool], rank: int,
                 world: int, stale_after: float = STALE_AFTER) -> None:
        self.inputs = [Path(p) for p in inputs]
        self.out_dir = Path(out_dir)
        self.is_done = is_done
        self.stale_after = stale_after
        self._order = iter(claim_order(len(self.inputs), rank, world))
        self._lock = threading.Lock()

    def next(self) -> tuple[Path, Claim] | None:
        """The next input not done and not held by another live process, claimed for this
        process (release the claim when done with it); None when there is none left."""
        with self._lock:
            for i in self._order:
                path = self.inputs[i]
                if self.is_done(path):
                    continue
                claim = try_claim(self.out_dir, input_stem(path), self.stale_after)
                if claim is None:
                    continue
                if self.is_done(path):  # another process finished it just before we claimed it
                    claim.release()
                    continue
                return path, claim
            return None
