"""Python API of the point detector: :class:`Detector`.

``Detector.load(path)`` reads a self-describing checkpoint (``None`` = the model shipped in
``denuc/assets/detector.safetensors``). ``detect(image, mpp)`` resamples the image from its
``mpp`` to the model's, runs window inference (256 px windows, stride 192, 32 px inner
margin, global point NMS) and maps the points back exactly (:meth:`Nuclei.rescale`), so
``xy`` is in the INPUT image's pixels (x, y), pixel-edge frame.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from denuc.core.mpp import check_mpp
from denuc.core.result import Nuclei
from denuc.errors import InputError, ModelError

DEFAULT_DETECTOR = "detector.safetensors"


def default_detector_path() -> Path:
    """Path of the detector shipped with the package."""
    return Path(str(resources.files("denuc") / "assets" / DEFAULT_DETECTOR))


class Detector:
    """A loaded point detector.

    Attributes:
        mpp: µm per pixel the model works at (inputs are resampled to it).
        config: the checkpoint metadata (architecture, classes, threshold, NMS radius, ...).
        threshold: score threshold (points with score > threshold are kept).
        class_names: ``("nucleus",)`` for a class-agnostic model, else the trained classes.
    """

    def __init__(self, model: Any, meta: dict[str, Any], device: Any, threshold: float | None = None,
                 batch_size: int = 16) -> None:
        self.model = model
        self.config = meta
        self.device = device
        self.mpp = float(meta["mpp"])
        self.threshold = float(model.config.score_threshold if threshold is None else threshold)
        self.class_names = tuple(model.config.class_names)
        self.batch_size = batch_size
        self.window = int(meta.get("window", 256))
        self.stride = int(meta.get("stride", 192))
        self.margin = float(meta.get("margin", 32))

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, device: Any = None,
             threshold: float | None = None) -> Detector:
        """Load a checkpoint (``None`` = the shipped default) onto ``device`` (default: cuda, mps, cpu)."""
        from denuc.detect.checkpoint import load_detector
        from denuc.train.detector import pick_device

        p = Path(path) if path is not None else default_detector_path()
        if path is None and not p.is_file():
            raise ModelError(f"no default detector shipped at {p}; pass a checkpoint path")
        dev = pick_device(str(device) if device is not None else None)
        model, meta = load_detector(p, dev)
        return cls(model, meta, dev, threshold)

    def _prepare(self, image: np.ndarray, mpp: float | None, name: str) -> tuple[np.ndarray, float]:
        from denuc.data.resample import resample, resample_factor

        mpp_v = check_mpp(mpp, name or "image")
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise InputError(f"{name or 'image'}: expected an (H, W, 3) uint8 RGB array; got "
                             f"{img.shape} {img.dtype}")
        return resample(img, resample_factor(mpp_v, self.mpp)), mpp_v

    def detect_many(self, images: Sequence[np.ndarray], mpps: Sequence[float | None],
                    names: Sequence[str] | None = None) -> list[Nuclei]:
        """Detect in several images at once (windows of all images share batches).

        Args:
            images: ``(H, W, 3)`` uint8 RGB arrays.
            mpps: µm per pixel of each image (required; ``None`` raises ResolutionError).
            names: optional names stored in each result.

        Returns:
            one :class:`Nuclei` per image, ``xy`` in that image's pixels, ``mpp`` = its mpp.
        """
        from denuc.detect.windows import detect_images

        names = list(names) if names is not None else [""] * len(images)
        if not (len(images) == len(mpps) == len(names)):
            raise InputError(f"{len(images)} images, {len(mpps)} mpps and {len(names)} names")
        prepared = [self._prepare(im, m, n) for im, m, n in zip(images, mpps, names, strict=True)]
        dets = detect_images(self.model, [p[0] for p in prepared], threshold=self.threshold,
                             window=self.window, stride=self.stride, margin=self.margin,
                             batch_size=self.batch_size, device=self.device)
        out = []
        for img, (work, mpp_v), d, n in zip(images, prepared, dets, names, strict=True):
            nuc = Nuclei(d.xy, d.scores, d.labels, self.class_names,
                         d.probs if len(self.class_names) > 1 else None, mpp=self.mpp,
                         image_size=work.shape[:2], name=n)
            nuc = nuc.rescale(mpp_v)
            nuc.image_size = (int(img.shape[0]), int(img.shape[1]))
            out.append(nuc.select(nuc.inside(*nuc.image_size)))
        return out

    def detect(self, image: np.ndarray, mpp: float | None, name: str = "") -> Nuclei:
        """Nuclei of one ``(H, W, 3)`` uint8 image at ``mpp`` µm/px (``class_names=("nucleus",)``)."""
        return self.detect_many([image], [mpp], [name])[0]

    def __repr__(self) -> str:
        return (f"Detector({self.model.config.backbone}, mpp={self.mpp}, threshold={self.threshold}, "
                f"classes={list(self.class_names)})")
