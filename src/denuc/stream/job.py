"""One input (image, array or slide) through the stream, into memory or into output files.

:func:`run_source` is what ``denuc predict`` / ``denuc detect`` and
:meth:`denuc.pipeline.DeNuC.predict_slide` call for each input:

1. open the source (:func:`denuc.source.open_source`: mpp from the argument or the file's
   metadata), find tissue on a thumbnail (slides) and read the regions of interest;
2. plan the tiles (:class:`denuc.tiles.plan.TilePlan`) and keep those whose core touches
   tissue and the ROIs;
3. run the tiles in chunks (:class:`denuc.stream.runner.TileStream`): each finished chunk is saved
   to the input's resume journal (:class:`denuc.stream.journal.Journal`) and handed to the
   writers (:mod:`denuc.sinks`), so memory holds one chunk, not the slide;
4. close the writers (each moves its file into place atomically), write the summary, drop the
   journal.

A rerun skips inputs whose outputs all exist, and resumes an interrupted input from its last
finished chunk (same nuclei as an uninterrupted run). A claim file per input
(:mod:`denuc.cohort.claims`) keeps two processes off the same input.
"""

from __future__ import annotations

import math
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from denuc.core.result import Nuclei
from denuc.errors import InputError
from denuc.stream.runner import RunContext, TileStream
from denuc.stream.timing import StageTimer

#: most pixels a plain image's stain estimate reads (bounds its memory: float OD of 4 Mpx)
STAIN_PIXELS = 2**22

#: tissue options: ``auto`` (slides: thumbnail rule; plain images and arrays: processed whole), ``none``.
TISSUE_CHOICES = ("auto", "none")


@dataclass
class RunOptions:
    """Settings of one run over inputs.

    Attributes:
        formats: output formats (:data:`denuc.sinks.SINKS` names).
        tissue: ``auto`` or ``none`` (:data:`TISSUE_CHOICES`); ignored when ``tissue_mask`` is given.
        tissue_mask: a binary mask image of the slide (nonzero = tissue), or None.
        roi: a QuPath GeoJSON of regions of interest, or None.
        overwrite: redo inputs whose outputs exist.
        overlay: write ``<stem>.overlay.png``.
        progress: progress bar (None: when stderr is a terminal).
        chunk_tiles: tiles per resume chunk (the unit of work saved and written at once).
        stale_after: seconds after which another process's claim on an input counts as abandoned.
        embeddings: dtype of the point features in the ``h5ad`` output (``float16``, ``float32``)
            or ``none`` to leave them out (:data:`denuc.sinks.anndata.EMBEDDING_DTYPES`).
        density_grid_um: side in µm of the grid cells of the ``density`` output.
    """

    formats: tuple[str, ...] = ("csv",)
    tissue: str = "auto"
    tissue_mask: str | os.PathLike[str] | None = None
    roi: str | os.PathLike[str] | None = None
    overwrite: bool = False
    overlay: bool = True
    progress: bool | None = None
    chunk_tiles: int = 8
    stale_after: float = 600.0
    thumbnail_px: int = 2048
    embeddings: str = "float16"
    density_grid_um: float = 50.0


@dataclass
class SourceResult:
    """What :func:`run_source` did with one input.

    Attributes:
        name: the input's stem.
        status: ``done``, ``skipped`` (outputs exist) or ``busy`` (another process holds it).
        nuclei: all nuclei (memory mode only), level-0 px of the source.
        summary: run facts (see ``<stem>.summary.json``).
        paths: output files written.
    """

    name: str
    status: str
    nuclei: Nuclei | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    paths: list[Path] = field(default_factory=list)


