"""Point-aware augmentation for detector training: every geometric change moves the
points exactly with the pixels (pixel-edge frame: pixel ``(col c, row r)`` spans
``[c, c+1) x [r, r+1)``, so its centre is ``(c + 0.5, r + 0.5)``).

Geometry: random rescale (zoom in/out, via :func:`denuc.data.resample.resample`), a random
``crop x crop`` window (images smaller than it are placed at a random offset on a canvas of
:data:`PAD_VALUE`), horizontal/vertical flips and 90° rotations. Photometry (points
unchanged): optional H&E stain jitter (:func:`denuc.data.stain.stain_jitter`, off by
default), colour jitter (brightness .25, contrast .25, saturation .1, hue .05), Gaussian
blur and Gaussian noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from denuc.data.resample import resample
from denuc.data.stain import stain_jitter
from denuc.detect.tta import points_to_transformed
from denuc.detect.windows import PAD_VALUE  # noqa: F401  (the canvas value, shared with inference)


@dataclass
class AugmentConfig:
    """Probabilities and ranges of each augmentation (``p_*`` in [0, 1])."""

    crop: int = 256
    scale_range: tuple[float, float] = (0.8, 1.25)
    p_scale: float = 0.5
    p_flip: float = 0.5
    p_rot90: float = 0.75
    brightness: float = 0.25
    contrast: float = 0.25
    saturation: float = 0.1
    hue: float = 0.05
    p_jitter: float = 0.8
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.2)
    p_noise: float = 0.2
    noise_sigma: tuple[float, float] = (2.0, 8.0)
    p_stain: float = 0.0
    stain_strength: float = 0.4
    stain_space: str = "hed"


def hflip(img: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror left-right: ``x' = W - x``."""
    return img[:, ::-1], points_to_transformed(xy, 0, True, img.shape[:2])


def vflip(img: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror top-bottom: ``y' = H - y``."""
    out = xy.copy()
    out[:, 1] = img.shape[0] - xy[:, 1]
    return img[::-1], out


def rot90(img: np.ndarray, xy: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rotate by ``k`` x 90° counter-clockwise (as ``np.rot90``): ``(x, y) -> (y, W - x)`` per turn
    (the same mapping as the detector's test-time augmentation, :mod:`denuc.detect.tta`)."""
    return np.rot90(img, k % 4), points_to_transformed(xy, k, False, img.shape[:2])


def random_crop(img: np.ndarray, xy: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A ``size x size`` window at a random position; sides shorter than ``size`` are
    placed at a random offset on a :data:`PAD_VALUE` canvas. Points outside are dropped."""
    h, w = img.shape[:2]
    canvas = np.full((size, size, 3), PAD_VALUE, dtype=np.uint8)
    # x0 > 0: crop starts inside the image; x0 < 0: image starts at -x0 in the canvas
    x0 = int(rng.integers(0, w - size + 1)) if w >= size else -int(rng.integers(0, size - w + 1))
    y0 = int(rng.integers(0, h - size + 1)) if h >= size else -int(rng.integers(0, size - h + 1))
    sx, sy = max(x0, 0), max(y0, 0)
    dx, dy = max(-x0, 0), max(-y0, 0)
    cw, ch = min(w - sx, size - dx), min(h - sy, size - dy)
    canvas[dy:dy + ch, dx:dx + cw] = img[sy:sy + ch, sx:sx + cw]
    local = xy - np.array([x0, y0], dtype=np.float64)
    keep = (local[:, 0] >= 0) & (local[:, 0] < size) & (local[:, 1] >= 0) & (local[:, 1] < size)
    return canvas, local[keep], labels[keep]


def photometric(img: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Stain jitter, colour jitter, blur and noise on an ``(H, W, 3)`` uint8 image (geometry unchanged)."""
    import torchvision.transforms.v2.functional as TF

    if cfg.p_stain > 0 and rng.random() < cfg.p_stain:
        img = stain_jitter(img, rng, cfg.stain_strength, cfg.stain_space)
    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    if rng.random() < cfg.p_jitter:
        ops = [
            lambda x: TF.adjust_brightness(x, float(rng.uniform(1 - cfg.brightness, 1 + cfg.brightness))),
            lambda x: TF.adjust_contrast(x, float(rng.uniform(1 - cfg.contrast, 1 + cfg.contrast))),
            lambda x: TF.adjust_saturation(x, float(rng.uniform(1 - cfg.saturation, 1 + cfg.saturation))),
            lambda x: TF.adjust_hue(x, float(rng.uniform(-cfg.hue, cfg.hue))),
        ]
        for i in rng.permutation(len(ops)):
            t = ops[i](t)
    if rng.random() < cfg.p_blur:
        s = float(rng.uniform(*cfg.blur_sigma))
        k = 2 * int(np.ceil(2.5 * s)) + 1
        t = TF.gaussian_blur(t, [k, k], [s, s])
    out = t.permute(1, 2, 0).numpy()
    if rng.random() < cfg.p_noise:
        noise = rng.normal(0.0, float(rng.uniform(*cfg.noise_sigma)), out.shape)
        out = np.clip(out.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(out)


def augment(img: np.ndarray, xy: np.ndarray, labels: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator,
            photometric_ops: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training sample: ``(crop (S, S, 3) uint8, xy (N, 2) float64 px, labels (N,))``."""
    if rng.random() < cfg.p_scale:
        f = float(np.exp(rng.uniform(np.log(cfg.scale_range[0]), np.log(cfg.scale_range[1]))))
        # crop a region a little larger than the crop's footprint first, then rescale only
        # that region (rescaling the whole image for every crop dominated the cost)
        region = int(np.ceil(cfg.crop / f)) + 4
        if region < max(img.shape[:2]):
            img, xy, labels = random_crop(img, xy, labels, region, rng)
        img, xy = resample(img, f), xy * f
    img, xy, labels = random_crop(img, xy, labels, cfg.crop, rng)
    if rng.random() < cfg.p_flip:
        img, xy = hflip(img, xy)
    if rng.random() < cfg.p_flip:
        img, xy = vflip(img, xy)
    if rng.random() < cfg.p_rot90:
        img, xy = rot90(img, xy, int(rng.integers(1, 4)))
    img = np.ascontiguousarray(img)
    if photometric_ops:
        img = photometric(img, cfg, rng)
    return img, xy, labels
