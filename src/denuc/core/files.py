"""Atomic file writes: a reader never sees a half-written file.

Every writer goes to a hidden temporary file beside the target and then ``os.replace``-s
it, which is atomic on POSIX and Windows within one file system. Written files get the
permissions an ordinary ``open()`` gives (``0o666`` minus the umask), also when the writer
creates its file private (``safetensors`` writes ``0o600``). A failed write leaves no
temporary file where it can, and never hides its own error behind a failing clean-up.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from denuc.errors import InputError


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _discard(tmp: Path) -> None:
    """Remove a temporary file if it is there; a failure (read-only folder, ...) is ignored so
    that it cannot replace the error that made the write fail."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux ``/proc``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """Permission bits an ordinary new file gets: ``0o666`` minus the umask."""
    return 0o666 & ~_umask()


def check_out_dir(path: str | os.PathLike[str], what: str = "--out") -> Path:
    """Create the output folder ``path`` (with parents) and check that files can be written in
    it, before any slow work. Raises :class:`InputError` with one line naming ``what`` and the
    folder when it is an existing file, cannot be created or is not writable."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"{what} {p}: exists and is not a folder")
    probe = p / f".denuc-write-test.{os.getpid()}.tmp"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
    except OSError as e:
        raise InputError(f"{what} {p}: cannot write there ({e.strerror or e})") from None
    _discard(probe)
    return p


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, gz: bool | None = None) -> Path:
    """Write ``data`` to ``path`` atomically, creating parent folders.

    Args:
        gz: gzip-compress the bytes; ``None`` = when the name ends in ``.gz``. The gzip
            header carries no time stamp, so equal data gives byte-identical files.
    """
    p = Path(path)
    if gz is None:
        gz = p.name.lower().endswith(".gz")
    if gz:
        data = gzip.compress(data, mtime=0)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(p)
    try:
        tmp.write_bytes(data)
        os.replace(tmp, p)
    finally:
        _discard(tmp)
    return p


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), gz=False)


def atomic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str], link: bool = False) -> str:
    """Place a copy of file ``src`` at ``dst`` atomically.

    Args:
        link: try a hard link first (no extra disk space), falling back to a copy when the
            file system refuses (e.g. across devices).

    Returns:
        ``"kept"`` when linking and ``dst`` already is a hard link to ``src``, else
        ``"linked"`` or ``"copied"`` (a copy replaces an existing hard link).
    """
    s, d = Path(src), Path(dst)
    if link and d.exists() and os.path.samefile(s, d):
        return "kept"
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(d)
    _discard(tmp)
    how = "copied"
    try:
        if link:
            try:
                os.link(s, tmp)
                how = "linked"
            except OSError:
                pass
        if how == "copied":
            shutil.copyfile(s, tmp)
        os.replace(tmp, d)
    finally:
        _discard(tmp)
    return how


