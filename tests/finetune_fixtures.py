"""A tiny two-class point dataset in the generic layout and a tiny starting detector (tests only)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

#: RGB of the planted nuclei of each class (dark-blue "dark", pink "light") on a pale background.
BLOB_RGB = ((70, 40, 150), (200, 90, 170))


def make_points_dataset(root: Path, n_images: int = 8, size: int = 96, n_blobs: int = 10, mpp: float = 0.5,
                        with_val: bool = True, seed: int = 0, classes: Sequence[str] = ("dark", "light")) -> Path:
    """``root`` in the generic layout: ``n_images`` RGB images of ``size`` px at ``mpp`` µm/px with
    ``n_blobs`` Gaussian nuclei each (sigma 2.5 px, on a jittered grid so that they do not
    touch), class 0 or 1 drawn at random; points (x, y) at the blob centres. Splits: the last
    image is test, the two before it val (``with_val``), the rest train."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "points").mkdir()
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    g = int(np.ceil(np.sqrt(n_blobs)))
    step = (size - 16) / g
    stems = []
    for i in range(n_images):
        img = np.full((size, size, 3), 215.0) + rng.normal(0, 5, (size, size, 3))
        cells = rng.permutation(g * g)[:n_blobs]
        xy = np.stack([8 + (cells % g + 0.5) * step, 8 + (cells // g + 0.5) * step], 1) + rng.uniform(-2, 2, (n_blobs, 2))
        ids = rng.integers(0, 2, n_blobs)
        for (x, y), c in zip(xy, ids, strict=True):
            m = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 2.5 ** 2))[..., None]
            img = img * (1 - m) + np.array(BLOB_RGB[c], float) * m
        stem = f"im{i:02d}"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / "images" / f"{stem}.png")
        rows = ["x,y,class"] + [f"{x:.2f},{y:.2f},{classes[c]}" for (x, y), c in zip(xy, ids, strict=True)]
        (root / "points" / f"{stem}.csv").write_text("\n".join(rows) + "\n")
        stems.append(stem)
    n_val = 2 if with_val else 0
    splits = {"train": stems[: n_images - n_val - 1], "val": stems[n_images - n_val - 1: n_images - 1],
              "test": stems[-1:]}
    (root / "dataset.yaml").write_text(yaml.safe_dump({"mpp": mpp, "classes": list(classes), "splits": splits}))
    return root


def tiny_start_detector(ds: Path, out: Path) -> Path:
    """A ``tiny``-backbone detector trained briefly (quick preset, about 5 s) on ``ds``: the
    stand-in for the shipped detector that finetune starts from."""
    from denuc.train.detector import train
    from denuc.train.detector_config import TrainConfig

    train(TrainConfig.from_preset("quick", datasets=[str(ds)], out=str(out), backbone="tiny", epochs=8, batch_size=4,
                                  crop=64, progress=False, threads=1, lr=3e-3, crops_per_epoch=2.0), log=lambda m: None)
    return out / "best.safetensors"
