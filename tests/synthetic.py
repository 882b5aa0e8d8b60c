"""Synthetic blob images and point datasets for the tests: the one module that draws them.

Three painters put nuclei-like blobs on an image at known centres (x, y), in pixels, pixel-edge
frame (pixel ``(i, j)`` covers ``[j, j+1) x [i, i+1)``, its centre is ``(j + 0.5, i + 0.5)``):
:func:`darken_blobs` (grey Gaussian dips), :func:`blend_blobs` (Gaussian blends towards a colour)
and :func:`paint_discs` (hard discs of a colour). On top of them:

* :func:`planted_nuclei_image`: one H&E-like RGB image with ``n`` separated nuclei (slides,
  tiling, resampling);
* :func:`blob_images`: a batch of grey blob images with their centres (detector model tests);
* :func:`write_blob_dataset`: a BRCA-M2C-layout folder of grey blobs (detector training);
* :func:`make_points_dataset`: a two-class dataset in the generic layout (finetune, defaults),
  and :func:`tiny_start_detector`, a tiny detector trained briefly on it;
* :func:`make_blob_dataset`: a two-class dataset read by :class:`BlobDataset` (head training).

Each takes a seed, so the same call draws the same pixels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from denuc.core.result import Nuclei
from denuc.data.base import SPLITS, PointDataset


# ------------------------------------------------------------------ painters
def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(yy, xx)``, each ``(h, w)``."""
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return yy, xx


def darken_blobs(img: np.ndarray, xy: np.ndarray, sigma: float = 2.0, depth: float = 120.0) -> np.ndarray:
    """``img`` (float, ``(H, W)``) minus a Gaussian dip of ``depth`` (std ``sigma`` px) at each ``xy`` row."""
    yy, xx = _grid(*img.shape[:2])
    for x, y in xy:
        img = img - depth * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))
    return img


def blend_blobs(img: np.ndarray, xy: np.ndarray, rgb: Sequence[Sequence[float]], sigma: float) -> np.ndarray:
    """``img`` (``(H, W, 3)``) blended towards ``rgb[k]`` with a Gaussian weight (std ``sigma`` px,
    1 at the centre) around each ``xy[k]``; float64 out."""
    yy, xx = _grid(*img.shape[:2])
    for (x, y), c in zip(xy, rgb, strict=True):
        m = np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma ** 2))[..., None]
        img = img * (1 - m) + np.asarray(c, float) * m
    return img


def paint_discs(img: np.ndarray, xy: np.ndarray, rgb: Sequence[Sequence[float]], radius: float) -> np.ndarray:
    """``img`` (``(H, W, 3)``, changed in place and returned) with a disc of ``rgb[k]`` (pixel
    centres closer than ``radius`` px) around each ``xy[k]``."""
    yy, xx = _grid(*img.shape[:2])
    for (x, y), c in zip(xy, rgb, strict=True):
        img[(xx - x) ** 2 + (yy - y) ** 2 < radius ** 2] = c
    return img


def _save_rgb(img: np.ndarray, path: Path) -> None:
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path)