def _kind(source: Any) -> str:
    return "slide" if source.backend in ("openslide", "tiffslide") else "image"


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("denuc", "torch", "numpy", "openslide-python", "openslide-bin", "tiffslide", "timm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def _stain_estimate(source: Any, runner: TileStream, plan: Any, tissue: Any) -> Any:
    """One Macenko estimate per source: from the whole image for plain images / arrays (as a
    whole-image pass does; larger than :data:`STAIN_PIXELS`, from an evenly strided subset of
    that many pixels), else from up to 16 tissue tiles of 512 px at the encoder's level."""
    from denuc.data.stain import estimate_stains

    c = runner.classifier
    if c is None or c.stain_norm == "none":
        return None
    if c.stain_norm != "macenko":
        raise InputError(f"stain normaliser {c.stain_norm!r} is not supported on tiles")
    if _kind(source) == "image":
        w, h = source.level_dimensions[0]
        img = source.read(0, 0, w, h, 0)
        step = max(1, math.ceil(math.sqrt(w * h / STAIN_PIXELS)))
        return estimate_stains(img[::step, ::step] if step > 1 else img)  # every pixel up to 4 Mpx
    level = plan.enc.level
    ds = float(source.level_downsamples[level])
    lw, lh = source.level_dimensions[level]
    boxes = plan.core_boxes_level0()[plan.selected] if plan.selected else plan.core_boxes_level0()
    pick = np.linspace(0, len(boxes) - 1, num=min(16, len(boxes))).round().astype(int)
    parts = []
    for x0, y0, x1, y1 in boxes[pick]:
        cx, cy = (x0 + x1) / 2 / ds, (y0 + y1) / 2 / ds
        parts.append(source.read(int(max(0, min(lw - 512, cx - 256))), int(max(0, min(lh - 512, cy - 256))),
                                 min(512, lw), min(512, lh), level))
    return estimate_stains(np.concatenate([p.reshape(-1, 1, 3) for p in parts], axis=0))


def _tissue(source: Any, opts: RunOptions, thumb: np.ndarray, ds: float) -> Any:
    from denuc.source import detect_tissue, full_mask, load_tissue_mask

    if opts.tissue_mask is not None:
        return load_tissue_mask(opts.tissue_mask, source)
    if opts.tissue not in TISSUE_CHOICES:
        raise InputError(f"--tissue must be one of {', '.join(TISSUE_CHOICES)}; got {opts.tissue!r}")
    if opts.tissue == "none" or _kind(source) == "image":
        return full_mask(source)
    return detect_tissue(thumb, ds, source.mpp)


class _Prepared:
    """Source, tissue, ROIs, plan and the tiles to run, decided before any model work."""

    def __init__(self, runner: TileStream, source: Any, opts: RunOptions, timer: StageTimer) -> None:
        from denuc.source import load_rois

        self.source = source
        with timer("tissue"):
            self.thumb, self.thumb_ds = source.thumbnail(opts.thumbnail_px)
            self.tissue = _tissue(source, opts, self.thumb, self.thumb_ds)
        self.rois = load_rois(opts.roi, tuple(source.dimensions)) if opts.roi is not None else None
        with timer("plan"):
            plan = runner.plan(source)
            boxes = plan.core_boxes_level0()
            keep = self.tissue.boxes_touching(boxes)
            n_tissue = int(keep.sum())
            if self.rois is not None:
                keep &= self.rois.intersects_boxes(boxes)
            plan.selected = np.flatnonzero(keep).astype(int).tolist()
            plan.info = {"tissue": self.tissue.method, "roi": None if opts.roi is None else str(opts.roi)}
        self.plan = plan
        self.tiles = {"total": plan.count, "touching_tissue": n_tissue, "selected": len(plan.selected),
                      "skipped_tissue": plan.count - n_tissue,
                      "skipped_roi": n_tissue - len(plan.selected) if self.rois is not None else 0}
        self.chunks = [plan.selected[i:i + opts.chunk_tiles] for i in range(0, len(plan.selected), opts.chunk_tiles)]
        self.stain = _stain_estimate(source, runner, plan, self.tissue) if plan.selected else None

    def facts(self, runner: TileStream) -> dict[str, Any]:
        s, p = self.source, self.plan
        f: dict[str, Any] = {
            "input": str(s.path) if s.path is not None else s.name, "backend": s.backend,
            "mpp_source": s.mpp_source, "levels": s.level_count,
            "detector_level": p.det.level, "detector_level_mpp": s.level_mpp(p.det.level), "detector_mpp": p.det.mpp,
            "tissue": self.tissue.method, "tiles": dict(self.tiles), "tile_px": runner.tile_px,
        }
        if p.enc is not None:
            f.update({"encoder_level": p.enc.level, "encoder_level_mpp": s.level_mpp(p.enc.level),
                      "encoder_mpp": p.enc.mpp})
        if self.stain is not None:
            f["stain_estimate"] = {"stains": np.round(self.stain.stains, 4).tolist(),
                                   "max_conc": np.round(self.stain.max_conc, 4).tolist(),
                                   "fallback": bool(self.stain.fallback)}
        return f


def _chunk_nuclei(parts: Sequence[Nuclei], runner: TileStream, source: Any) -> Nuclei:
    names = runner.class_names
    w, h = source.level_dimensions[0]
    if not parts:
        return Nuclei.empty(names, mpp=float(source.mpp), image_size=(h, w), name=source.name)
    out = Nuclei.concat(list(parts))
    out.name, out.image_size = source.name, (h, w)
    return out


def iter_chunks(runner: TileStream, prep: _Prepared, ctx: RunContext, skip: set[int] | None = None,
                load: Any = None) -> Iterator[tuple[int, Nuclei]]:
    """``(chunk index, Nuclei)`` for every chunk of the plan in order: chunks in ``skip`` come
    from ``load(k)`` (the journal), the others are computed (their tiles stream through
    ``runner`` back to back)."""
    skip = skip or set()
    todo = [t for k, ch in enumerate(prep.chunks) if k not in skip for t in ch]
    stream = runner.run(prep.source, prep.plan, todo, ctx)
    for k, ch in enumerate(prep.chunks):
        if k in skip:
            yield k, load(k)
            continue
        parts = []
        for t in ch:
            got, nuc = next(stream)
            assert got == t, (got, t)
            parts.append(nuc)
        yield k, _chunk_nuclei(parts, runner, prep.source)


def _progress(total: int, name: str, enabled: bool | None) -> Any:
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=name, unit="tile", disable=not enabled, dynamic_ncols=True, leave=True)


