"""Input lists for cohort runs: expand files, folders, globs and list files; shard them.

Every process of a multi-process run calls :func:`expand_inputs` with the same arguments and
gets the same list (sorted, unique), so a static shard (:func:`shard`) or the dynamic claims of
:mod:`denuc.cohort.claims` partition the same work.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from denuc.core.files import file_stem
from denuc.data.image import IMAGE_SUFFIXES
from denuc.errors import InputError

T = TypeVar("T")

#: Whole-slide image file suffixes read by OpenSlide or tiffslide (besides the plain image
#: suffixes of :data:`denuc.data.image.IMAGE_SUFFIXES`, which include ``.tif``/``.tiff``).
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif", ".qptiff", ".dcm")

#: Suffixes a folder's files must have to be taken as inputs (case-insensitive).
INPUT_SUFFIXES = tuple(dict.fromkeys(IMAGE_SUFFIXES + SLIDE_SUFFIXES))

_GLOB_CHARS = re.compile(r"[*?\[]")


def is_dicom_folder(path: Path) -> bool:
    """True when ``path`` is a folder holding ``.dcm`` files: a DICOM whole-slide image (one
    slide stored as several files), which is one input, not a folder of inputs."""
    try:
        return path.is_dir() and any(f.suffix.lower() == ".dcm" and f.is_file() for f in path.iterdir())
    except OSError:
        return False


def suffix_predicate(suffixes: Sequence[str] | None = None) -> Callable[[Path], bool]:
    """The default ``is_input`` test: a file whose name ends in one of ``suffixes``
    (case-insensitive; default :data:`INPUT_SUFFIXES`), or a DICOM slide folder
    (:func:`is_dicom_folder`). A MIRAX companion folder (``Slidedat.ini`` and ``.dat`` files
    beside ``NAME.mrxs``) is neither, so listing the parent folder gives ``NAME.mrxs`` once."""
    sufs = tuple(s.lower() for s in (INPUT_SUFFIXES if suffixes is None else suffixes))

    def is_input(path: Path) -> bool:
        if path.is_file():
            return path.name.lower().endswith(sufs)
        return is_dicom_folder(path)

    return is_input


def input_stem(path: Path) -> str:
    """The name an input's outputs are written under (``<stem>.csv``, ...): the file name without
    its suffix, a multi-part one stripped whole (``x.ome.tif`` -> ``x``; :func:`denuc.core.files.file_stem`)."""
    return file_stem(path)


def _expand_folder(p: Path, is_input: Callable[[Path], bool], sufs: str) -> list[Path]:
    try:
        children = sorted(c for c in p.iterdir() if not c.name.startswith("."))
    except OSError as e:
        raise InputError(f"{p}: cannot list folder ({e.strerror or e})") from None
    found = [c for c in children if is_input(c)]
    if not found:
        if (p / "Slidedat.ini").is_file():
            raise InputError(f"{p}: this is the data folder of a MIRAX slide; give the .mrxs file beside it")
        raise InputError(f"{p}: folder holds no image or slide ({sufs})")
    return found


def _expand_one(s: str, base: Path | None, is_input: Callable[[Path], bool], sufs: str, origin: str) -> list[Path]:
    """Inputs named by one argument ``s`` (a path relative to ``base`` when given)."""
    s = os.path.expanduser(s)
    p = Path(s) if base is None or os.path.isabs(s) else base / s
    if p.exists():
        if p.is_dir() and not is_input(p):
            return _expand_folder(p, is_input, sufs)
        return [p]
    if _GLOB_CHARS.search(s):
        matches = sorted(glob.glob(str(p), recursive=True))
        found = [Path(m) for m in matches if is_input(Path(m))]
        if not found:
            why = f"{len(matches)} match(es), none an image or slide ({sufs})" if matches else "nothing matched"
            raise InputError(f"{s}{origin}: {why}")
        return found
    raise InputError(f"{p}{origin}: no such file or folder")


def read_list_file(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """Entries of a list file: one path (or folder, or glob) per line; blank lines and lines
    starting with ``#`` are skipped, surrounding spaces stripped.

    Returns:
        ``(entry, origin)`` pairs, ``origin`` naming the file and line for error messages.
    """
    lf = Path(path)
    try:
        text = lf.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{lf}: no such list file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{lf}: cannot read list file ({getattr(e, 'strerror', None) or e})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        entry = line.strip()
        if entry and not entry.startswith("#"):
            out.append((entry, f" (listed in {lf}, line {n})"))
    return out


def expand_inputs(
    inputs: Sequence[str],
    inputs_file: str | os.PathLike[str] | None = None,
    suffixes: Sequence[str] | None = None,
    is_input: Callable[[Path], bool] | None = None,
) -> list[Path]:
    """The input files (or slide folders) named by ``inputs`` and the list file ``inputs_file``.

    Each entry is one of:

    * a file: taken as it is, whatever its suffix;
    * a folder: its entries for which ``is_input`` holds, sorted by name, not recursive, hidden
      names (``.x``) skipped; a folder for which ``is_input`` itself holds (a DICOM slide folder
      with the default test) is one input and is not expanded;
    * a glob pattern (quote it in the shell: ``'slides/*.svs'``; ``**`` matches any depth of
      folders): its matches for which ``is_input`` holds. A path that exists is never read as a
      pattern, so file names with ``[`` work.

    ``inputs_file`` holds one such entry per line (blank lines and ``#`` comment lines skipped);
    relative entries are relative to the list file's folder.

    Args:
        suffixes: file suffixes the default ``is_input`` accepts (default :data:`INPUT_SUFFIXES`).
        is_input: ``is_input(path) -> bool`` deciding which folder entries and glob matches are
            inputs (default :func:`suffix_predicate` of ``suffixes``).

    Returns:
        Unique paths (the same file named twice, e.g. by a folder and a glob, is kept once),
        sorted by their text; the same for every process given the same arguments.

    Raises:
        InputError: a path does not exist, a folder or a pattern gives no input (naming it),
            nothing at all is given, or two different inputs share a stem (their outputs would
            overwrite each other).
    """
    test = is_input if is_input is not None else suffix_predicate(suffixes)
    sufs = "/".join(INPUT_SUFFIXES if suffixes is None else suffixes)
    entries: list[tuple[str, Path | None, str]] = [(s, None, "") for s in inputs]
    if inputs_file is not None:
        base = Path(inputs_file).parent
        entries += [(e, base, origin) for e, origin in read_list_file(inputs_file)]
    if not entries:
        raise InputError("no input given" + (f" ({inputs_file} lists none)" if inputs_file is not None else ""))
    seen: dict[str, Path] = {}
    for s, base, origin in entries:
        for p in _expand_one(s, base, test, sufs, origin):
            seen.setdefault(os.path.realpath(p), Path(os.path.normpath(p)))
    files = sorted(seen.values(), key=str)
    by_stem: dict[str, Path] = {}
    for f in files:
        stem = input_stem(f)
        if stem in by_stem:
            raise InputError(f"{by_stem[stem]} and {f} would both write outputs named {stem}; rename one")
        by_stem[stem] = f
    return files


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)``: this process's shard index ``I`` (0-based) of ``N`` shards.

    For a SLURM job array use ``--array=0-(N-1)`` and
    ``--shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``.

    Raises:
        InputError: not two integers separated by ``/``, or not ``0 <= I < N``.
    """
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if m is None:
        raise InputError(f"--shard {text!r}: expected I/N, e.g. 0/4 for the first of four shards")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {text!r}: need 0 <= I < N (shards are numbered from 0), got I={i}, N={n}")
    return i, n


def shard(items: Sequence[T], index: int, count: int) -> list[T]:
    """Items ``index, index + count, index + 2 count, ...``: the shards ``0 .. count-1`` are
    disjoint and together hold every item once; their sizes differ by at most one."""
    if count < 1 or not 0 <= index < count:
        raise InputError(f"shard {index}/{count}: need 0 <= index < count")
    return list(items[index::count])


def _env_pair(rank_var: str, size_var: str) -> tuple[int, int] | None:
    r, n = os.environ.get(rank_var), os.environ.get(size_var)
    if r is None or n is None:
        return None
    try:
        rank, size = int(r), int(n)
    except ValueError:
        raise InputError(f"{rank_var}={r!r}, {size_var}={n!r}: expected integers") from None
    if size < 1 or not 0 <= rank < size:
        raise InputError(f"{rank_var}={rank}, {size_var}={size}: need 0 <= rank < size")
    return rank, size


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process.

    From, in this order: an initialised ``torch.distributed`` process group; the ``RANK`` and
    ``WORLD_SIZE`` variables (set by ``torchrun``); ``SLURM_PROCID`` and ``SLURM_NTASKS`` (set
    by ``srun`` for each task); else ``(0, 1)``. torch is not imported for this.

    Note: an ``sbatch`` script run without ``srun`` sees ``SLURM_NTASKS`` of the allocation
    while being a single process; static sharding on this world would then skip inputs, while
    the claims of :func:`denuc.cohort.claims.claimed_inputs` still process every input.

    Raises:
        InputError: the variables are not integers with ``0 <= rank < size``.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    for rank_var, size_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        pair = _env_pair(rank_var, size_var)
        if pair is not None:
            return pair
    return 0, 1
