"""Both DeNuC stages on an image: detect nuclei, encode once, classify each point.

::

    from denuc import DeNuC
    model = DeNuC.load()                         # shipped detector + head (+ the head's encoder)
    nuclei = model("tile.png", mpp=0.5)          # Nuclei: xy (x, y) image px, classes, scores, probs
    nuclei.meta["speed"]                         # {"detect": ms, "encode": ms, "classify": ms}

Scores: ``score = detection score x probability of the predicted class`` (the chance that
the point is a nucleus *of that class*); ``probs`` holds the full class distribution.

A head is only used with the encoder it was trained on: same encoder name, same base
weights (sha256) and same feature taps (built from the head's record), plus the fine-tuned
encoder tensors stored in the head for ``lora``/``full`` heads. Windows are encoded at the
head's working mpp; images at any other mpp are resampled, so the image's ``mpp`` must be
known (:class:`~denuc.errors.ResolutionError` otherwise).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from denuc.classify.head import HeadMeta, PointHead, head_taps, load_head
from denuc.core.mpp import check_mpp
from denuc.core.result import Nuclei
from denuc.data.image import as_rgb_image
from denuc.encode.encoder import Encoder, build_encoder
from denuc.errors import ModelError
from denuc.query.predictor import PointFeaturizer

ASSETS = Path(__file__).resolve().parent / "assets"
#: The head shipped with the package (efficientnet-lite0 features, BRCA-M2C classes).
DEFAULT_HEAD = ASSETS / "head-efficientnet-lite0-brca.safetensors"


class PointDetector(Protocol):
    def detect(self, image: np.ndarray, mpp: float) -> Nuclei: ...


def check_head_encoder(meta: HeadMeta, enc: Encoder, head_path: str) -> None:
    """Refuse a head trained with another encoder or other weights (message names both)."""
    if enc.name != meta.encoder:
        raise ModelError(f"head {head_path} was trained on encoder {meta.encoder!r}, not {enc.name!r}; "
                         f"use --encoder {meta.encoder} or a head trained for {enc.name}")
    if enc.weights_hash != meta.weights_hash:
        trained = f" from {meta.weights_source}" if meta.weights_source else ""
        raise ModelError(f"head {head_path} was trained on {meta.encoder} weights {meta.weights_hash[:12]}...{trained}, "
                         f"but the encoder was loaded with weights {enc.weights_hash[:12]}... ({enc.weights_source}); "
                         "pass the same weights file the head was trained with (the hash is of the file's bytes, so "
                         "the same tensors saved in another format or by another tool count as different)")
    taps = head_taps(meta)
    if tuple(enc.taps) != taps:
        raise ModelError(f"head {head_path} reads {enc.name} taps {'+'.join(taps) or '(none)'}, but the encoder was "
                         f"built with taps {'+'.join(enc.taps) or '(none)'}; build it with taps={list(taps)} "
                         "(DeNuC.load builds the head's own when given the encoder's name)")
    if enc.dim != meta.dim:
        raise ModelError(f"head {head_path} expects {meta.dim}-d features; encoder {enc.name} gives {enc.dim}")
    if enc.input_size != meta.input_size:
        raise ModelError(f"head {head_path} was trained with {meta.input_size} px encoder inputs; encoder {enc.name} "
                         f"takes {enc.input_size} px")


def default_weights_ref(encoder: str) -> str:
    """Portable reference of an encoder's default weights (``hf-hub:org/name``, ``bundled``;
    "" when it has none), comparable with :attr:`HeadMeta.weights_source`."""
    from denuc.encode.specs import get_spec

    spec = get_spec(encoder)
    if spec.family == "efficientnet-lite":
        return "bundled"
    return f"hf-hub:{spec.hub_id}" if spec.hub_id else ""


def check_default_weights(meta: HeadMeta, encoder: str, head_path: str) -> None:
    """Before building ``encoder`` with its default weights (no ``--weights``): refuse, naming the
    expected source, a head whose recorded weights source is another one (a local file, another
    hub repo, random), so that nothing is downloaded in vain. Heads without a recorded source
    (older ones) are not checked here, nor are encoders whose default weights are bundled:
    building those costs nothing, and the hash check (:func:`check_head_encoder`) accepts a
    local copy of the same weights file."""
    src = meta.weights_source
    default = default_weights_ref(encoder)
    if not src or src == default or default == "bundled":
        return
    if src.startswith("hf-hub:") or src == "random":
        how = f"--weights {src} (Python: weights={src!r})"
    else:
        how = f"--weights <your copy of {src}> (a file, or for model.safetensors / pytorch_model.bin its folder)"
    raise ModelError(f"head {head_path} was trained with {meta.encoder} weights from {src} (sha256 "
                     f"{meta.weights_hash[:12]}...), not the encoder's default weights"
                     f"{f' ({default})' if default else ''}; pass {how}")


def apply_encoder_tensors(enc: Encoder, tensors: dict[str, torch.Tensor], head_path: str) -> None:
    """Load the fine-tuned encoder tensors stored in a lora/full head into ``enc`` (in place)."""
    if not tensors:
        return
    own = enc.body.state_dict()
    bad = [k for k, v in tensors.items() if k not in own or own[k].shape != v.shape]
    if bad:
        raise ModelError(f"head {head_path}: fine-tuned encoder tensors do not fit {enc.name}, e.g. {bad[:3]}")
    own.update(tensors)
    enc.body.load_state_dict(own)
    enc.freeze()


class DeNuC:
    """Detector + frozen encoder + head. Call it on an image to get classified nuclei.

    Args:
        detector: anything with ``detect(image (H, W, 3) uint8, mpp) -> Nuclei``.
        encoder: the frozen encoder the head was trained with.
        head: the :class:`PointHead`; ``meta``: its checkpoint metadata.
        batch_size: windows per encoder call (default: the featurizer's for the device).
        runtime: what runs the encoder's forward pass (:mod:`denuc.runtime`): ``auto`` (ONNX
            Runtime on the CPU when installed, 8-bit for a CNN encoder, else PyTorch), ``torch``
            (the reference), ``onnx`` (float32) or ``onnx-int8``.
    """

    def __init__(self, detector: PointDetector, encoder: Encoder, head: PointHead, meta: HeadMeta,
                 batch_size: int | None = None, runtime: str = "auto") -> None:
        self.detector = detector
        self.encoder = encoder
        self.meta = meta
        p = next(encoder.parameters(), None)
        self.device = p.device if p is not None else torch.device("cpu")
        self.head = head.to(self.device).eval()
        self.head_sha256: str | None = None
        self.featurizer = PointFeaturizer(encoder, mpp=meta.mpp, window=meta.window, stride=meta.stride,
                                          align=meta.align, batch_size=batch_size, stain_norm=meta.stain_norm,
                                          feature_tta=meta.feature_tta, runtime=runtime)
        self.runtime = runtime

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.meta.classes)

    @classmethod
    def load(cls, detector: str | os.PathLike[str] | PointDetector | None = None,
             encoder: str | Encoder | None = None, head: str | os.PathLike[str] | None = None,
             device: str | torch.device | None = None, *, weights: str | None = None,
             offline: bool | None = None, tta: int = 1, detector_window: int | None = None,
             model: str | os.PathLike[str] | None = None, runtime: str = "auto",
             threshold: float | None = None) -> DeNuC:
        """Build the pipeline.

        Args:
            model: a model folder written by ``denuc finetune`` (``model.yaml`` + detector + head)
                or a shipped model's name (``brca-m2c``, ``consep``; ``denuc models`` lists them);
                its detector, head, encoder and weights are used where the other arguments are None
                (default: the shipped detector and BRCA-M2C head, i.e. ``brca-m2c``). A folder given
                as the first argument (``DeNuC.load("mymodel/")``) is taken as this.
            detector: detector checkpoint, a detector object, a model folder (see ``model``), or
                None (the shipped detector).
            encoder: encoder name or built :class:`Encoder` (None = the head's encoder).
            head: head checkpoint (None = the shipped BRCA-M2C head).
            device: ``cpu``/``cuda``/``mps`` (default: cuda, then mps, then cpu).
            weights: encoder weights source when building by name (default: the encoder's own).
            tta: detector test-time augmentation passes (1 = off, 2, 4, 8), for a detector given
                as a checkpoint or None; a detector object keeps its own setting.
            detector_window: the detector's inference window in px at its mpp (default: the
                checkpoint's), likewise.
            runtime: what runs the detector's and the encoder's forward passes: ``auto`` (ONNX
                Runtime on the CPU when ``denuc[onnx]`` is installed: the detector in float32, a
                CNN encoder in 8 bits; else PyTorch), ``torch`` (the reference), ``onnx`` (both
                float32) or ``onnx-int8`` (both 8-bit) (:mod:`denuc.runtime`).
            threshold: the detector's score threshold in [0, 1) (default: the model folder's, else
                the checkpoint's), for a detector given as a checkpoint or None.
        """
        from denuc.core.device import pick_device

        if model is None and isinstance(detector, (str, os.PathLike)) and Path(detector).is_dir():
            model, detector = detector, None  # DeNuC.load("mymodel/"): a model folder given first
        device = pick_device(str(device) if device is not None else None)  # ModelError for unknown/unavailable
        det_threshold = threshold
        if model is not None:
            from denuc.modeldir import resolve_model

            md = resolve_model(model)
            if detector is None and tta == 1 and threshold is None:  # the folder's val-chosen one (one pass)
                det_threshold = md.thresholds.get("detection")
            detector = md.detector if detector is None else detector
            head = md.head if head is None else head
            encoder = md.encoder if encoder is None else encoder
            weights = md.weights if weights is None else weights
        head_path = Path(head) if head is not None else DEFAULT_HEAD
        if head is None and not head_path.is_file():
            raise ModelError(f"no shipped head at {head_path}; pass head=<checkpoint>")
        h, meta, enc_tensors = load_head(head_path)
        if isinstance(encoder, Encoder):
            enc = encoder.to(device)
        else:
            name = encoder or meta.encoder
            if name != meta.encoder:
                raise ModelError(f"head {head_path} was trained on encoder {meta.encoder!r}, not {name!r}; "
                                 f"use --encoder {meta.encoder} or a head trained for {name}")
            if weights is None:
                check_default_weights(meta, name, str(head_path))
            enc = build_encoder(name, weights, offline=offline, device=device, taps=head_taps(meta) or None)
        check_head_encoder(meta, enc, str(head_path))
        apply_encoder_tensors(enc, enc_tensors, str(head_path))
        if detector is None or isinstance(detector, (str, os.PathLike)):
            from denuc.detect.api import Detector

            det: PointDetector = Detector.load(detector, device=device, tta=tta, window=detector_window,
                                               threshold=det_threshold, runtime=runtime)
        else:
            det = detector
        import hashlib

        out = cls(det, enc, h, meta, runtime=runtime)
        out.head_sha256 = hashlib.sha256(head_path.read_bytes()).hexdigest()
        return out

    # ----------------------------------------------------------------- use
    def probabilities(self, feats: torch.Tensor) -> np.ndarray:
        """Class probabilities ``(N, K)`` float32 of point features ``(N, C)`` (the head's softmax)."""
        with torch.inference_mode():
            return torch.softmax(self.head(feats.to(self.device)), dim=1).cpu().numpy().astype(np.float32)

    def stream(self, *, tile_px: int | None = None, workers: int = 2, batch_tiles: int | None = None) -> Any:
        """The :class:`~denuc.stream.runner.TileStream` that runs this model on any source."""
        from denuc.stream.runner import TILE_PX, Classifier, TileStream, as_stream_detector

        return TileStream(as_stream_detector(self.detector), Classifier.from_model(self),
                          tile_px=tile_px or TILE_PX, workers=workers, batch_tiles=batch_tiles)

    def models(self) -> dict[str, Any]:
        """Description of the models (names, weight hashes, thresholds) for summaries and resume keys."""
        det = self.detector
        d = det.describe() if hasattr(det, "describe") else {"type": type(det).__name__}
        return {"detector": d, "encoder": self.encoder.name, "encoder_weights_sha256": self.encoder.weights_hash,
                "head": self.meta.describe(), "head_sha256": getattr(self, "head_sha256", None),
                "classes": list(self.class_names), "encoder_runtime": self.featurizer.runner.runtime,
                "encoder_taps": list(head_taps(self.meta)), "feature_dim": int(self.meta.dim)}

    def predict_slide(self, path: str | os.PathLike[str] | np.ndarray, mpp: float | None = None, *,
                      out: str | os.PathLike[str] | None = None, name: str = "", opts: Any = None,
                      tile_px: int | None = None, workers: int = 2) -> tuple[Nuclei, dict[str, Any]]:
        """Every nucleus of a slide (or image, or array): ``(Nuclei, summary)``.

        Args:
            path: a slide file (SVS, NDPI, MRXS, SCN, BIF, DICOM, pyramidal/OME-TIFF ...), an
                image file or an ``(H, W, 3)`` array.
            mpp: µm per pixel of level 0 (default: the file's metadata; required for arrays).
            out: also write the output files there (:class:`~denuc.stream.job.RunOptions` ``formats``).
            opts: :class:`~denuc.stream.job.RunOptions` (tissue, ROI, formats, ...).

        Returns:
            the nuclei in level-0 px of the source (``mpp`` = its level-0 mpp; ``roi`` names with
            an ROI file) and the run summary (what ``<stem>.summary.json`` holds).
        """
        from denuc.stream.job import RunOptions, run_source

        opts = opts or RunOptions(progress=False)
        res = run_source(self.stream(tile_px=tile_px, workers=workers), path, mpp=mpp, name=name, out_dir=out,
                         opts=opts, models=self.models(), colors=self._colors(), keep=True)
        if res.nuclei is None:  # skipped: outputs exist
            raise ModelError(f"{res.name}: outputs already exist in {out} ({res.status}); pass overwrite in opts")
        if out is not None:
            from denuc.cohort.runner import refresh_summary_table

            refresh_summary_table(out)
        return res.nuclei, res.summary

    def predict_many(self, inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str], *,
                     mpp: float | None = None, mpp_default: float | None = None, opts: Any = None,
                     inputs_file: str | os.PathLike[str] | None = None, shard: tuple[int, int] | None = None,
                     tile_px: int | None = None, workers: int = 2,
                     jobs: int | str = "auto") -> Any:
        """Every input into ``out``, as ``denuc predict`` does (the same engine,
        :func:`denuc.cohort.runner.run_cohort`): skip inputs done with the same settings, refuse
        those done with others, share inputs with other processes on the same ``out``, report a
        failed input without stopping, write ``summary.csv``.

        Args:
            inputs: image or slide files, folders of them, glob patterns.
            out: the output folder.
            mpp: level-0 µm per pixel of every input (overrides the files' own).
            mpp_default: level-0 µm per pixel of the inputs that carry none.
            opts: :class:`~denuc.stream.job.RunOptions` (formats, tissue, ROI or ROI folder,
                overwrite, ...).
            jobs: inputs run at once in threads of this process (``"auto"``: 2 on a CPU when two
                or more inputs are to do; see :func:`denuc.cohort.runner.resolve_jobs`).

        Returns:
            :class:`~denuc.cohort.runner.CohortResult`: ``results`` holds one
            :class:`~denuc.cohort.runner.InputResult` per input (status, summary, files, error).
        """
        from denuc.cohort.runner import run_cohort

        def build() -> tuple[Any, dict[str, Any], dict[str, tuple[int, int, int]]]:
            return self.stream(tile_px=tile_px, workers=workers), self.models(), self._colors()

        return run_cohort(inputs, out, build, opts=opts, inputs_file=inputs_file, mpp=mpp, mpp_default=mpp_default,
                          shard=shard, jobs=jobs)

    def iter_slide(self, path: str | os.PathLike[str] | np.ndarray, mpp: float | None = None, *,
                   opts: Any = None, tile_px: int | None = None) -> Any:
        """Streaming form of :meth:`predict_slide`: yields one :class:`Nuclei` per chunk of tiles
        (level-0 px), so a caller never holds the whole slide's nuclei. Each chunk's
        ``meta["tile"]`` is the ``(N,)`` tile-plan index of the tile each nucleus came from
        (:data:`denuc.sinks.base.TILE_KEY`)."""
        from denuc.source import open_source
        from denuc.stream.job import RunOptions, _Prepared, iter_chunks
        from denuc.stream.runner import RunContext
        from denuc.stream.timing import StageTimer

        opts = opts or RunOptions(progress=False)
        runner = self.stream(tile_px=tile_px)
        timer = StageTimer(self.device)
        with open_source(path, mpp=mpp) as source:
            prep = _Prepared(runner, source, opts, timer)
            ctx = RunContext(stain=prep.stain, rois=prep.rois, timer=timer, area=prep.area)
            for _, nuc in iter_chunks(runner, prep, ctx):
                yield nuc

    def _colors(self) -> dict[str, tuple[int, int, int]]:
        return {c: tuple(int(v) for v in col) for c, col in zip(self.meta.classes, self.meta.colors, strict=False)}

    def classify(self, image: np.ndarray, mpp: float, points: Nuclei, *, features: bool = False) -> Nuclei:
        """Classify given points of an image (no detection). ``points.xy`` in image px; ``image``
        as in :meth:`__call__`. ``features``: also return the point features the head
        classified (``Nuclei.features``, ``(N, C)`` float32)."""
        mpp = check_mpp(mpp, points.name or "image")
        image = as_rgb_image(image, points.name or "image")
        t0 = time.perf_counter()
        enc0 = self.featurizer.encode_ms
        self.featurizer.set_image(image, mpp)
        feats = self.featurizer.features_at(points.xy)
        probs = self.probabilities(feats)
        total = (time.perf_counter() - t0) * 1e3
        enc_ms = self.featurizer.encode_ms - enc0
        ids = probs.argmax(1).astype(np.int64) if len(probs) else np.zeros(0, np.int64)
        det_scores = points.scores if points.scores is not None else np.ones(len(points), np.float32)
        scores = det_scores * (probs.max(1) if len(probs) else np.zeros(0, np.float32))
        out = Nuclei(points.xy, scores, ids, self.class_names, probs, mpp, tuple(image.shape[:2]), points.name,
                     dict(points.meta), det_scores=det_scores, roi=points.roi,
                     features=feats.detach().to("cpu", torch.float32).numpy() if features else None)
        out.meta["speed"] = {"encode": round(enc_ms, 2), "classify": round(total - enc_ms, 2)}
        out.meta["windows_encoded"] = self.featurizer.windows_encoded
        return out

    def embed(self, image: np.ndarray | str | os.PathLike[str], points: Nuclei | str | os.PathLike[str],
              mpp: float | None = None) -> Nuclei:
        """Point features (cell embeddings) at given points: :func:`denuc.query.embed.embed_points`."""
        from denuc.query.embed import embed_points

        return embed_points(self, image, points, mpp)

    def __call__(self, image: np.ndarray | str | os.PathLike[str], mpp: float | None, name: str = "") -> Nuclei:
        """Detect and classify the nuclei of one image (through the same tile stream as slides).

        Args:
            image: ``(H, W, 3)`` uint8 RGB array, an image or slide file path, or another array
                layout :func:`~denuc.data.image.to_rgb_uint8` converts (``(H, W)`` gray, RGBA,
                16-bit, float in [0, 1] or [0, 255]).
            mpp: µm per pixel of the image (required for arrays, ResolutionError when None; for
                files None means the file's metadata).
            name: stored in the result (default: the file's stem, or empty for an array).

        Every nucleus of the image is returned (no tissue mask: ``tissue="none"``); for the
        tissue and ROI rules of ``denuc predict`` use :meth:`predict_slide`.

        Returns:
            :class:`Nuclei` with ``xy`` (x, y) in pixels of the input image, class ids/names,
            scores (detection x class probability), ``det_scores``, probs and
            ``meta["speed"]`` in milliseconds per stage.
        """
        from denuc.stream.job import RunOptions, run_source

        if isinstance(image, (str, os.PathLike)):
            name = name or Path(image).stem
            if mpp is not None:
                check_mpp(mpp, str(image))  # before reading the file
        elif mpp is None or not isinstance(image, np.ndarray):
            check_mpp(mpp, name or "image")
        if not isinstance(image, (str, os.PathLike)):
            image = as_rgb_image(image, name or "image")
        res = run_source(self.stream(), image, mpp=mpp, name=name, opts=RunOptions(progress=False, tissue="none"),
                         models=None)
        out = res.nuclei
        assert out is not None
        out.name = name
        t = res.summary.get("timings_ms", {})
        out.meta["speed"] = {"detect": round(t.get("detect", 0.0), 2), "encode": round(t.get("encode", 0.0), 2),
                             "classify": round(t.get("query", 0.0) + t.get("classify", 0.0), 2)}
        out.meta["windows_encoded"] = int(res.summary.get("windows_encoded", 0))
        return out

    def describe(self) -> dict[str, Any]:
        return {"encoder": self.encoder.name, "weights": self.encoder.weights_hash, "head": self.meta.describe()}
