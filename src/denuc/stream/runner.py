"""The one loop that runs DeNuC on any pixel source: tiles in, classified nuclei out.

::

    runner = TileStream(detector, Classifier.from_model(model))
    plan = runner.plan(source)                     # denuc.tiles.plan.TilePlan
    for index, nuclei in runner.run(source, plan, plan.selected, ctx):
        ...                                        # Nuclei of one tile core, level-0 px

Per tile (:class:`~denuc.tiles.plan.Tile`): a loader thread reads the tile's detector region
from the source level the detector needs and resamples it exactly to the detector's mpp
(:mod:`denuc.tiles.resample`), and reads the source crop the encoder may need (stain-normalised
with the source's one estimate). The main loop detects on batches of tiles (windows of several
tiles share forward passes), keeps the points of each tile's core (so every nucleus comes out
once), drops points outside the regions of interest, cuts the encoder crop that holds the
windows those points need (on the encoder frame's global lattice), encodes only those windows
(a tile without a nucleus costs no encoder pass) and classifies the points with the head.
Memory is bounded by the prefetched tiles (``workers + prefetch``) and one batch, not by the
source.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from denuc.core.result import Nuclei
from denuc.data.stain import StainEstimate, macenko_normalize
from denuc.query.predictor import PointFeaturizer, best_window
from denuc.stream.timing import StageTimer
from denuc.tiles.plan import Frame, Tile, TilePlan, make_plan
from denuc.tiles.resample import resample_taps, source_span

#: default core side of a tile, px at the detector's mpp (2112 px = 11 strides of 192 at 0.25 µm/px:
#: a 1000 x 1000 px image at 0.5 µm/px is one tile)
TILE_PX = 2048


@dataclass
class Classifier:
    """The classification stage: a featurizer on the encoder (no stain normaliser of its own:
    tiles come normalised), the head and its class names.

    Attributes:
        featurizer: windows at the head's mpp/window/stride/align.
        probabilities: ``feats (N, C) tensor -> (N, K) float32 numpy`` class probabilities.
        class_names: the head's classes.
        stain_norm: the head's stain normaliser (applied by the stream per source).
    """

    featurizer: PointFeaturizer
    probabilities: Any
    class_names: tuple[str, ...]
    stain_norm: str = "none"

    @classmethod
    def from_model(cls, model: Any) -> Classifier:
        """From a :class:`denuc.pipeline.DeNuC`."""
        return cls(model.featurizer.with_stain_norm("none"), model.probabilities, tuple(model.class_names),
                   model.meta.stain_norm)


@dataclass
class TileData:
    """What the loader hands the loop for one tile."""

    tile: Tile
    work: np.ndarray                  # (h, w, 3) uint8 detector working image of tile.read
    enc_raw: np.ndarray | None        # (h', w', 3) uint8 source crop at the encoder's level (normalised)
    enc_origin: tuple[int, int]       # its top-left (x, y) at that level
    read_ms: float = 0.0


@dataclass
class RunContext:
    """Per-source state the loop needs.

    Attributes:
        stain: the source's stain estimate (None: no normalisation).
        rois: regions of interest (``contains(xy) -> names``) or None.
        area: the analysed area (:class:`denuc.source.area.AnalysedArea`: ``keep(xy) -> bool``,
            nuclei outside the tissue are dropped) or None (nothing dropped).
        timer: stage timer.
        stats: counters (tiles, tiles without nuclei, ...).
        features: also return each nucleus's point features (``Nuclei.features``, ``(N, C)``
            float32, what the head classified); off by default (they cost memory per nucleus).
    """

    stain: StainEstimate | None = None
    rois: Any = None
    area: Any = None
    timer: StageTimer = field(default_factory=StageTimer)
    stats: dict[str, int] = field(default_factory=lambda: {"tiles_done": 0, "tiles_without_nuclei": 0,
                                                         "windows_encoded": 0})
    features: bool = False


def _read_resampled(source: Any, frame: Frame, box: tuple[int, int, int, int]) -> np.ndarray:
    """Working-frame box (x0, y0, x1, y1) of ``frame`` read from the source and resampled exactly."""
    x0, y0, x1, y1 = box
    lw, lh = frame.level_size
    sx = source_span(x0, x1 - x0, frame.factor, lw)
    sy = source_span(y0, y1 - y0, frame.factor, lh)
    crop = source.read(sx[0], sy[0], sx[1] - sx[0], sy[1] - sy[0], frame.level)
    return resample_taps(crop, (sx[0], sy[0]), (x0, y0), (x1 - x0, y1 - y0), frame.factor, (lw, lh))


class WholeImageDetector:
    """Adapter for any object with ``detect(image (H, W, 3) uint8, mpp) -> Nuclei`` (the
    :class:`denuc.pipeline.PointDetector` protocol): it sees each source whole, at the source's
    own mpp, as one tile (so it suits images, not slides)."""

    margin = 0.0
    window = stride = 1 << 30
    device = torch.device("cpu")
    mpp: float | None = None

    def __init__(self, detector: Any) -> None:
        self.inner = detector
        self.class_names: tuple[str, ...] = ("nucleus",)

    def detect_works(self, works: Sequence[np.ndarray]) -> list[Any]:
        from denuc.detect.windows import RawDetections

        out = []
        for w in works:
            n = self.inner.detect(w, self.mpp)
            n = n.select(n.inside(w.shape[0], w.shape[1]))
            self.class_names = tuple(n.class_names) or ("nucleus",)
            k = len(n)
            out.append(RawDetections(n.xy, n.scores if n.scores is not None else np.ones(k, np.float32),
                                     n.class_ids if n.class_ids is not None else np.zeros(k, np.int64),
                                     n.probs if n.probs is not None else np.ones((k, 1), np.float32)))
        return out

    def describe(self) -> dict[str, Any]:
        return {"type": type(self.inner).__name__}


def as_stream_detector(detector: Any) -> Any:
    """``detector`` itself when it runs on tiles (has ``detect_works``), else a :class:`WholeImageDetector`."""
    return detector if hasattr(detector, "detect_works") else WholeImageDetector(detector)


class TileStream:
    """Detector (+ optional classifier) over the tiles of a source.

    Args:
        detector: a :class:`denuc.detect.api.Detector`.
        classifier: the classification stage, or None for detection only.
        tile_px: about the tile core side in detector working px.
        batch_tiles: tiles detected together (default: 4 on CUDA, 1 elsewhere).
        workers: loader threads (reading + resampling run ahead of the models).
        prefetch: tiles loaded ahead beyond the workers (bounds memory).
    """

    def __init__(self, detector: Any, classifier: Classifier | None = None, *, tile_px: int = TILE_PX,
                 batch_tiles: int | None = None, workers: int = 2, prefetch: int = 2) -> None:
        self.detector = detector
        self.classifier = classifier
        self.tile_px = int(tile_px)
        on_gpu = torch.device(detector.device).type == "cuda"
        self.batch_tiles = int(batch_tiles if batch_tiles is not None else (4 if on_gpu else 1))
        self.workers = max(1, int(workers))
        self.prefetch = max(0, int(prefetch))

    def fork(self) -> TileStream:
        """A stream over the same networks (their weights, runners and ONNX sessions shared) with
        state of its own (the source being run, the encoder's current image), so that another
        thread can run another source at the same time (:func:`denuc.cohort.runner.run_cohort`)."""
        det = self.detector
        if isinstance(det, WholeImageDetector):  # it keeps the source's mpp
            det = WholeImageDetector(det.inner)
        cls = self.classifier
        if cls is not None:
            cls = replace(cls, featurizer=cls.featurizer.with_stain_norm(cls.featurizer.stain_norm))
        return TileStream(det, cls, tile_px=self.tile_px, batch_tiles=self.batch_tiles, workers=self.workers,
                          prefetch=self.prefetch)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.classifier.class_names if self.classifier is not None else tuple(self.detector.class_names)

    def plan(self, source: Any) -> TilePlan:
        """The tile plan of ``source`` (all tiles selected; filter ``plan.selected`` afterwards)."""
        from denuc.data.image import MAX_IMAGE_PIXELS

        d = self.detector
        c = self.classifier
        if isinstance(d, WholeImageDetector):
            d.mpp = float(source.mpp)
        return make_plan(tuple(source.level_dimensions), tuple(source.level_downsamples), float(source.mpp),
                         det_mpp=d.mpp, det_window=d.window, det_stride=d.stride, det_margin=d.margin,
                         tile_px=self.tile_px, enc_mpp=c.featurizer.mpp if c else None,
                         enc_window=c.featurizer.window if c else 0, enc_stride=c.featurizer.stride if c else 0,
                         max_work_pixels=MAX_IMAGE_PIXELS, name=getattr(source, "name", "source"))

    # ----------------------------------------------------------------- loading
    def _enc_superset(self, plan: TilePlan, tile: Tile) -> tuple[int, int, int, int]:
        """Encoder-frame box that holds every window a point of the tile's core may need."""
        assert plan.enc is not None
        t = plan.det.to_level0 / plan.enc.to_level0
        x0, y0, x1, y1 = tile.core
        w = plan.enc_window
        ew, eh = plan.enc.size
        bx = (max(0, int(np.floor(x0 * t)) - w), min(max(ew, w), int(np.ceil(x1 * t)) + w))
        by = (max(0, int(np.floor(y0 * t)) - w), min(max(eh, w), int(np.ceil(y1 * t)) + w))
        return bx[0], by[0], min(bx[1], ew), min(by[1], eh)

    def load(self, source: Any, plan: TilePlan, tile: Tile, stain: StainEstimate | None) -> TileData:
        """Read one tile (runs in a loader thread)."""
        t0 = time.perf_counter()
        work = _read_resampled(source, plan.det, tile.read)
        enc_raw, origin = None, (0, 0)
        if self.classifier is not None and plan.enc is not None:
            x0, y0, x1, y1 = self._enc_superset(plan, tile)
            lw, lh = plan.enc.level_size
            sx = source_span(x0, max(1, x1 - x0), plan.enc.factor, lw)
            sy = source_span(y0, max(1, y1 - y0), plan.enc.factor, lh)
            enc_raw = source.read(sx[0], sy[0], sx[1] - sx[0], sy[1] - sy[0], plan.enc.level)
            if stain is not None and not stain.fallback:
                enc_raw = macenko_normalize(enc_raw, estimate=stain)
            origin = (sx[0], sy[0])
        return TileData(tile, work, enc_raw, origin, (time.perf_counter() - t0) * 1e3)

    # -------------------------------------------------------------- processing
    def _core_points(self, plan: TilePlan, td: TileData, raw: Any, ctx: RunContext) -> Nuclei:
        """Detections of one tile in its core, as level-0 Nuclei (det scores in ``scores`` and ``det_scores``)."""
        x0, y0, x1, y1 = td.tile.core
        g = raw.xy + np.array([td.tile.read[0], td.tile.read[1]], dtype=np.float64)
        keep = (g[:, 0] >= x0) & (g[:, 0] < x1) & (g[:, 1] >= y0) & (g[:, 1] < y1)
        xy = g[keep] * plan.det.to_level0
        names = tuple(self.detector.class_names)
        probs = raw.probs[keep] if len(names) > 1 else None
        out = Nuclei(xy, raw.scores[keep], raw.labels[keep], names, probs, mpp=self._mpp0,
                     image_size=(self._size0[1], self._size0[0]), det_scores=raw.scores[keep])
        out = out.select(out.inside(self._size0[1], self._size0[0]))
        if ctx.area is not None and ctx.area.filters_tissue:
            out = out.select(ctx.area.keep(out.xy))
        if ctx.rois is not None:
            roi = ctx.rois.contains(out.xy)
            out = out.select(roi != "")
            out.roi = np.asarray(roi[roi != ""], dtype=object)
        return out

    @staticmethod
    def _tissue_test(plan: TilePlan, td: TileData, ctx: RunContext) -> Any:
        """Boxes in the tile's working image -> whether they touch the tissue mask, when nuclei
        outside tissue are dropped (else None: every detector window runs)."""
        area = ctx.area
        if area is None or not area.filters_tissue:
            return None
        tissue = area.tissue
        origin = np.array([td.tile.read[0], td.tile.read[1]] * 2, dtype=np.float64)
        scale = float(plan.det.to_level0)

        def touches(boxes: np.ndarray) -> np.ndarray:
            return tissue.boxes_touching((np.asarray(boxes, dtype=np.float64) + origin) * scale)

        return touches

    def _classify(self, plan: TilePlan, td: TileData, det: Nuclei, ctx: RunContext) -> Nuclei:
        c = self.classifier
        assert c is not None and plan.enc is not None and td.enc_raw is not None
        n = len(det)
        kept = None
        if n == 0:
            probs = np.zeros((0, len(c.class_names)), np.float32)
        else:
            fp = c.featurizer
            ew, eh = plan.enc.size
            p = det.xy / plan.enc.to_level0  # encoder working px
            p = np.clip(p, 0.0, [np.nextafter(max(ew, 1), 0), np.nextafter(max(eh, 1), 0)])
            xs, ys = plan.encoder_origins()
            kx, _ = best_window(p[:, 0], xs, fp.window)
            ky, _ = best_window(p[:, 1], ys, fp.window)
            bx0, by0 = int(xs[kx.min()]), int(ys[ky.min()])
            bx1, by1 = min(int(xs[kx.max()]) + fp.window, ew), min(int(ys[ky.max()]) + fp.window, eh)
            lw, lh = plan.enc.level_size
            with ctx.timer("query"):
                crop = resample_taps(td.enc_raw, td.enc_origin, (bx0, by0), (bx1 - bx0, by1 - by0), plan.enc.factor,
                                     (lw, lh), as_float=True)
                fp.set_image(crop / np.float32(255.0), fp.mpp)  # [0, 1] floats: never mistaken for 0-255
            e0 = fp.encode_ms
            t0 = time.perf_counter()
            feats = fp.features_at(p - np.array([bx0, by0], dtype=np.float64))
            if fp.device.type == "cuda":
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) * 1e3
            enc = fp.encode_ms - e0
            ctx.timer.add("encode", enc)
            ctx.timer.add("query", max(0.0, dt - enc))
            ctx.stats["windows_encoded"] += fp.windows_encoded
            with ctx.timer("classify"):
                probs = c.probabilities(feats)
            if ctx.features:
                kept = feats.detach().to("cpu", torch.float32).numpy()
        ids = probs.argmax(1).astype(np.int64) if n else np.zeros(0, np.int64)
        det_scores = det.det_scores if det.det_scores is not None else np.ones(n, np.float32)
        scores = det_scores * (probs.max(1) if n else np.zeros(0, np.float32))
        return Nuclei(det.xy, scores, ids, c.class_names, probs, det.mpp, det.image_size, det.name,
                      det_scores=det_scores, roi=det.roi, features=kept)

    def process(self, plan: TilePlan, batch: Sequence[TileData], ctx: RunContext) -> list[Nuclei]:
        """Detect (one call for the batch) and classify the tiles of ``batch``."""
        with ctx.timer("detect"):
            works = [td.work for td in batch]
            tests = [self._tissue_test(plan, td, ctx) for td in batch]
            if getattr(self.detector, "skips_windows", False) and any(t is not None for t in tests):
                raws = self.detector.detect_works(works, regions=tests)
            else:
                raws = self.detector.detect_works(works)
            dets = [self._core_points(plan, td, r, ctx) for td, r in zip(batch, raws, strict=True)]
        out = []
        for td, det in zip(batch, dets, strict=True):
            ctx.stats["tiles_done"] += 1
            if len(det) == 0:
                ctx.stats["tiles_without_nuclei"] += 1
            out.append(self._classify(plan, td, det, ctx) if self.classifier is not None else det)
        return out

    def run(self, source: Any, plan: TilePlan, tiles: Sequence[int], ctx: RunContext) -> Iterator[tuple[int, Nuclei]]:
        """Process ``tiles`` (indices into the plan) in order; yields ``(tile index, Nuclei)`` per tile.

        Loading runs ``workers`` threads ahead, at most ``workers + prefetch`` tiles in memory.
        """
        self._mpp0 = float(source.mpp)
        self._size0 = tuple(int(v) for v in source.level_dimensions[0])
        todo = list(tiles)
        if not todo:
            return
        ahead = self.workers + self.prefetch + self.batch_tiles
        with ThreadPoolExecutor(self.workers, thread_name_prefix="denuc-read") as pool:
            pending: deque[Future[TileData]] = deque()
            it = iter(todo)

            def fill() -> None:
                while len(pending) < ahead:
                    i = next(it, None)
                    if i is None:
                        return
                    pending.append(pool.submit(self.load, source, plan, plan.tile(i), ctx.stain))

            fill()
            try:
                while pending:
                    batch = []
                    with ctx.timer("wait"):
                        while pending and len(batch) < self.batch_tiles:
                            batch.append(pending.popleft().result())
                    fill()
                    for td in batch:
                        ctx.timer.add("read", td.read_ms)
                    for td, nuc in zip(batch, self.process(plan, batch, ctx), strict=True):
                        yield td.tile.index, nuc
                    del batch
            finally:
                for f in pending:
                    f.cancel()