@contextmanager
def atomic_target(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    For writers that insist on writing a named file themselves (``np.savez``,
    ``safetensors.torch.save_file``). ``suffix`` is appended to the temporary name for
    writers that add one (``np.savez`` adds ``.npz``). The file gets the umask's permissions
    (``0o666`` minus the umask), not the writer's. On error the temporary file is removed and
    ``path`` is left as it was.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp{suffix}")
    try:
        yield tmp
        os.chmod(tmp, file_mode())
        os.replace(tmp, p)
    finally:
        _discard(tmp)


#: Metadata keys whose values are local folder paths, and file paths (see :func:`portable_meta`).
PATH_KEYS = ("datasets", "dataset", "out")
FILE_KEYS = ("init", "source_checkpoint")


def _short(path: str, parts: int) -> str:
    """The last ``parts`` components of ``path``, joined by ``/``."""
    return "/".join(path.replace("\\", "/").strip("/").split("/")[-parts:])


def portable_meta(meta: object, keys: tuple[str, ...] = PATH_KEYS, file_keys: tuple[str, ...] = FILE_KEYS) -> object:
    """A copy of checkpoint metadata with local paths cut short, at any depth of nested dicts
    and lists, so a model shipped to others names its datasets and parent checkpoints without
    exposing this machine: folders under ``keys`` keep their last component
    (``/home/me/data/brca-m2c`` -> ``brca-m2c``), files under ``file_keys`` their folder and
    name (``/home/me/runs/det/best.safetensors`` -> ``det/best.safetensors``)."""
    if isinstance(meta, dict):
        out: dict[object, object] = {}
        for k, v in meta.items():
            n = 1 if k in keys else 2 if k in file_keys else 0
            if n and isinstance(v, str) and v:
                out[k] = _short(v, n)
            elif n and isinstance(v, list) and all(isinstance(x, str) for x in v):
                out[k] = [_short(x, n) for x in v]
            else:
                out[k] = portable_meta(v, keys, file_keys)
        return out
    if isinstance(meta, list):
        return [portable_meta(v, keys, file_keys) for v in meta]
    return meta


@contextmanager
def removed_if_failed(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Around work that writes into the folder ``path``: when the work raises and this call
    created the folder (with any missing parents), remove those that are still empty, so a
    command that fails its checks leaves no empty ``--out`` behind. A folder that existed
    before, or that holds files, is never touched."""
    p = Path(path)
    created: list[Path] = []
    a = p
    while not a.exists() and a.parent != a:
        created.append(a)
        a = a.parent
    try:
        yield p
    except BaseException:
        for d in created:  # deepest first
            try:
                d.rmdir()  # only succeeds on an empty folder
            except OSError:
                break
        raise


#: Multi-part file suffixes stripped whole from an input's name to give its output stem
#: (``x.ome.tif`` -> ``x``), lower case.
MULTI_SUFFIXES = (".ome.tiff", ".ome.tif")


def file_stem(path: str | os.PathLike[str]) -> str:
    """The stem an input's outputs are named by: the name without its suffix, a known
    multi-part suffix (:data:`MULTI_SUFFIXES`, any case) stripped whole (``a.ome.tif`` -> ``a``,
    ``a.b.svs`` -> ``a.b``); a folder (a DICOM slide) keeps its whole name."""
    p = Path(path)
    if p.is_dir():
        return p.name
    low = p.name.lower()
    for suf in MULTI_SUFFIXES:
        if low.endswith(suf) and len(p.name) > len(suf):
            return p.name[: -len(suf)]
    return p.stem


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` lives on this host (another user's process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def temp_owner(name: str) -> int | None:
    """The process id in a temporary file name this module writes (``.<name>.<pid>.tmp`` or
    ``.<name>.<pid>.tmp<suffix>``), or None when ``name`` is not one."""
    if not name.startswith("."):
        return None
    head, sep, _ = name.rpartition(".tmp")
    if not sep:
        return None
    base, dot, pid = head.rpartition(".")
    if not dot or not base or not pid.isdigit():
        return None
    return int(pid)


def remove_dead_temps(folder: str | os.PathLike[str], names: Iterable[str] | None = None) -> list[Path]:
    """Remove the temporary files in ``folder`` of the final files ``names`` (``.<name>.<pid>.tmp*``;
    None: of any file) whose writer process is gone (``kill -9`` leaves them): a live process's,
    this one's included, are kept. Call it while holding the input's claim, so that no process
    on another host (whose pid this host cannot check) writes them.

    Returns:
        The removed paths.
    """
    d = Path(folder)
    wanted = None if names is None else set(names)
    removed: list[Path] = []
    try:
        entries = list(d.iterdir())
    except OSError:
        return removed
    for p in entries:
        pid = temp_owner(p.name)
        if pid is None or pid == os.getpid() or pid_alive(pid):
            continue
        final = p.name[1:].rpartition(".tmp")[0].rpartition(".")[0]
        if wanted is None or final in wanted:
            try:
                if p.is_dir() and not p.is_symlink():  # a store written as a folder (``.zarr``)
                    shutil.rmtree(p)
                else:
                    p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed
