"""A tiny synthetic two-class point dataset (dark vs light blobs) for smoke tests and demos.

``make_blob_dataset(folder)`` draws ``n_images`` RGB images with round blobs on a mid-grey
background: class ``dark`` blobs are darker, class ``light`` ones lighter. Points are blob
centres (x, y) in pixels; splits are train/val/test (or train/test with ``with_val=False``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from denuc.core.result import Nuclei
from denuc.data.base import SPLITS, PointDataset

BLOB_CLASSES = ("dark", "light")


class BlobDataset(PointDataset):
    """Reader of a folder written by :func:`make_blob_dataset` (not auto-detected)."""

    format_name = "synthetic-blobs"

    def __init__(self, root: str | Path, outside: str = "error") -> None:
        super().__init__(root, outside)
        info = json.loads((self.root / "blobs.json").read_text())
        self.classes = tuple(info["classes"])
        self.colors = ((60, 60, 160), (230, 200, 80))
        self.mpp = float(info["mpp"])
        self._splits: dict[str, list[str]] = info["splits"]

    def stems(self, split: str | None = None) -> list[str]:
        if split is None:
            return [s for sp in SPLITS for s in self._splits.get(sp, [])]
        return list(self._splits.get(split, []))

    def image_path(self, stem: str) -> Path:
        return self.root / f"{stem}.png"

    def _read_points(self, stem: str) -> Nuclei:
        z = np.load(self.root / f"{stem}.npz")
        return Nuclei(z["xy"], class_ids=z["ids"], class_names=self.classes)


def make_blob_dataset(folder: str | Path, n_images: int = 8, size: int = 96, n_blobs: int = 12, mpp: float = 0.25,
                      with_val: bool = True, seed: int = 0) -> BlobDataset:
    """Write the synthetic dataset to ``folder`` and open it."""
    from PIL import Image

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    stems = []
    for i in range(n_images):
        img = np.full((size, size, 3), 150.0) + rng.normal(0, 6, (size, size, 3))
        xy = rng.uniform(6, size - 6, (n_blobs, 2))
        ids = rng.integers(0, 2, n_blobs)
        for (x, y), c in zip(xy, ids):
            m = (xx - x) ** 2 + (yy - y) ** 2 < 4.5 ** 2
            img[m] = (60, 60, 160) if c == 0 else (235, 210, 90)
        stem = f"blobs_{i:02d}"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"{stem}.png")
        np.savez(root / f"{stem}.npz", xy=xy, ids=ids)
        stems.append(stem)
    n_test = max(1, n_images // 8)
    n_val = max(1, n_images // 8) if with_val else 0
    splits = {"train": stems[: n_images - n_val - n_test], "val": stems[n_images - n_val - n_test: n_images - n_test],
              "test": stems[n_images - n_test:]}
    (root / "blobs.json").write_text(json.dumps({"classes": list(BLOB_CLASSES), "mpp": mpp, "splits": splits}))
    return BlobDataset(root)
