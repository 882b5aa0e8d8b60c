"""ONNX Runtime runner: each input shape is exported once to ONNX, cached on disk, and run on the CPU.

Export: ``torch.onnx.export`` of the module's method in eval mode (the ``torch.export``-based
exporter when ``onnxscript`` is installed, else the TorchScript one; see :func:`_export`),
batch dimension dynamic, the other dimensions fixed to the shape seen (TF-"same" padding and
anchors depend on them); the module's training flags are restored afterwards. A new export is
checked against the module on a random batch before use (:data:`CHECK_RTOL`), so a file that
does not reproduce the module is never cached.

Cache: ``$DENUC_CACHE/onnx`` (default ``~/.cache/denuc/onnx``), one file per key: the sha256 of
the weights (every tensor's name, dtype, shape and bytes), the module tree (``repr``), the top
module's settings, the source files of its classes, the method, the input shape and the
torch/onnx/opset versions. Files are written atomically (temporary name, then rename), and an
export holds a lock file (``<file>.lock``, :mod:`filelock`) so that processes and threads
starting together export each file once and the others wait for it; the export says so in one
line on stderr. After each export the cache is pruned to the :data:`CACHE_MAX_FILES` most
recently used files within :data:`CACHE_MAX_BYTES` (a file's modification time is refreshed
whenever it is used). A module whose weights change in place after the
first call (e.g. loading a state dict) is re-exported on its next call (tensors replaced by
new objects, rather than written in place, are not noticed: build a new runner then).

Threads: :func:`threads` (read at every call: a number of the calling thread's, set by
:func:`set_thread_threads`, else :func:`set_threads`'s, else ``torch.get_num_threads()``): a batch is split into that many parts
run in parallel on single-threaded sessions (:data:`SPLIT_BATCH`); a batch of one window runs on
a session with that many intra-op threads. No spin-waiting (:data:`SPIN`; spinning wastes shared
CPUs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import os
import re
import sys
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from denuc.core.files import atomic_target
from denuc.errors import ModelError
from denuc.runtime.reference import TorchRunner, _as_tuple

#: ONNX opset of the exports (the TorchScript exporter's; the torch.export-based one uses 18).
OPSET = 17
#: bumped when the export recipe changes (part of every cache key).
FORMAT = "denuc-onnx/1"
#: an export must reproduce the module on a random batch within this relative tolerance
#: (max abs difference / max abs value per output).
CHECK_RTOL = 1e-3
#: ONNX Runtime intra-op threads spin-wait for work when True (faster on an idle machine, but
#: burns the CPU that other processes of a shared machine need).
SPIN = False
#: with ``torch.get_num_threads()`` > 1, split each batch into that many parts and run them in
#: parallel on single-threaded sessions (else one session with that many intra-op threads): whole
#: windows per thread scale better than threads inside each small convolution (2.0x vs 1.7x on
#: two idle cores for the detector).
SPLIT_BATCH = True


#: the ONNX cache keeps at most this many files and bytes (least recently used go first); the
#: environment variables ``DENUC_ONNX_CACHE_FILES`` / ``DENUC_ONNX_CACHE_MB`` override them.
CACHE_MAX_FILES = 24
CACHE_MAX_BYTES = 2 * 1024**3
#: seconds a process waits for another's export of the same file before giving up.
LOCK_TIMEOUT_S = 1800.0

#: ONNX Runtime's threads when set (:func:`set_threads`); None: ``torch.get_num_threads()`` at each call.
THREADS: int | None = None


def set_threads(n: int | None) -> None:
    """Run every ONNX Runtime call on ``n`` threads (None: follow ``torch.get_num_threads()``), so
    that PyTorch itself may be set to fewer (see :func:`denuc.runtime.base.single_thread_glue`)."""
    global THREADS
    THREADS = None if n is None else max(1, int(n))


_LOCAL = threading.local()


def set_thread_threads(n: int | Callable[[], int] | None) -> None:
    """Run the ONNX Runtime calls made from the calling thread on ``n`` threads, or on ``n()``
    read at each call (None: the process-wide number, :func:`threads`). Lets inputs that run at
    once in several threads of one process share the cores, and the last one left take them all
    (:func:`denuc.cohort.runner.run_cohort`)."""
    _LOCAL.threads = n if n is None or callable(n) else max(1, int(n))


def threads() -> int:
    """Threads an ONNX Runtime call from the calling thread runs on: the thread's own number
    (:func:`set_thread_threads`), else :data:`THREADS`, else ``torch.get_num_threads()``."""
    own = getattr(_LOCAL, "threads", None)
    if callable(own):
        own = max(1, int(own()))
    return own or THREADS or max(1, torch.get_num_threads())


def cache_dir() -> Path:
    """``$DENUC_CACHE/onnx``, default ``~/.cache/denuc/onnx``."""
    return Path(os.environ.get("DENUC_CACHE") or Path.home() / ".cache" / "denuc") / "onnx"


@lru_cache(maxsize=256)
def _file_sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _code_files(module: nn.Module) -> list[str]:
    files = set()
    for m in module.modules():
        try:
            f = inspect.getsourcefile(type(m))
        except (TypeError, OSError):
            continue
        if f and Path(f).is_file():
            files.add(f)
    return sorted(files)


def _plain(v: Any) -> Any:
    """``v`` as JSON-able plain data: numbers, strings, lists, dicts and dataclasses are kept,
    anything else becomes its type's name (a function's repr holds its address, which differs
    from process to process)."""
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if isinstance(v, (tuple, list)):
        return [_plain(u) for u in v]
    if isinstance(v, dict):
        return {str(k): _plain(u) for k, u in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return _plain({f.name: getattr(v, f.name) for f in dataclasses.fields(v)})
    return f"<{type(v).__module__}.{type(v).__qualname__}>"


def _settings(module: nn.Module) -> dict[str, Any]:
    """The top module's public non-tensor attributes (e.g. an encoder's spec and taps)."""
    return {k: _plain(v) for k, v in sorted(vars(module).items())
            if not k.startswith("_") and k != "training" and not isinstance(v, (torch.Tensor, nn.Module))}


def _version(package: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def _onnx_version() -> str:
    """``onnx.__version__`` without importing onnx (a second or more) when it is not loaded yet."""
    import sys

    mod = sys.modules.get("onnx")
    return str(mod.__version__) if mod is not None else _version("onnx")


def module_key(module: nn.Module, method: str, shape: tuple[int, ...]) -> str:
    """sha256 hex of everything that determines the exported graph (see the module docstring)."""
    from denuc import __version__

    h = hashlib.sha256()
    head = {"format": FORMAT, "opset": OPSET, "method": method, "shape": list(shape),
            "class": f"{type(module).__module__}.{type(module).__qualname__}", "torch": torch.__version__,
            "onnx": _onnx_version(), "onnxscript": _version("onnxscript"), "denuc": __version__, "settings": _settings(module),
            "code": [_file_sha(f) for f in _code_files(module)]}
    h.update(json.dumps(head, sort_keys=True).encode())
    h.update(repr(module).encode())
    for k, t in module.state_dict().items():
        a = t.detach().cpu().contiguous()
        h.update(f"{k}|{a.dtype}|{tuple(a.shape)}".encode())
        if a.numel():
            h.update(a.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def module_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The module's parameters and buffers (listing them walks the module tree: do it once)."""
    return [*module.parameters(), *module.buffers()]