def run_source(runner: TileStream, src: Any, *, mpp: float | None = None, name: str = "",
               out_dir: str | os.PathLike[str] | None = None, opts: RunOptions | None = None,
               models: dict[str, Any] | None = None, colors: dict[str, tuple[int, int, int]] | None = None,
               keep: bool | None = None, claim: Any = None) -> SourceResult:
    """Run one input through the stream.

    Args:
        runner: detector (+ classifier) stream.
        src: a file path (image or slide) or an array (``(H, W, 3)`` etc.).
        mpp: µm per pixel of level 0 (overrides the file's metadata; required for arrays and
            files without it).
        name: output stem (default: the file's stem).
        out_dir: write outputs there (None: memory only; ``nuclei`` is returned).
        opts: :class:`RunOptions`.
        models: description of the models (hashes, thresholds) for the summary.
        colors: class colours for GeoJSON / overlay.
        keep: also return all nuclei when writing files (default: only in memory mode).
        claim: a :class:`denuc.cohort.claims.Claim` the caller already holds on this input
            (released here); default: claimed here.

    Returns:
        :class:`SourceResult`.
    """
    from denuc.source import open_source

    opts = opts or RunOptions()
    t_start = time.perf_counter()
    timer = StageTimer(runner.detector.device)
    keep = out_dir is None if keep is None else keep
    try:
        source = open_source(src, mpp=mpp, name=name)
    except BaseException:
        if claim is not None:
            claim.release()
        raise
    with source:
        stem = source.name
        if out_dir is None:
            return _run_memory(runner, source, opts, timer, t_start, models)
        from denuc.sinks import output_paths

        out = Path(out_dir)
        kind = _kind(source)
        finals = output_paths(stem, out, kind, opts.formats, opts.overlay)
        if claim is None:
            if not opts.overwrite and all(p.is_file() for p in finals):
                return SourceResult(stem, "skipped", paths=finals)
            from denuc.cohort.claims import try_claim

            claim = try_claim(out, stem, stale_after=opts.stale_after)
            if claim is None:
                return SourceResult(stem, "busy")
        try:
            if not opts.overwrite and all(p.is_file() for p in finals):  # finished meanwhile
                return SourceResult(stem, "skipped", paths=finals)
            return _run_files(runner, source, out, kind, opts, timer, t_start, models, colors, claim, keep)
        finally:
            claim.release()


