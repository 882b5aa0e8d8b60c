"""Tiny random-weight detector checkpoints for tests (tests only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from denuc.detect.checkpoint import save_detector
from denuc.detect.model import DetectorConfig, build_detector


def tiny_detector_checkpoint(path: Path, *, seed: int = 0, score_threshold: float = 0.5, mpp: float = 0.5,
                             **meta: Any) -> Path:
    """A ``tiny``-backbone detector at ``mpp`` µm/px (NMS 3 µm) with random offsets, saved at ``path``;
    ``meta`` adds checkpoint metadata (e.g. ``tta_thresholds``)."""
    torch.manual_seed(seed)
    model = build_detector(DetectorConfig(backbone="tiny", score_threshold=score_threshold,
                                          nms_radius_px=3.0 / mpp)).eval()
    torch.nn.init.normal_(model.head.offset.weight, std=0.05)
    save_detector(path, model, {"mpp": mpp, "nms_radius_um": 3.0, "window": 256, "stride": 192, "margin": 32, **meta})
    return path


def noise_images(folder: Path, n: int, stem: str) -> Path:
    """``folder`` (created) holding ``n`` 96 x 128 px RGB noise PNGs ``<stem><k>.png``, seeded by ``k``."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        arr = np.random.default_rng(k).integers(0, 256, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"{stem}{k}.png")
    return folder
