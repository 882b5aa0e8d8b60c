"""Reading prediction folders for evaluation, and converting third-party point files.

Formats (registry :data:`PRED_FORMATS`), one file per image stem:

* ``csv`` (default): ``<stem>.csv`` with header ``x,y,class[,score]`` (class = name),
  read with :meth:`Nuclei.read_csv`; an empty or header-only file means zero predictions.
  A file whose only class name is the detector's class-agnostic name (``"nucleus"``,
  what ``denuc detect`` writes) reads as unclassified predictions when the GT vocabulary
  has no such class (see :func:`unclassify_agnostic`).
* ``brca-m2c``: ``<stem>_pred_class_coords.txt`` with ``<row y> <col x> <class id>`` lines,
  class ids 1-based into the GT vocabulary (the layout of BRCA-M2C labels and of the
  published MCSpatNet predictions); no scores.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from denuc.core.result import NO_CLASS, Nuclei
from denuc.errors import InputError
from denuc.registry import Registry

#: What to do when an image of the GT has no prediction file: raise, or count zero predictions.
MISSING_POLICIES = ("error", "empty")


@dataclass(frozen=True)
class PredFormat:
    """A prediction file layout: file name of a stem, and a reader ``(path, class_names) -> Nuclei``."""

    name: str
    suffix: str
    read: Callable[[Path, tuple[str, ...]], Nuclei]

    def path(self, folder: Path, stem: str) -> Path:
        return folder / f"{stem}{self.suffix}"


PRED_FORMATS: Registry[PredFormat] = Registry("prediction format")


@functools.cache
def class_agnostic_name() -> str:
    """The class name of a class-agnostic detector's points (``denuc detect`` output):
    the default :attr:`DetectorConfig.class_names <denuc.detect.model.DetectorConfig>`."""
    # imports torch: only reached when predictions name a class outside the GT vocabulary
    from denuc.detect.model import DetectorConfig

    return DetectorConfig.class_names[0]


def unclassify_agnostic(pts: Nuclei, class_names: Sequence[str], source: str) -> Nuclei:
    """Predictions whose only class is the class-agnostic ``"nucleus"`` as unclassified ones.

    When ``pts`` names classes outside the GT vocabulary ``class_names``, and the only such
    name is :func:`class_agnostic_name` (and the GT has no class of that name), the points
    are returned without classes (``class_ids`` None, vocabulary ``class_names``): they count
    for detection only. If points of that name are mixed with points of real classes,
    :class:`InputError` names ``source``. Anything else is returned unchanged.
    """
    names = tuple(class_names)
    if pts.class_ids is None or not set(pts.class_names) - set(names):
        return pts
    agnostic = class_agnostic_name()
    if agnostic in names or set(pts.class_names) - set(names) != {agnostic}:
        return pts  # other unknown names: the caller's error
    k = pts.class_names.index(agnostic)
    present = {pts.class_names[i] for i in np.unique(pts.class_ids[pts.class_ids != NO_CLASS]).tolist()}
    mixed = sorted(present - {agnostic})
    if mixed and agnostic in present:
        raise InputError(f"{source}: mixes the class-agnostic name {agnostic!r} (denuc detect output) with "
                         f"class name(s) {mixed}; give every point a class of {list(names)}, or none")
    if mixed:  # the name is in the vocabulary of ``pts`` but no point has it: keep the real classes
        return _drop_name(pts, k, names)
    return Nuclei(pts.xy, pts.scores, None, names, None, pts.mpp, pts.image_size, pts.name)


def _drop_name(pts: Nuclei, k: int, names: tuple[str, ...]) -> Nuclei:
    keep = tuple(c for i, c in enumerate(pts.class_names) if i != k)
    assert pts.class_ids is not None
    ids = np.where(pts.class_ids > k, pts.class_ids - 1, pts.class_ids)
    return Nuclei(pts.xy, pts.scores, ids, keep, None, pts.mpp, pts.image_size, pts.name).with_classes(names)


def _read_csv(path: Path, class_names: tuple[str, ...]) -> Nuclei:
    try:
        return Nuclei.read_csv(path, class_names)
    except InputError as first:
        agnostic = class_agnostic_name()
        if agnostic in class_names:
            raise
        try:  # the detector's class-agnostic name: detection-only predictions
            pts = Nuclei.read_csv(path, (*class_names, agnostic))
        except InputError:
            raise first from None
        return unclassify_agnostic(pts, class_names, str(path))


def _read_yxc(path: Path, class_names: tuple[str, ...]) -> Nuclei:
    from denuc.data.readers.brca_m2c import read_yxc_file

    return read_yxc_file(path, class_names)


PRED_FORMATS.register("csv", PredFormat("csv", ".csv", _read_csv))
PRED_FORMATS.register("brca-m2c", PredFormat("brca-m2c", "_pred_class_coords.txt", _read_yxc))


def read_predictions(
    folder: str | os.PathLike[str],
    stems: Sequence[str],
    class_names: Sequence[str],
    format: str = "csv",
    missing: str = "error",
) -> dict[str, Nuclei]:
    """Read the prediction file of every stem in ``stems`` from ``folder``.

    Args:
        folder: the prediction folder.
        stems: image stems of the ground truth (extra files in the folder are ignored).
        class_names: the GT class vocabulary; prediction class names must belong to it.
        format: a name in :data:`PRED_FORMATS`.
        missing: ``"error"`` raises :class:`InputError` naming the missing file;
            ``"empty"`` counts the image as having zero predictions.

    Returns:
        stem -> :class:`Nuclei` in the image's pixels, classes in ``class_names``.
    """
    if missing not in MISSING_POLICIES:
        raise InputError(f"missing must be one of {MISSING_POLICIES}; got {missing!r}")
    fmt = PRED_FORMATS.get(format)
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: prediction folder does not exist")
    names = tuple(class_names)
    out: dict[str, Nuclei] = {}
    for stem in stems:
        path = fmt.path(root, stem)
        if not path.is_file():
            if missing == "error":
                raise InputError(f"{path}: prediction file missing for GT image {stem!r} "
                                 f"(pass missing='empty' / --missing empty to count it as no predictions)")
            out[stem] = Nuclei.empty(names, name=stem)
            continue
        try:
            pts = fmt.read(path, names)
        except InputError as e:
            raise (e if str(path) in str(e) else InputError(f"{path}: {e}")) from None
        pts.name = stem
        pts.meta["source"] = str(path)
        out[stem] = pts
    return out


def convert_yxc_predictions(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    class_names: Sequence[str] = ("lymphocyte", "tumor", "stromal"),
    suffix: str = "_pred_class_coords.txt",
) -> list[Path]:
    """Convert every ``<stem><suffix>`` ``y x class_id`` file in ``src`` to ``dst/<stem>.csv``.

    ``class_names`` defaults to the BRCA-M2C vocabulary (ids 1, 2, 3).
    The CSVs have header ``x,y,class`` (class names from ``class_names``, ids 1-based) and
    can be evaluated with the default ``csv`` prediction format. Coordinates are kept as
    given (no half-pixel shift). Returns the written paths, sorted.
    """
    s = Path(src)
    files = sorted(s.glob(f"*{suffix}"))
    if not files:
        raise InputError(f"{s}: no '*{suffix}' files to convert")
    written = []
    for f in files:
        stem = f.name[: -len(suffix)]
        pts = _read_yxc(f, tuple(class_names))
        written.append(pts.to_csv(Path(dst) / f"{stem}.csv"))
    return written
