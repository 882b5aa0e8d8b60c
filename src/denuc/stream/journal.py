"""Resume journal of one input: finished chunks of tiles, saved atomically as they finish.

Folder ``<out>/.<stem>.partial/``: ``plan.json`` (the key of the plan and models that produced
the chunks, and the run's fingerprint, :mod:`denuc.stream.fingerprint`) and ``chunk-<k>.npz``
per finished chunk (:meth:`denuc.core.result.Nuclei.save`, plus the chunk's tile index per
nucleus, ``meta[TILE_KEY]``, as the array ``tile`` when it has one). A rerun with the same key reuses the
finished chunks; a rerun with another fingerprint is refused (:class:`SettingsChanged`, naming
the changes) unless it overwrites; any other key (same settings, another chunk size) starts
afresh. The folder is removed once the input's outputs are in place.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from denuc.core.files import atomic_write_text
from denuc.core.result import Nuclei
from denuc.sinks.base import TILE_KEY

#: name of the tile-index array in a chunk's ``.npz`` (beside :meth:`Nuclei.save`'s arrays)
_TILE_ARRAY = "tile"


class Journal:
    """Finished chunks of one input under ``out_dir``.

    Args:
        out_dir: the run's output folder.
        stem: the input's output stem.
        key: hash of everything that decides the chunks' content (plan, models, settings).
        fingerprint: the run's fingerprint, recorded in ``plan.json``.
        overwrite: drop finished chunks made with another fingerprint instead of refusing.

    Raises:
        SettingsChanged: finished chunks with another recorded fingerprint, and not ``overwrite``.
    """

    def __init__(self, out_dir: Path, stem: str, key: str, fingerprint: dict[str, Any] | None = None,
                 overwrite: bool = False) -> None:
        from denuc.stream.fingerprint import check_same

        self.dir = Path(out_dir) / f".{stem}.partial"
        self.key = key
        self.fingerprint = fingerprint
        meta = self.dir / "plan.json"
        old = None
        if meta.is_file():
            try:
                recorded = json.loads(meta.read_text())
            except (OSError, ValueError):
                recorded = {}
            old = recorded.get("key")
            old_fp = recorded.get("fingerprint")
            if fingerprint is not None and old_fp is not None and not overwrite and self.done():
                check_same(old_fp, fingerprint, f"the finished chunks of {stem} in {self.dir}")
        if old != key and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        self.resumed = old == key

    def _path(self, k: int) -> Path:
        return self.dir / f"chunk-{k:06d}.npz"

    def done(self) -> set[int]:
        """Indices of the finished chunks (only files that load count)."""
        out = set()
        if not self.dir.is_dir():
            return out
        for p in self.dir.glob("chunk-*.npz"):
            try:
                out.add(int(p.stem.split("-")[1]))
            except ValueError:
                continue
        return out

    def save(self, k: int, nuclei: Nuclei) -> None:
        if not (self.dir / "plan.json").is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.dir / "plan.json", json.dumps({"key": self.key, "fingerprint": self.fingerprint}))
        tiles = nuclei.meta.get(TILE_KEY)
        extra = None if tiles is None else {_TILE_ARRAY: np.asarray(tiles, dtype=np.int64)}
        nuclei.save(self._path(k), extra=extra)

    def readable(self, k: int) -> bool:
        """Whether chunk ``k``'s file is a complete archive (a damaged one is recomputed)."""
        import zipfile

        return zipfile.is_zipfile(self._path(k))

    def load(self, k: int) -> Nuclei:
        """Chunk ``k`` as saved, ``meta[TILE_KEY]`` included when it was saved with one."""
        p = self._path(k)
        nuc = Nuclei.load(p)
        with np.load(p, allow_pickle=False) as z:
            if _TILE_ARRAY in z.files:
                nuc.meta[TILE_KEY] = z[_TILE_ARRAY].astype(np.int64)
        return nuc

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