# ------------------------------------------------------------------ images
def planted_nuclei_image(h: int, w: int, n: int, seed: int = 0, r: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """An H&E-like ``(h, w, 3)`` uint8 image with ``n`` dark nuclei (radius about ``r`` px) at
    least ``4 r`` apart and 12 px from the border; returns ``(image, centres (n, 2) x, y)``."""
    rng = np.random.default_rng(seed)
    pts: list[np.ndarray] = []
    while len(pts) < n:
        p = rng.uniform([12, 12], [w - 12, h - 12])
        if all(np.hypot(*(p - q)) > 4 * r for q in pts):
            pts.append(p)
    img = np.full((h, w, 3), (235, 200, 220), np.float32)
    img = blend_blobs(img, np.array(pts), [(70, 40, 120)] * n, r / 1.5)
    return np.clip(img, 0, 255).astype(np.uint8), np.array(pts)


def blob_images(n: int, size: int, per_image: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``n`` grey RGB images ``(n, size, size, 3)`` uint8 of ``per_image`` dark Gaussian blobs
    (sigma 2 px) on light noise, and each image's centres (x, y)."""
    rng = np.random.default_rng(seed)
    imgs, pts = [], []
    for _ in range(n):
        img = 200 + rng.normal(0, 6, (size, size))
        c = rng.uniform(6, size - 6, (per_image, 2))
        img = darken_blobs(img, c)
        imgs.append(np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, axis=2))
        pts.append(c)
    return np.stack(imgs), pts


# ------------------------------------------------------------------ datasets
def write_blob_dataset(root: Path, n_train: int = 3, n_val: int = 2, size: int = 96) -> Path:
    """A BRCA-M2C-layout folder (0.5 µm/px) of dark blobs (8 per image) with ``y x class`` labels."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    splits: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for i in range(n_train + n_val):
        stem = f"img{i}"
        c = rng.uniform(8, size - 8, (8, 2))
        img = darken_blobs(210 + rng.normal(0, 5, (size, size)), c)
        Image.fromarray(np.repeat(np.clip(img, 0, 255).astype(np.uint8)[..., None], 3, 2)).save(
            root / "images" / f"{stem}.png")
        lines = [f"{y:.2f} {x:.2f} {1 + k % 3}" for k, (x, y) in enumerate(c)]
        (root / "labels" / f"{stem}_gt_class_coords.txt").write_text("\n".join(lines) + "\n")
        splits["train" if i < n_train else "val"].append(f"{stem}.png")
    for s, names in splits.items():
        (root / f"brca_ds_{s}.txt").write_text("\n".join(names) + ("\n" if names else ""))
    return root


#: RGB of the planted nuclei of each class of :func:`make_points_dataset` (dark-blue "dark",
#: pink "light") on a pale background.
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
    g = int(np.ceil(np.sqrt(n_blobs)))
    step = (size - 16) / g
    stems = []
    for i in range(n_images):
        img = np.full((size, size, 3), 215.0) + rng.normal(0, 5, (size, size, 3))
        cells = rng.permutation(g * g)[:n_blobs]
        xy = np.stack([8 + (cells % g + 0.5) * step, 8 + (cells // g + 0.5) * step], 1) + rng.uniform(-2, 2, (n_blobs, 2))
        ids = rng.integers(0, 2, n_blobs)
        img = blend_blobs(img, xy, [BLOB_RGB[c] for c in ids], 2.5)
        stem = f"im{i:02d}"
        _save_rgb(img, root / "images" / f"{stem}.png")
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


#: Class names of :func:`make_blob_dataset`, and the RGB of their discs.
BLOB_CLASSES = ("dark", "light")
_DISC_RGB = ((60, 60, 160), (235, 210, 90))


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
    """Write ``n_images`` RGB images of ``size`` px (mid-grey noise, ``n_blobs`` discs of radius
    4.5 px: class ``dark`` darker, ``light`` lighter; points at the disc centres) to ``folder``
    and open it. Splits: the last ``n_images // 8`` (at least 1) images are test, as many before
    them val (``with_val``), the rest train."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    stems = []
    for i in range(n_images):
        img = np.full((size, size, 3), 150.0) + rng.normal(0, 6, (size, size, 3))
        xy = rng.uniform(6, size - 6, (n_blobs, 2))
        ids = rng.integers(0, 2, n_blobs)
        img = paint_discs(img, xy, [_DISC_RGB[c] for c in ids], 4.5)
        stem = f"blobs_{i:02d}"
        _save_rgb(img, root / f"{stem}.png")
        np.savez(root / f"{stem}.npz", xy=xy, ids=ids)
        stems.append(stem)
    n_test = max(1, n_images // 8)
    n_val = max(1, n_images // 8) if with_val else 0
    splits = {"train": stems[: n_images - n_val - n_test], "val": stems[n_images - n_val - n_test: n_images - n_test],
              "test": stems[n_images - n_test:]}
    (root / "blobs.json").write_text(json.dumps({"classes": list(BLOB_CLASSES), "mpp": mpp, "splits": splits}))
    return BlobDataset(root)
