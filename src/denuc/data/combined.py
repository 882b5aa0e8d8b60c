"""Several point datasets seen as one, with split lists chosen by the caller.

Used where one model is trained on every dataset given (``denuc finetune DATA...``): the
classification head reads a single :class:`~denuc.data.base.PointDataset`. The class
vocabulary is the union of the datasets' classes in order of appearance (a class keeps the
colour of the first dataset that defines it); class ids are remapped to it. With one dataset
the stems are its own; with several, ``"<dataset index>:<stem>"``, so equal stems of two
datasets stay apart. Points and images are read through each dataset (its ``outside`` policy
and per-image mpp apply), coordinates unchanged: (x, y) px of each image at its own mpp.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from denuc.core.result import NO_CLASS, Nuclei
from denuc.data.base import SPLITS, PointDataset
from denuc.errors import InputError


class CombinedDataset(PointDataset):
    """``datasets`` as one dataset whose splits are ``splits[i]`` (``{split: [stems of dataset i]}``,
    a missing split is empty) for dataset ``i``."""

    format_name = "combined"

    def __init__(self, datasets: Sequence[PointDataset], splits: Sequence[Mapping[str, Sequence[str]]]) -> None:
        if not datasets or len(datasets) != len(splits):
            raise InputError("combined dataset: give one split mapping per dataset (and at least one dataset)")
        super().__init__(datasets[0].root, datasets[0].outside)
        self.parts = list(datasets)
        names: dict[str, tuple[int, int, int]] = {}
        for d in self.parts:
            for c, col in zip(d.classes, d.colors or [(255, 255, 0)] * len(d.classes), strict=False):
                names.setdefault(c, tuple(int(v) for v in col))  # type: ignore[arg-type]
        self.classes = tuple(names)
        self.colors = tuple(names.values())  # type: ignore[assignment]
        self.mpp = float(self.parts[0].mpp)
        multi = len(self.parts) > 1
        self._where: dict[str, tuple[int, str]] = {}
        self._splits: dict[str, list[str]] = {s: [] for s in SPLITS}
        self._remap = [np.array([self.classes.index(c) for c in d.classes], np.int64) for d in self.parts]
        for i, (d, sp) in enumerate(zip(self.parts, splits, strict=True)):
            unknown = sorted(set(sp) - set(SPLITS))
            if unknown:
                raise InputError(f"combined dataset: unknown split name(s) {unknown}")
            for split in SPLITS:
                for stem in sp.get(split, ()):
                    name = f"{i}:{stem}" if multi else str(stem)
                    if name in self._where:
                        raise InputError(f"{d.root}: image {stem!r} is listed twice in the combined splits")
                    self._where[name] = (i, str(stem))
                    self._splits[split].append(name)

    def _part(self, stem: str) -> tuple[PointDataset, str, int]:
        try:
            i, s = self._where[stem]
        except KeyError:
            raise InputError(f"combined dataset: no image {stem!r}") from None
        return self.parts[i], s, i

    def stems(self, split: str | None = None) -> list[str]:
        if split is None:
            return [s for sp in SPLITS for s in self._splits[sp]]
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; known: {SPLITS}")
        return list(self._splits[split])

    def split_of(self, stem: str) -> str | None:
        return next((s for s in SPLITS if stem in self._splits[s]), None)

    def image_path(self, stem: str) -> Path:
        d, s, _ = self._part(stem)
        return d.image_path(s)

    def read_image(self, stem: str) -> np.ndarray:
        d, s, _ = self._part(stem)
        return d.read_image(s)

    def mpp_of(self, stem: str) -> float:
        d, s, _ = self._part(stem)
        return d.mpp_of(s)

    def _relabel(self, pts: Nuclei, i: int, stem: str) -> Nuclei:
        ids = pts.class_ids if pts.class_ids is not None else np.full(len(pts), NO_CLASS, np.int64)
        new = np.where(ids >= 0, self._remap[i][np.clip(ids, 0, None)] if len(self._remap[i]) else NO_CLASS, NO_CLASS)
        out = Nuclei(pts.xy, pts.scores, new.astype(np.int64), self.classes, None, pts.mpp, pts.image_size, stem)
        return out

    def _read_points(self, stem: str) -> Nuclei:
        d, s, i = self._part(stem)
        return self._relabel(d._read_points(s), i, stem)

    def points(self, stem: str, image_size: tuple[int, int] | None = None) -> Nuclei:
        """The points of the underlying dataset (its ``outside`` policy applied), class ids in
        the combined vocabulary, ``name`` = the combined stem."""
        d, s, i = self._part(stem)
        return self._relabel(d.points(s, image_size), i, stem)
