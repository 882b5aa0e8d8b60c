"""Python API of the point detector: :class:`Detector`.

``Detector.load(path)`` reads a self-describing checkpoint (``None`` = the model shipped in
``denuc/assets/detector.safetensors``). ``detect(image, mpp)`` resamples the image from its
``mpp`` to the model's, runs window inference (256 px windows, stride 192, 32 px inner
margin, global point NMS) and maps the points back exactly (:meth:`Nuclei.rescale`), so
``xy`` is in the INPUT image's pixels (x, y), pixel-edge frame.

``tta=4`` (or 2, 8) runs the detector on rotated/mirrored copies of each image and fuses the
passes (:mod:`denuc.detect.tta`, :func:`denuc.merge.fuse.fuse_points`): ``tta`` times the
work, fewer spurious points. Its score threshold is the one chosen on val for that many
passes when the checkpoint records one (``tta_thresholds``), else the checkpoint's own.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from denuc.core.mpp import check_mpp
from denuc.core.result import Nuclei
from denuc.data.image import MAX_IMAGE_PIXELS
from denuc.errors import InputError, ModelError

DEFAULT_DETECTOR = "detector.safetensors"

#: Largest image (pixels) the detector works on after resampling to its mpp: the bound of
#: :data:`denuc.data.image.MAX_IMAGE_PIXELS` (2**28 px, about 3 GB as float32 RGB while resampling).
MAX_WORK_PIXELS = MAX_IMAGE_PIXELS


def check_threshold(threshold: Any) -> float:
    """``threshold`` as float if it is a valid detection score threshold, else :class:`InputError`.

    Scores are ``1 - p(background)`` in [0, 1] and points with ``score > threshold`` are kept, so
    the threshold must be finite with ``0 <= threshold < 1`` (1 or more would keep nothing).
    """
    bad = isinstance(threshold, bool)
    try:
        t = float(threshold)
    except (TypeError, ValueError):
        bad, t = True, math.nan
    if bad or not math.isfinite(t) or not 0.0 <= t < 1.0:
        shown = repr(threshold) if bad else f"{t:g}"
        raise InputError(f"detection threshold must be a number with 0 <= threshold < 1 (scores are in [0, 1]); "
                         f"got {shown}")
    return t


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
        tta: test-time augmentation passes (1 = none; 2, 4, 8; class-agnostic models only).
    """

    def __init__(self, model: Any, meta: dict[str, Any], device: Any, threshold: float | None = None,
                 batch_size: int | None = None, tta: int = 1, window: int | None = None,
                 runtime: str = "auto") -> None:
        from denuc.detect.tta import tta_passes
        from denuc.runtime import make_runner

        self.model = model
        self.config = meta
        self.device = device
        self.mpp = float(meta["mpp"])
        self.class_names = tuple(model.config.class_names)
        self.passes = tta_passes(int(tta))
        self.tta = int(tta)
        if self.tta > 1 and len(self.class_names) > 1:
            raise InputError(f"test-time augmentation fuses class-agnostic points; this detector has classes "
                             f"{list(self.class_names)} (use tta=1)")
        tta_thr = (meta.get("tta_thresholds") or {}).get(str(self.tta)) if self.tta > 1 else None
        default = tta_thr if tta_thr is not None else model.config.score_threshold
        self.threshold = check_threshold(default if threshold is None else threshold)
        self.margin = float(meta.get("margin", 32))
        if window is None:
            self.window = int(meta.get("window", 256))
            self.stride = int(meta.get("stride", 192))
        else:  # any window: neighbours overlap by the two margins, so every point has a window that keeps it
            self.window = int(window)
            self.stride = self.window - 2 * int(math.ceil(self.margin))
            if self.stride < 1 or self.window % 32:
                raise InputError(f"detector window must be a multiple of 32 larger than twice the margin "
                                 f"({self.margin:g} px); got {window}")
        #: what runs the model's forward pass (:mod:`denuc.runtime`): ``runner.runtime`` is ``torch``,
        #: ``onnx`` (PyTorch's results within float32 rounding) or ``onnx-int8`` (quantized,
        #: calibrated on :meth:`calibration_inputs`)
        self.runner = make_runner(model, runtime, method="raw", name="detector", device=device,
                                  calibration=self.calibration_inputs)
        if batch_size is None:  # about 4 Mpx per forward pass on a GPU; on a CPU 0.25 Mpx with PyTorch,
            # where larger batches leave the caches and run slower (benchmarks/detector_speed.py --batch),
            # and 1 Mpx with ONNX Runtime, whose time per window does not grow with the batch and which
            # splits a batch over the threads (larger batches keep them busy together)
            import torch

            from denuc.runtime.base import ONNX_RUNTIMES

            on_gpu = torch.device(device).type == "cuda"
            px = 2**22 if on_gpu else 2**20 if self.runner.runtime in ONNX_RUNTIMES else 2**18
            batch_size = max(1, px // self.window**2)
        self.batch_size = int(batch_size)
        self.path: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, device: Any = None,
             threshold: float | None = None, tta: int = 1, batch_size: int | None = None,
             window: int | None = None, runtime: str = "auto") -> Detector:
        """Load a checkpoint (``None`` = the shipped default) onto ``device`` (default: cuda, mps, cpu).

        Args:
            tta: test-time augmentation passes (1, 2, 4, 8).
            batch_size: windows per forward pass (default: 4 Mpx of windows on CUDA, 1 Mpx with
                ONNX Runtime, 0.25 Mpx with PyTorch on the CPU); results do not depend on it.
            window: inference window side in pixels at the model's mpp (default: the
                checkpoint's); windows overlap by twice the checkpoint's margin.
            runtime: ``auto`` (ONNX Runtime on the CPU when installed, else PyTorch), ``torch``
                (the reference) or ``onnx`` (:mod:`denuc.runtime`).
        """
        from denuc.detect.checkpoint import load_detector
        from denuc.core.device import pick_device

        if threshold is not None:
            check_threshold(threshold)  # before loading anything
        p = Path(path) if path is not None else default_detector_path()
        if path is None and not p.is_file():
            raise ModelError(f"no default detector shipped at {p}; pass a checkpoint path")
        dev = pick_device(str(device) if device is not None else None)
        model, meta = load_detector(p, dev)
        det = cls(model, meta, dev, threshold, batch_size=batch_size, tta=tta, window=window, runtime=runtime)
        det.path = p
        return det

    def calibration_inputs(self, shape: tuple[int, ...]) -> np.ndarray:
        """``(N, *shape)`` float32 model inputs that calibrate the ``onnx-int8`` runtime: the
        windows of the bundled sample image (:func:`denuc.runtime.int8.sample_rgb`) at the model's
        mpp, cut and normalised as :func:`~denuc.detect.windows.detect_images` does.

        Args:
            shape: ``(3, H, W)`` of one window.
        """
        from denuc.data.resample import resample, resample_factor
        from denuc.detect.model import normalise
        from denuc.detect.windows import _pad
        from denuc.merge.tiling import window_origins
        from denuc.runtime.int8 import sample_rgb

        _, h, w = shape
        rgb, mpp = sample_rgb()
        img = _pad(resample(rgb, resample_factor(mpp, self.mpp)), max(h, w))
        ys = window_origins(img.shape[0], h, max(1, h - 2 * int(self.margin)))
        xs = window_origins(img.shape[1], w, max(1, w - 2 * int(self.margin)))
        crops = np.stack([img[y:y + h, x:x + w] for y in ys for x in xs])
        cfg = self.model.config
        return normalise(crops, cfg.mean, cfg.std).numpy()

    def describe(self) -> dict[str, Any]:
        """Name, weights hash (sha256 of the checkpoint file) and inference settings, for summaries."""
        import hashlib

        path = getattr(self, "path", None)
        sha = None
        if path is not None and Path(path).is_file():
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            sha = h.hexdigest()
        return {"checkpoint": Path(path).name if path is not None else None, "sha256": sha,
                "backbone": self.model.config.backbone, "mpp": self.mpp, "threshold": self.threshold,
                "tta": self.tta, "window": self.window, "stride": self.stride, "margin": self.margin,
                "runtime": self.runner.runtime}

    def _prepare(self, image: Any, mpp: float | None, name: str) -> tuple[np.ndarray, np.ndarray, float]:
        """``(image as (H, W, 3) uint8, image resampled to the model's mpp, mpp)``; any array
        :func:`~denuc.data.image.to_rgb_uint8` reads is converted (gray, RGBA, 16-bit, float)."""
        from denuc.data.image import as_rgb_image
        from denuc.data.resample import resample, resample_factor, resampled_size

        src = name or "image"
        mpp_v = check_mpp(mpp, src)
        img = as_rgb_image(image, src)
        f = resample_factor(mpp_v, self.mpp)
        h, w = resampled_size(img.shape[:2], f)
        if h * w > MAX_WORK_PIXELS:
            raise InputError(f"{src}: {img.shape[1]} x {img.shape[0]} px at {mpp_v:g} µm/px becomes {w} x {h} px at "
                             f"the detector's {self.mpp:g} µm/px, more than {MAX_WORK_PIXELS / 1e6:.0f} Mpx; check "
                             "--mpp, or cut the image into tiles")
        return img, resample(img, f), mpp_v

    def detect_many(self, images: Sequence[np.ndarray | str | os.PathLike[str]], mpps: Sequence[float | None],
                    names: Sequence[str] | None = None) -> list[Nuclei]:
        """Detect in several images at once (windows of all images share batches).

        Args:
            images: ``(H, W, 3)`` uint8 RGB arrays; other layouts that
                :func:`~denuc.data.image.to_rgb_uint8` converts (``(H, W)`` gray, RGBA, 16-bit,
                float) are converted, and a file path is read with
                :func:`~denuc.data.image.read_image`.
            mpps: µm per pixel of each image (required; ``None`` raises ResolutionError).
            names: optional names stored in each result (default: a file's stem, else empty).

        Returns:
            one :class:`Nuclei` per image, ``xy`` in that image's pixels, ``mpp`` = its mpp.
        """
        names = list(names) if names is not None else [""] * len(images)
        if not (len(images) == len(mpps) == len(names)):
            raise InputError(f"{len(images)} images, {len(mpps)} mpps and {len(names)} names")
        for i, im in enumerate(images):
            if isinstance(im, (str, os.PathLike)):
                check_mpp(mpps[i], str(im))  # before reading the file
                names[i] = names[i] or Path(im).stem
        prepared = [self._prepare(im, m, n) for im, m, n in zip(images, mpps, names, strict=True)]
        dets = self.detect_works([p[1] for p in prepared])
        out = []
        for (img, work, mpp_v), d, n in zip(prepared, dets, names, strict=True):
            nuc = Nuclei(d.xy, d.scores, d.labels, self.class_names,
                         d.probs if len(self.class_names) > 1 else None, mpp=self.mpp,
                         image_size=work.shape[:2], name=n)
            nuc = nuc.rescale(mpp_v)
            nuc.image_size = (int(img.shape[0]), int(img.shape[1]))
            out.append(nuc.select(nuc.inside(*nuc.image_size)))
        return out

    def detect_cohort(self, inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                      mpp: float | None = None, mpp_default: float | None = None, opts: Any = None,
                      inputs_file: str | os.PathLike[str] | None = None, shard: tuple[int, int] | None = None,
                      tile_px: int | None = None, workers: int = 2,
                      jobs: int | str = "auto") -> Any:
        """Every input (files, folders, globs) into output files in ``out``, as ``denuc detect``
        does: the same engine and arguments as :meth:`denuc.pipeline.DeNuC.predict_many`.

        Returns:
            :class:`~denuc.cohort.runner.CohortResult` (one result per input).
        """
        from denuc.cohort.runner import run_cohort
        from denuc.stream.runner import TILE_PX, TileStream

        def build() -> tuple[Any, dict[str, Any], None]:
            stream = TileStream(self, None, tile_px=tile_px or TILE_PX, workers=workers)
            return stream, {"detector": self.describe()}, None

        return run_cohort(inputs, out, build, opts=opts, inputs_file=inputs_file, mpp=mpp, mpp_default=mpp_default,
                          shard=shard, jobs=jobs)

    #: :meth:`detect_works` takes ``regions`` (windows away from them are skipped)
    skips_windows = True

    def detect_works(self, works: Sequence[np.ndarray], regions: Sequence[Any] | None = None) -> list[Any]:
        """Raw detections (:class:`~denuc.detect.windows.RawDetections`, points in each image's
        pixels at the model's mpp, after the margin rule, NMS and the threshold) of images already
        at :attr:`mpp` (``(H, W, 3)`` uint8 each), with test-time augmentation when set.

        ``regions``: per image, None or a test of boxes (:data:`denuc.detect.windows.RegionTest`):
        windows far from every region are not run (:func:`~denuc.detect.windows.detect_images`);
        ignored with test-time augmentation."""
        from denuc.detect.windows import detect_images

        if self.tta > 1:
            return self._detect_tta(list(works))
        return detect_images(self.model, list(works), threshold=self.threshold, window=self.window,
                             stride=self.stride, margin=self.margin, batch_size=self.batch_size, device=self.device,
                             forward=self.runner, regions=regions)

    def _detect_tta(self, works: list[np.ndarray]) -> list[Any]:
        """Fused detections of every pass of :attr:`passes` on each working-mpp image."""
        from denuc.detect.tta import points_to_original, transform_image
        from denuc.detect.windows import RawDetections, detect_images
        from denuc.merge.fuse import fuse_points

        floor = min(0.05, self.threshold / 2)  # proposals kept per pass; the fused score is thresholded
        batch = [transform_image(w, k, f) for w in works for k, f in self.passes]
        raw = detect_images(self.model, batch, threshold=floor, window=self.window, stride=self.stride,
                            margin=self.margin, batch_size=self.batch_size, device=self.device, forward=self.runner)
        radius = float(self.model.config.nms_radius_px)
        out = []
        for i, w in enumerate(works):
            hw = (int(w.shape[0]), int(w.shape[1]))
            per = raw[i * len(self.passes):(i + 1) * len(self.passes)]
            xy, sc = fuse_points([(points_to_original(d.xy, k, f, hw), d.scores)
                                  for d, (k, f) in zip(per, self.passes, strict=True)], radius)
            n = len(sc)
            out.append(RawDetections(xy, sc, np.zeros(n, np.int64), np.ones((n, 1), np.float32))
                       .filter(self.threshold))
        return out

    def detect(self, image: np.ndarray | str | os.PathLike[str], mpp: float | None, name: str = "") -> Nuclei:
        """Nuclei of one image at ``mpp`` µm/px (``class_names=("nucleus",)``): an ``(H, W, 3)``
        uint8 RGB array, another array layout :func:`~denuc.data.image.to_rgb_uint8` converts, or
        an image file path (``name`` defaults to its stem)."""
        return self.detect_many([image], [mpp], [name])[0]

    def __repr__(self) -> str:
        return (f"Detector({self.model.config.backbone}, mpp={self.mpp}, threshold={self.threshold}, "
                f"classes={list(self.class_names)}" + (f", tta={self.tta})" if self.tta > 1 else ")"))