def weights_version(tensors: list[torch.Tensor]) -> int:
    """Sum of the in-place modification counters of ``tensors``: changes whenever a weight or
    buffer is written in place (``load_state_dict``, an optimiser step)."""
    return sum(t._version for t in tensors)


class _Method(nn.Module):
    """``forward`` = ``module.<method>`` (what is exported)."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.inner = module
        self.method = method

    def forward(self, x: torch.Tensor) -> Any:
        return getattr(self.inner, self.method)(x)


def _export(wrapper: nn.Module, x: torch.Tensor, path: str, names: list[str]) -> None:
    """``torch.onnx.export`` of ``wrapper`` (batch dimension dynamic) to ``path``.

    The ``torch.export``-based exporter (needs ``onnxscript``) keeps every other size static, so
    TF-"same" paddings become constants that ONNX Runtime folds into the convolutions (about
    1.25x faster than the TorchScript exporter's graph, whose paddings are computed at run
    time); without ``onnxscript``, or when it fails, the TorchScript exporter is used.
    """
    import importlib.util

    if importlib.util.find_spec("onnxscript") is not None:
        try:
            with torch.inference_mode(False), contextlib.redirect_stdout(io.StringIO()):
                batch = torch.export.Dim("batch", min=1, max=1 << 16)
                torch.onnx.export(wrapper, (x,), path, dynamo=True, input_names=["x"], output_names=names,
                                  dynamic_shapes={"x": {0: batch}}, opset_version=max(OPSET, 18),
                                  external_data=False, optimize=True)
            return
        except Exception:  # noqa: BLE001 - fall back to the older exporter below
            Path(path).unlink(missing_ok=True)
    axes = {n: {0: "batch"} for n in ["x", *names]}
    torch.onnx.export(wrapper, (x,), path, dynamo=False, input_names=["x"], output_names=names,
                      dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True)


def export_onnx(module: nn.Module, method: str, shape: tuple[int, ...], path: str | os.PathLike[str]) -> None:
    """Export ``module.<method>`` for inputs ``(B, *shape)`` float32 (B dynamic) to ``path``
    (atomically), after checking that ONNX Runtime reproduces the module on a random batch.

    Raises:
        ModelError: the export fails or does not reproduce the module.
    """
    wrapper = _Method(module, method)
    modes = [(m, m.training) for m in module.modules()]
    x = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
    try:
        wrapper.eval()
        with torch.no_grad():
            ref = _as_tuple(wrapper(x))
            names = [f"out{i}" for i in range(len(ref))]
            with atomic_target(path) as tmp, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _export(wrapper, x, str(tmp), names)
                got = _session(str(tmp), 1).run(None, {"x": x[:1].numpy()})
                for i, (r, g) in enumerate(zip(ref, got, strict=True)):
                    r1 = r[:1].float().numpy()
                    scale = max(float(np.abs(r1).max()), 1e-6)
                    err = float(np.abs(r1 - g).max()) / scale if g.shape == r1.shape else float("inf")
                    if not err <= CHECK_RTOL:
                        raise ModelError(f"ONNX export of {type(module).__name__}.{method} does not reproduce it "
                                         f"(output {i}: relative difference {err:.2g}, shapes {r1.shape} vs {g.shape})")
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ModelError(f"cannot export {type(module).__name__}.{method} to ONNX ({type(e).__name__}: {first})") from e
    finally:
        for m, t in modes:
            m.training = t


@contextlib.contextmanager
def export_lock(path: Path) -> Any:
    """Hold ``<path>.lock`` (an OS file lock: released when its holder exits, even by ``kill -9``,
    so a lock never goes stale). Raises :class:`ModelError` when the cache folder cannot be
    created or the lock not taken within :data:`LOCK_TIMEOUT_S`."""
    from filelock import FileLock, Timeout

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)
        lock.acquire()
    except Timeout:
        raise ModelError(f"{path}: another process has been exporting it for {LOCK_TIMEOUT_S:.0f} s") from None
    except OSError as e:
        raise ModelError(f"ONNX cache {path.parent} is not writable ({e.strerror or e})") from None
    try:
        yield
    finally:
        lock.release()


def _touch(path: Path) -> None:
    """Mark a cached file as just used (its modification time orders :func:`prune_cache`)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def prune_cache(folder: Path, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used ``.onnx`` files of ``folder`` beyond :data:`CACHE_MAX_FILES`
    files or :data:`CACHE_MAX_BYTES` bytes (``keep`` is never deleted), and lock files whose
    ``.onnx`` is gone and that nobody holds. Returns the files deleted."""
    from filelock import FileLock, Timeout

    max_files = int(os.environ.get("DENUC_ONNX_CACHE_FILES") or CACHE_MAX_FILES)
    max_bytes = int(float(os.environ.get("DENUC_ONNX_CACHE_MB") or CACHE_MAX_BYTES / 1024**2) * 1024**2)
    files = []
    for p in folder.glob("*.onnx"):
        with contextlib.suppress(OSError):
            st = p.stat()
            files.append((st.st_mtime, st.st_size, p))
    files.sort(key=lambda t: (t[2] != keep, -t[0]))  # ``keep`` first, then newest first
    gone, total = [], 0
    for k, (_, size, p) in enumerate(files):
        total += size
        if p != keep and (k >= max_files or total > max_bytes):
            with contextlib.suppress(OSError):
                p.unlink()
                gone.append(p)
    for lk in folder.glob("*.onnx.lock"):
        if not lk.with_suffix("").exists():
            lock = FileLock(str(lk), timeout=0)
            with contextlib.suppress(Timeout, OSError):
                with lock:
                    lk.unlink()
    return gone


def cached_file(path: Path, make: Callable[[], Any], message: str) -> Path:
    """``path`` when it is in the cache (marked as used), else made by ``make()`` (which must
    write ``path`` atomically) under the file's lock, after printing ``message`` on stderr; a
    file another process or thread made while this one waited for the lock is taken as it is.
    The cache is pruned after a new file."""
    if path.is_file():
        _touch(path)
        return path
    with export_lock(path):
        if path.is_file():  # another process or thread made it while we waited
            _touch(path)
            return path
        print(message, file=sys.stderr, flush=True)
        make()
    prune_cache(path.parent, keep=path)
    return path


def _session(path: str, threads: int) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = max(1, int(threads))
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if SPIN else "0")
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


class OnnxRunner:
    """Runs ``module.<method>`` with ONNX Runtime on the CPU (see the module docstring).

    A module in training mode, and an empty batch, run with PyTorch (exports are eval-mode graphs).

    Attributes:
        paths: the ONNX file of each input shape ``(C, H, W)`` run so far.
    """

    runtime = "onnx"

    def __init__(self, module: nn.Module, method: str = "forward", name: str = "model") -> None:
        self.module = module
        self.method = method
        self.name = name
        self._torch = TorchRunner(module, method)
        self._sessions: dict[tuple[tuple[int, ...], int], Any] = {}
        self.paths: dict[tuple[int, ...], Path] = {}
        self._version: int | None = None
        self._tensors = module_tensors(module)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self._lock = threading.Lock()  # calls from several threads share the sessions

    def file_for(self, shape: tuple[int, ...]) -> Path:
        """The cached ONNX file of input shape ``shape`` = ``(C, H, W)``, exported if missing
        (under the file's lock: one export per cache whatever runs at once)."""
        key = module_key(self.module, self.method, shape)
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", self.name)
        path = cache_dir() / f"{stem}-{'x'.join(map(str, shape))}-{key[:24]}.onnx"
        return cached_file(path, lambda: export_onnx(self.module, self.method, shape, path),
                           f"denuc: exporting the {self.name} for {'x'.join(map(str, shape))} inputs to ONNX Runtime "
                           f"(once per model and input size; cached in {path.parent})")

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.module.training or x.shape[0] == 0:
            return self._torch(x)
        shape = tuple(int(s) for s in x.shape[1:])
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        n_threads = threads()
        parts = min(n_threads, len(arr)) if SPLIT_BATCH else 1
        with self._lock:  # sessions are made once; their runs are thread-safe
            v = weights_version(self._tensors)
            if v != self._version:  # first call, or weights written since: export again
                self._tensors = module_tensors(self.module)
                v = weights_version(self._tensors)
                self._sessions.clear()
                self.paths.clear()
                self._version = v
            sess = self._session_for(shape, n_threads if parts <= 1 else 1)
            if parts > 1 and (self._pool is None or self._pool_size < parts):
                self._pool, self._pool_size = ThreadPoolExecutor(parts, thread_name_prefix="denuc-onnx"), parts
            pool = self._pool
        if parts <= 1:
            return tuple(torch.from_numpy(o) for o in sess.run(None, {"x": arr}))
        # one single-threaded run per part of the batch, in parallel (runs release the GIL)
        chunks = np.array_split(arr, parts)
        assert pool is not None
        outs = list(pool.map(lambda c: sess.run(None, {"x": c}), chunks))
        return tuple(torch.from_numpy(np.concatenate(o)) for o in zip(*outs, strict=True))

    def _session_for(self, shape: tuple[int, ...], threads: int) -> Any:
        sess = self._sessions.get((shape, threads))
        if sess is None:
            path = self.paths.get(shape) or self.file_for(shape)
            self.paths[shape] = path
            sess = self._sessions[(shape, threads)] = _session(str(path), threads)
        return sess
