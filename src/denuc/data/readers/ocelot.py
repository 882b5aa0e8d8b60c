"""OCELOT 2023 (Ryu et al., CVPR 2023), the cell-detection half of the release.

Published layout (dataset release ``ocelot2023_v1.0.1``; the tissue half is ignored)::

    ROOT/metadata.json                              # {"sample_pairs": {"001": {...}, ...}, ...}
    ROOT/images/<subset>/cell/<id>.jpg              # 1024 x 1024 RGB cell patches
    ROOT/annotations/<subset>/cell/<id>.csv         # one cell a line: x,y,label (no header)

Each ``sample_pairs[<id>]`` record carries ``"subset"`` (``train`` / ``val`` / ``test``, the
official split) and ``"cell": {"resized_mpp_x": ..., "resized_mpp_y": ...}``, the µm per
pixel of that cell patch (about 0.19-0.2; it varies per sample and is used per image).
``mpp_x`` in the record is the source slide's resolution and is *not* the patch's. CSV
labels: ``1`` = background cell (BC, any non-tumour cell) and ``2`` = tumour cell (TC);
x = column, y = row in patch pixels (integers, taken as given).

Class names here: ``background_cell`` (label 1; the DeNuC paper's "Oth") and
``tumor_cell`` (label 2; the paper's "Tum").

A subset whose ``images/<subset>/cell`` or ``annotations/<subset>/cell`` folder is absent
(e.g. only the training part was downloaded) is left out with a warning; a sample listed
in metadata.json whose image is missing from a present folder is an error. An empty CSV
means zero cells.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from denuc.core.mpp import check_mpp
from denuc.core.result import Nuclei
from denuc.data.base import SPLITS, PointDataset, register_dataset
from denuc.data.splits import SplitLists
from denuc.errors import InputError

OCELOT_CLASSES = ("background_cell", "tumor_cell")  # CSV labels 1 (BC) and 2 (TC)
OCELOT_COLORS = ((0, 90, 220), (200, 0, 0))
OCELOT_IMAGE_SUFFIXES = (".jpg", ".png", ".tif")


def _detect(p: Path) -> bool:
    return (p / "metadata.json").is_file() and (p / "annotations").is_dir() and (p / "images").is_dir()


def read_xyl_csv(path: Path, class_names: tuple[str, ...] = OCELOT_CLASSES) -> Nuclei:
    """Read an OCELOT ``x,y,label`` CSV (labels 1-based, no header). Empty file = zero cells."""
    if not path.is_file():
        raise InputError(f"{path}: annotation file is missing")
    try:
        lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    if lines and all(f.strip().isidentifier() for f in lines[0].split(",")):
        lines = lines[1:]  # tolerate a header line such as "x,y,label"
    if not lines:
        return Nuclei(np.zeros((0, 2)), class_ids=np.zeros(0, np.int64), class_names=class_names)
    rows = [ln.split(",") for ln in lines]
    if any(len(r) != 3 for r in rows):
        raise InputError(f"{path}: every line must be 'x,y,label'")
    try:
        arr = np.array(rows, dtype=np.float64)
    except ValueError:
        raise InputError(f"{path}: every line must be 'x,y,label' numbers") from None
    labels = arr[:, 2]
    bad = sorted(set(labels.tolist()) - {float(k) for k in range(1, len(class_names) + 1)})
    if bad:
        raise InputError(f"{path}: unknown label(s) {bad}; known 1..{len(class_names)} = {list(class_names)}")
    return Nuclei(arr[:, :2], class_ids=labels.astype(np.int64) - 1, class_names=class_names)


def _num(rec: dict[str, Any], key: str, where: str) -> Any:
    if key not in rec:
        raise InputError(f"{where}: missing {key!r}")
    return rec[key]


@register_dataset("ocelot", _detect)
class Ocelot(SplitLists, PointDataset):
    """The OCELOT 2023 release folder (module docstring); per-sample mpp, official splits."""

    def __init__(self, root: str | os.PathLike[str], outside: str = "error") -> None:
        super().__init__(root, outside)
        self.classes = OCELOT_CLASSES
        self.colors = OCELOT_COLORS
        mpath = self.root / "metadata.json"
        try:
            meta = json.loads(mpath.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{mpath}: cannot read ({e})") from None
        pairs = meta.get("sample_pairs") if isinstance(meta, dict) else None
        if not isinstance(pairs, dict) or not pairs:
            raise InputError(f"{mpath}: expected an object with a non-empty 'sample_pairs' mapping")
        self._splits: dict[str, list[str]] = {s: [] for s in SPLITS}
        self._mpp: dict[str, float] = {}
        self._images: dict[str, Path] = {}
        self._subset: dict[str, str] = {}
        skipped: set[str] = set()
        for sid in sorted(pairs):
            rec = pairs[sid]
            where = f"{mpath}: sample {sid!r}"
            if not isinstance(rec, dict):
                raise InputError(f"{where}: must be an object")
            subset = _num(rec, "subset", where)
            if subset not in SPLITS:
                raise InputError(f"{where}: subset {subset!r} is not one of {list(SPLITS)}")
            cell = _num(rec, "cell", where)
            if not isinstance(cell, dict):
                raise InputError(f"{where}: 'cell' must be an object")
            mx = check_mpp(_num(cell, "resized_mpp_x", where), f"{where}: cell.resized_mpp_x")
            my = cell.get("resized_mpp_y", mx)
            if my is not None and abs(float(my) - mx) > 1e-3 * mx:
                raise InputError(f"{where}: non-square pixels (resized_mpp_x={mx}, resized_mpp_y={my})")
            img_dir = self.root / "images" / subset / "cell"
            if not img_dir.is_dir() or not (self.root / "annotations" / subset / "cell").is_dir():
                skipped.add(subset)
                continue
            img = next((img_dir / f"{sid}{s}" for s in OCELOT_IMAGE_SUFFIXES if (img_dir / f"{sid}{s}").is_file()),
                       None)
            if img is None:
                raise InputError(f"{img_dir}: image of sample {sid!r} ({sid}.jpg) is missing")
            self._splits[subset].append(sid)
            self._mpp[sid] = mx
            self._images[sid] = img
            self._subset[sid] = subset
        if skipped:
            warnings.warn(f"OCELOT {self.root}: no images/<subset>/cell or annotations/<subset>/cell folder for "
                          f"subset(s) {sorted(skipped)}; their samples are left out", stacklevel=2)
        if not self._images:
            raise InputError(f"{self.root}: no OCELOT cell images found under images/<subset>/cell/")
        self.mpp = float(np.median(list(self._mpp.values())))
        self._order = [s for sp in SPLITS for s in self._splits[sp]]

    def mpp_of(self, stem: str) -> float:
        return self._mpp[self._known(stem)]

    def _known(self, stem: str) -> str:
        if stem not in self._images:
            raise InputError(f"OCELOT {self.root}: no sample {stem!r}")
        return stem

    def image_path(self, stem: str) -> Path:
        return self._images[self._known(stem)]

    def _read_points(self, stem: str) -> Nuclei:
        subset = self._subset[self._known(stem)]
        return read_xyl_csv(self.root / "annotations" / subset / "cell" / f"{stem}.csv", self.classes)
