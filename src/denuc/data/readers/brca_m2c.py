"""BRCA-M2C (Abousamra et al., ICCV 2021): ``labels/<name>_gt_class_coords.txt`` with
``<row y> <col x> <class id>`` lines, split lists ``brca_ds_<split>.txt``, 0.5 µm/px."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from denuc.core.result import Nuclei
from denuc.data.base import SPLITS, PointDataset, register_dataset
from denuc.errors import InputError

BRCA_CLASSES = ("lymphocyte", "tumor", "stromal")  # ids 1, 2, 3 in the label files
BRCA_COLORS = ((0, 160, 0), (200, 0, 0), (0, 90, 220))
BRCA_MPP = 0.5


def _detect(p: Path) -> bool:
    return (p / "brca_ds_train.txt").is_file() and (p / "labels").is_dir() and (p / "images").is_dir()


def read_yxc_file(path: Path, class_names: tuple[str, ...] = BRCA_CLASSES) -> Nuclei:
    """Read a ``y x class_id`` text file (class ids 1-based). Empty file = zero nuclei."""
    if not path.is_file():
        raise InputError(f"{path}: label file is missing")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    rows = [ln.split() for ln in text.splitlines() if ln.strip()]
    if not rows:
        return Nuclei.empty(class_names)
    try:
        arr = np.array(rows, dtype=np.float64)
    except ValueError:
        raise InputError(f"{path}: every line must be '<y> <x> <class id>' numbers") from None
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise InputError(f"{path}: every line must have 3 fields '<y> <x> <class id>'")
    bad_row = ~np.isfinite(arr).all(axis=1)
    if bad_row.any():
        raise InputError(f"{path}: NaN or infinite values on {int(bad_row.sum())} line(s), "
                         f"e.g. point line {int(np.argmax(bad_row)) + 1}")
    frac = arr[:, 2] != np.round(arr[:, 2])
    if frac.any():
        raise InputError(f"{path}: class ids must be whole numbers; got {float(arr[frac, 2][0]):g} "
                         f"on point line {int(np.argmax(frac)) + 1}")
    ids = arr[:, 2].astype(np.int64)
    bad = sorted(set(ids.tolist()) - set(range(1, len(class_names) + 1)))
    if bad:
        raise InputError(f"{path}: unknown class id(s) {bad}; known 1..{len(class_names)} = {list(class_names)}")
    return Nuclei(arr[:, [1, 0]], class_ids=ids - 1, class_names=class_names)


@register_dataset("brca-m2c", _detect)
class BrcaM2C(PointDataset):
    """The BRCA-M2C folder as published (``images/``, ``labels/``, ``brca_ds_*.txt``)."""

    def __init__(self, root, outside: str = "error") -> None:  # type: ignore[no-untyped-def]
        super().__init__(root, outside)
        self.classes = BRCA_CLASSES
        self.colors = BRCA_COLORS
        self.mpp = BRCA_MPP
        self._splits = {s: self._read_split(s) for s in SPLITS}

    def _read_split(self, split: str) -> list[str]:
        f = self.root / f"brca_ds_{split}.txt"
        if not f.is_file():
            return []
        return [Path(ln.strip()).stem for ln in f.read_text().splitlines() if ln.strip()]

    def stems(self, split: str | None = None) -> list[str]:
        if split is None:
            seen = [s for sp in SPLITS for s in self._splits[sp]]
            return list(dict.fromkeys(seen))
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; known: {SPLITS}")
        return list(self._splits[split])

    def image_path(self, stem: str) -> Path:
        return self.root / "images" / f"{stem}.png"

    def _read_points(self, stem: str) -> Nuclei:
        return read_yxc_file(self.root / "labels" / f"{stem}_gt_class_coords.txt", self.classes)