def _run_memory(runner: TileStream, source: Any, opts: RunOptions, timer: StageTimer, t_start: float,
                models: dict[str, Any] | None) -> SourceResult:
    prep = _Prepared(runner, source, opts, timer)
    ctx = RunContext(stain=prep.stain, rois=prep.rois, timer=timer)
    parts = []
    bar = _progress(len(prep.plan.selected), source.name, opts.progress)
    n = 0
    for _, nuc in iter_chunks(runner, prep, ctx):
        parts.append(nuc)
        n += len(nuc)
        bar.update(len(prep.chunks[len(parts) - 1]))
        bar.set_postfix(nuclei=n)
    bar.close()
    nuclei = _chunk_nuclei(parts, runner, source)
    counts = {c: int((nuclei.class_ids == k).sum()) for k, c in enumerate(nuclei.class_names)}
    summary = {**prep.facts(runner), **ctx.stats, "kind": _kind(source), "mpp": float(source.mpp),
               "size": list(source.dimensions), "nuclei": len(nuclei), "counts": counts, "models": models or {},
               "timings_ms": timer.as_dict(), "wall_s": round(time.perf_counter() - t_start, 3)}
    nuclei.meta["summary"] = summary
    return SourceResult(source.name, "done", nuclei, summary)


def _run_files(runner: TileStream, source: Any, out: Path, kind: str, opts: RunOptions, timer: StageTimer,
               t_start: float, models: dict[str, Any] | None, colors: dict[str, tuple[int, int, int]] | None,
               claim: Any, keep: bool) -> SourceResult:
    import hashlib
    import json

    from denuc.core.palette import resolve_colors
    from denuc.sinks import OutputInfo, output_sinks
    from denuc.stream.journal import Journal

    prep = _Prepared(runner, source, opts, timer)
    names = runner.class_names
    cmap = {k: tuple(int(v) for v in c) for k, c in resolve_colors(names, colors).items()}
    features = "h5ad" in opts.formats and opts.embeddings != "none" and runner.classifier is not None
    key = {"plan": prep.plan.key(), "models": models or {}, "chunk_tiles": opts.chunk_tiles, "mpp": source.mpp,
           "classes": list(names)}
    if features:  # chunks saved with point features are not those saved without
        key["features"] = True
    key_src = json.dumps(key, sort_keys=True, default=str)
    journal = Journal(out, source.name, hashlib.sha256(key_src.encode()).hexdigest()[:32])
    finished = journal.done()
    mpp0 = float(source.mpp)
    info = OutputInfo(
        stem=source.name, out_dir=out, kind=kind, class_names=names, colors=cmap, mpp=mpp0,
        size=tuple(int(v) for v in source.dimensions), thumbnail=prep.thumb, thumb_downsample=prep.thumb_ds,
        tissue_mask=prep.tissue.mask, tissue_downsample=prep.tissue.downsample,
        tissue_area_um2=prep.tissue.area_um2(mpp0),
        roi_areas_um2=prep.rois.area_um2(mpp0) if prep.rois is not None else None,
        roi_outlines=getattr(prep.rois, "outlines", lambda: None)() if prep.rois is not None else None,
        sink_options={"embeddings": opts.embeddings, "density_grid_um": opts.density_grid_um})
    sinks = output_sinks(info, opts.formats, overlay=opts.overlay)
    ctx = RunContext(stain=prep.stain, rois=prep.rois, timer=timer, features=features)
    bar = _progress(len(prep.plan.selected), source.name, opts.progress)
    kept: list[Nuclei] = []
    n = 0
    try:
        skip = {k for k in finished if k < len(prep.chunks) and journal.readable(k)}
        resumed_tiles = sum(len(prep.chunks[k]) for k in skip)
        for k, nuc in iter_chunks(runner, prep, ctx, skip=skip, load=journal.load):
            if k not in skip:
                journal.save(k, nuc)
            with timer("write"):
                for s in sinks:
                    s.write(nuc)
            if keep:
                kept.append(nuc)
            n += len(nuc)
            claim.heartbeat()
            bar.update(len(prep.chunks[k]))
            bar.set_postfix(nuclei=n)
        bar.close()
        summary = {**prep.facts(runner), **ctx.stats, "models": models or {}, "versions": _versions(),
                   "resumed_tiles": resumed_tiles, "formats": list(opts.formats),
                   "timings_ms": timer.as_dict(), "wall_s": round(time.perf_counter() - t_start, 3)}
        paths = []
        with timer("write"):
            for s in sinks:
                paths.append(s.close(summary))
        for p in paths:  # what was written, counts included
            if p.name.endswith(".summary.json"):
                summary = json.loads(p.read_text())
    except BaseException:
        bar.close()
        for s in sinks:
            s.abort()
        raise
    journal.clear()
    nuclei = _chunk_nuclei(kept, runner, source) if keep else None
    return SourceResult(source.name, "done", nuclei, summary, paths)
