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

import functools
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from denuc.core.result import Nuclei
from denuc.errors import InputError
from denuc.sinks.base import TILE_KEY
from denuc.stream.runner import RunContext, TileStream
from denuc.stream.timing import StageTimer

#: most pixels a stain estimate reads (bounds its memory: float OD of 4 Mpx)
STAIN_PIXELS = 2**22
#: sources up to this many level-0 px get their stain estimate from the whole of level 0
STAIN_WHOLE_PIXELS = 2**24

#: tissue options: ``auto`` (files, slide or image: the thumbnail rule of :mod:`denuc.source.tissue`;
#: in-memory arrays: processed whole), ``none`` (everything, over the whole image).
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


@functools.lru_cache(maxsize=1)
def _package_versions() -> tuple[tuple[str, str], ...]:
    """Versions of the packages the outputs depend on (read once per process: package metadata
    costs about 10 ms a read)."""
    return tuple(_versions_now().items())


def _versions() -> dict[str, str]:
    return dict(_package_versions())


def _versions_now() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("denuc", "torch", "numpy", "openslide-python", "openslide-bin", "tiffslide", "timm"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def runtimes_used(runner: TileStream) -> dict[str, str]:
    """What actually ran each network (``torch`` or ``onnx``), read after the run: an ``auto``
    runner that fell back to PyTorch says ``torch`` from then on."""
    out: dict[str, str] = {}
    r = getattr(runner.detector, "runner", None)
    if r is not None:
        out["detector"] = str(r.runtime)
    c = runner.classifier
    if c is not None and getattr(c.featurizer, "runner", None) is not None:
        out["encoder"] = str(c.featurizer.runner.runtime)
    return out


def _models_as_run(models: dict[str, Any] | None, used: dict[str, str]) -> dict[str, Any]:
    """``models`` with the runtimes that actually ran (the description is taken before the run)."""
    m = dict(models or {})
    if isinstance(m.get("detector"), dict) and "detector" in used and "runtime" in m["detector"]:
        m["detector"] = {**m["detector"], "runtime": used["detector"]}
    if "encoder_runtime" in m and "encoder" in used:
        m["encoder_runtime"] = used["encoder"]
    return m


def _stain_estimate(source: Any, runner: TileStream, plan: Any) -> Any:
    """One Macenko estimate per source, by one rule for every container (slide, pyramidal or
    flat TIFF, plain image, array), so the same pixels give the same estimate: a source of at
    most :data:`STAIN_WHOLE_PIXELS` level-0 px is read whole at level 0 (an evenly strided
    subset of :data:`STAIN_PIXELS` px when larger); a bigger one from up to 16 crops of 512 px
    centred on selected tiles, resampled to the encoder's mpp from whatever level holds it."""
    from denuc.data.stain import estimate_stains
    from denuc.stream.runner import _read_resampled

    c = runner.classifier
    if c is None or c.stain_norm == "none":
        return None
    if c.stain_norm != "macenko":
        raise InputError(f"stain normaliser {c.stain_norm!r} is not supported on tiles")
    w, h = source.level_dimensions[0]
    if w * h <= STAIN_WHOLE_PIXELS or plan.enc is None:
        step = max(1, math.ceil(math.sqrt(w * h / STAIN_PIXELS)))
        if step == 1:
            img = source.read(0, 0, w, h, 0)
        else:  # strided rows read a band at a time
            rows = max(step, (STAIN_PIXELS // max(1, w)) // step * step)
            img = np.concatenate([source.read(0, y, w, min(rows, h - y), 0)[::step, ::step]
                                  for y in range(0, h, rows)], axis=0)
        return estimate_stains(img)
    enc = plan.enc
    ew, eh = enc.size
    sw, sh = min(512, ew), min(512, eh)
    boxes = plan.core_boxes_level0()[plan.selected] if plan.selected else plan.core_boxes_level0()
    pick = np.linspace(0, len(boxes) - 1, num=min(16, len(boxes))).round().astype(int)
    parts = []
    for x0, y0, x1, y1 in boxes[pick]:
        cx, cy = (x0 + x1) / 2 / enc.to_level0, (y0 + y1) / 2 / enc.to_level0
        bx = int(max(0, min(ew - sw, round(cx - sw / 2))))
        by = int(max(0, min(eh - sh, round(cy - sh / 2))))
        parts.append(_read_resampled(source, enc, (bx, by, bx + sw, by + sh)))
    return estimate_stains(np.concatenate([p.reshape(-1, 1, 3) for p in parts], axis=0))


def _tissue(source: Any, opts: RunOptions, thumb: np.ndarray, ds: float) -> Any:
    from denuc.source import detect_tissue, full_mask, load_tissue_mask

    if opts.tissue_mask is not None:
        return load_tissue_mask(opts.tissue_mask, source)
    if opts.tissue not in TISSUE_CHOICES:
        raise InputError(f"--tissue must be one of {', '.join(TISSUE_CHOICES)}; got {opts.tissue!r}")
    if opts.tissue == "none" or source.backend == "array":
        return full_mask(source)
    return detect_tissue(thumb, ds, source.mpp)


class _Prepared:
    """Source, tissue, ROIs, plan and the tiles to run, decided before any model work."""

    def __init__(self, runner: TileStream, source: Any, opts: RunOptions, timer: StageTimer) -> None:
        from denuc.source import load_rois
        from denuc.source.area import AnalysedArea

        self.source = source
        with timer("tissue"):
            self.thumb, self.thumb_ds = source.thumbnail(opts.thumbnail_px)
            self.tissue = _tissue(source, opts, self.thumb, self.thumb_ds)
        self.rois = load_rois(opts.roi, tuple(source.dimensions)) if opts.roi is not None else None
        self.area = AnalysedArea(self.tissue, self.rois, tuple(source.dimensions), float(source.mpp))
        with timer("plan"):
            plan = runner.plan(source)
            boxes = plan.core_boxes_level0()
            keep = self.tissue.boxes_touching(boxes)
            n_tissue = int(keep.sum())
            if self.rois is not None:
                keep &= self.rois.intersects_boxes(boxes)
            plan.selected = np.flatnonzero(keep).astype(int).tolist()
            import hashlib

            mask_sha = hashlib.sha256(np.packbits(self.tissue.mask).tobytes()
                                      + repr((self.tissue.mask.shape, self.tissue.downsample)).encode()).hexdigest()
            plan.info = {"tissue": self.tissue.method, "tissue_mask_sha256": mask_sha,  # nuclei are kept by the mask
                         "roi": None if opts.roi is None else str(opts.roi)}
        self.plan = plan
        self.tiles = {"total": plan.count, "touching_tissue": n_tissue, "selected": len(plan.selected),
                      "skipped_tissue": plan.count - n_tissue,
                      "skipped_roi": n_tissue - len(plan.selected) if self.rois is not None else 0}
        self.chunks = [plan.selected[i:i + opts.chunk_tiles] for i in range(0, len(plan.selected), opts.chunk_tiles)]
        self.stain = _stain_estimate(source, runner, plan) if plan.selected else None

    def facts(self, runner: TileStream) -> dict[str, Any]:
        s, p = self.source, self.plan
        f: dict[str, Any] = {
            "input": str(s.path) if s.path is not None else s.name, "backend": s.backend,
            "mpp_source": s.mpp_source, "levels": s.level_count,
            "detector_level": p.det.level, "detector_level_mpp": s.level_mpp(p.det.level), "detector_mpp": p.det.mpp,
            "tissue": self.tissue.method, "tiles": dict(self.tiles), "tile_px": runner.tile_px,
            "areas": self.area.describe(),
        }
        if p.enc is not None:
            f.update({"encoder_level": p.enc.level, "encoder_level_mpp": s.level_mpp(p.enc.level),
                      "encoder_mpp": p.enc.mpp})
        if self.stain is not None:
            f["stain_estimate"] = {"stains": np.round(self.stain.stains, 4).tolist(),
                                   "max_conc": np.round(self.stain.max_conc, 4).tolist(),
                                   "fallback": bool(self.stain.fallback)}
        return f


def _chunk_nuclei(parts: Sequence[Nuclei], runner: TileStream, source: Any,
                  tiles: Sequence[int] | None = None) -> Nuclei:
    """One :class:`Nuclei` of ``parts`` in order. With ``tiles`` (the plan index of the tile each
    part came from, one per part) it also carries ``meta[TILE_KEY]``: ``(N,)`` int64, the tile
    of every nucleus (see :data:`denuc.sinks.base.TILE_KEY`)."""
    names = runner.class_names
    w, h = source.level_dimensions[0]
    if not parts:
        out = Nuclei.empty(names, mpp=float(source.mpp), image_size=(h, w), name=source.name)
    else:
        out = Nuclei.concat(list(parts))
        out.name, out.image_size = source.name, (h, w)
    if tiles is not None:
        ids = [np.full(len(p), t, dtype=np.int64) for p, t in zip(parts, tiles, strict=True)]
        out.meta[TILE_KEY] = np.concatenate(ids) if ids else np.zeros(0, np.int64)
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
        yield k, _chunk_nuclei(parts, runner, prep.source, tiles=ch)


def _progress(total: int, name: str, enabled: bool | None) -> Any:
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, desc=name, unit="tile", disable=not enabled, dynamic_ncols=True, leave=True)


def open_input(src: Any, mpp: float | None = None, mpp_default: float | None = None, name: str = "") -> Any:
    """:func:`denuc.source.open_source`, with ``mpp_default`` the level-0 µm per pixel of an input
    that carries none (its ``mpp_source`` is then ``"--mpp-default"``); ``mpp`` overrides every
    input's. A file's own mpp that is implausible or anisotropic still fails."""
    from denuc.errors import MissingMppError
    from denuc.source import open_source

    if mpp is not None or mpp_default is None:
        return open_source(src, mpp=mpp, name=name)
    try:
        return open_source(src, mpp=None, name=name)
    except MissingMppError:
        source = open_source(src, mpp=mpp_default, name=name)
        source.mpp_source = "--mpp-default"
        return source


def input_fingerprint(source: Any, opts: RunOptions, models: dict[str, Any] | None) -> dict[str, Any]:
    """:func:`denuc.stream.fingerprint.run_fingerprint` of an opened input under ``opts``."""
    from denuc.stream.fingerprint import run_fingerprint

    return run_fingerprint(models, mpp=float(source.mpp), mpp_source=source.mpp_source, tissue=opts.tissue,
                           tissue_mask=opts.tissue_mask, roi=opts.roi, thumbnail_px=opts.thumbnail_px)


def run_source(runner: TileStream, src: Any, *, mpp: float | None = None, name: str = "",
               out_dir: str | os.PathLike[str] | None = None, opts: RunOptions | None = None,
               models: dict[str, Any] | None = None, colors: dict[str, tuple[int, int, int]] | None = None,
               keep: bool | None = None, claim: Any = None, mpp_default: float | None = None) -> SourceResult:
    """Run one input through the stream.

    With ``out_dir``, the input's outputs are committed by its summary, written last with the
    run's fingerprint (:mod:`denuc.stream.fingerprint`): an input is skipped when its summary
    has the same fingerprint and every output is there, refused (:class:`SettingsChanged`)
    when the summary or the resume journal has another one (unless ``opts.overwrite``), and a
    failure removes every output this run had put in place.

    Args:
        runner: detector (+ classifier) stream.
        src: a file path (image or slide) or an array (``(H, W, 3)`` etc.).
        mpp: µm per pixel of level 0 (overrides the file's metadata; required for arrays and
            files without it).
        mpp_default: µm per pixel of level 0 for an input that carries none (:func:`open_input`).
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
    from denuc.stream.fingerprint import output_state

    opts = opts or RunOptions()
    t_start = time.perf_counter()
    timer = StageTimer(runner.detector.device)
    keep = out_dir is None if keep is None else keep
    try:
        source = open_input(src, mpp=mpp, mpp_default=mpp_default, name=name)
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
        try:
            fp = input_fingerprint(source, opts, models)
            if claim is None:
                if output_state(finals, fp, opts.overwrite) == "done":
                    drop_dead_journal(out, stem, opts.stale_after)
                    return SourceResult(stem, "skipped", paths=finals)
                from denuc.cohort.claims import try_claim

                claim = try_claim(out, stem, stale_after=opts.stale_after)
                if claim is None:
                    return SourceResult(stem, "busy")
        except BaseException:
            if claim is not None:
                claim.release()
            raise
        try:
            if output_state(finals, fp, opts.overwrite) == "done":  # finished meanwhile
                shutil.rmtree(out / f".{stem}.partial", ignore_errors=True)  # (ours to remove: we hold the claim)
                return SourceResult(stem, "skipped", paths=finals)
            _remove_dead_temps(out, stem, kind)
            return _run_files(runner, source, out, kind, opts, timer, t_start, models, colors, claim, keep, fp,
                              finals)
        finally:
            claim.release()


def drop_dead_journal(out: Path, stem: str, stale_after: float) -> None:
    """Remove the resume journal (``out/.<stem>.partial``) of an input whose outputs are all in
    place: a process killed after writing them and before removing its journal leaves one. Only
    when the input's claim can be taken (a live owner's journal stays)."""
    from denuc.cohort.claims import try_claim

    if not (Path(out) / f".{stem}.partial").exists():
        return
    c = try_claim(Path(out), stem, stale_after=stale_after)
    if c is not None:
        try:
            shutil.rmtree(Path(out) / f".{stem}.partial", ignore_errors=True)
        finally:
            c.release()


def _remove_dead_temps(out: Path, stem: str, kind: str) -> None:
    """Temporary files of ``stem``'s outputs and journal left by killed processes (the caller
    holds the input's claim)."""
    from denuc.core.files import remove_dead_temps
    from denuc.sinks import ALWAYS, SINKS

    names = [f"{stem}{cls.suffix_for(k)}" for cls in (*SINKS.values(), *ALWAYS) for k in ("slide", "image")]
    remove_dead_temps(out, names)
    part = out / f".{stem}.partial"
    if part.is_dir():
        remove_dead_temps(part)


def _run_memory(runner: TileStream, source: Any, opts: RunOptions, timer: StageTimer, t_start: float,
                models: dict[str, Any] | None) -> SourceResult:
    prep = _Prepared(runner, source, opts, timer)
    ctx = RunContext(stain=prep.stain, rois=prep.rois, timer=timer, area=prep.area)
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
    ids_all = nuclei.class_ids if nuclei.class_ids is not None else np.zeros(len(nuclei), np.int64)
    counts = {c: int((ids_all == k).sum()) for k, c in enumerate(nuclei.class_names)}
    from denuc.sinks.summary import density

    a = prep.area.analysed_area_um2
    used = runtimes_used(runner)
    summary = {**prep.facts(runner), **ctx.stats, "kind": _kind(source), "mpp": float(source.mpp),
               "size": list(source.dimensions), "nuclei": len(nuclei), "counts": counts,
               "models": _models_as_run(models, used), "runtime": used,
               "tissue_area_mm2": prep.area.tissue_area_um2 / 1e6, "analysed_area_mm2": a / 1e6,
               "density_per_mm2": density(len(nuclei), a),
               "class_density_per_mm2": {c: density(n, a) for c, n in counts.items()},
               "timings_ms": timer.as_dict(), "wall_s": round(time.perf_counter() - t_start, 3)}
    if prep.area.roi_areas_um2 is not None:  # per region, as <stem>.summary.json has them
        roi = nuclei.roi if nuclei.roi is not None else np.full(len(nuclei), "", dtype=object)
        rois = {}
        for name, ra in prep.area.roi_areas_um2.items():
            ids = nuclei.class_ids[roi == name] if nuclei.class_ids is not None else np.zeros(0, np.int64)
            rc = {c: int((ids == k).sum()) for k, c in enumerate(nuclei.class_names)}
            rois[name] = {"area_mm2": ra / 1e6, "nuclei": int((roi == name).sum()), "counts": rc,
                          "density_per_mm2": density(int((roi == name).sum()), ra),
                          "class_density_per_mm2": {c: density(k, ra) for c, k in rc.items()}}
        summary["rois"] = rois
    nuclei.meta["summary"] = summary
    return SourceResult(source.name, "done", nuclei, summary)


def _run_files(runner: TileStream, source: Any, out: Path, kind: str, opts: RunOptions, timer: StageTimer,
               t_start: float, models: dict[str, Any] | None, colors: dict[str, tuple[int, int, int]] | None,
               claim: Any, keep: bool, fingerprint: dict[str, Any], finals: list[Path]) -> SourceResult:
    import hashlib
    import json

    from denuc.core.palette import resolve_colors
    from denuc.sinks import SINKS, OutputInfo, output_sinks
    from denuc.stream.journal import Journal

    prep = _Prepared(runner, source, opts, timer)
    names = runner.class_names
    cmap = {k: tuple(int(v) for v in c) for k, c in resolve_colors(names, colors).items()}
    features = (any(SINKS[f].stores_features for f in opts.formats) and opts.embeddings != "none"
                and runner.classifier is not None)
    key = {"plan": prep.plan.key(), "models": models or {}, "chunk_tiles": opts.chunk_tiles, "mpp": source.mpp,
           "classes": list(names), "tile_ids": True}  # chunks saved with each nucleus's tile index
    if features:  # chunks saved with point features are not those saved without
        key["features"] = True
    key_src = json.dumps(key, sort_keys=True, default=str)
    journal = Journal(out, source.name, hashlib.sha256(key_src.encode()).hexdigest()[:32], fingerprint=fingerprint,
                      overwrite=opts.overwrite)
    finished = journal.done()
    mpp0 = float(source.mpp)
    info = OutputInfo(
        stem=source.name, out_dir=out, kind=kind, class_names=names, colors=cmap, mpp=mpp0,
        size=tuple(int(v) for v in source.dimensions), thumbnail=prep.thumb, thumb_downsample=prep.thumb_ds,
        tissue_mask=prep.tissue.mask, tissue_downsample=prep.tissue.downsample,
        analysed_mask=prep.area.mask() if "density" in opts.formats else None,
        tissue_area_um2=prep.area.tissue_area_um2, analysed_area_um2=prep.area.analysed_area_um2,
        roi_areas_um2=prep.area.roi_areas_um2,
        roi_outlines=getattr(prep.rois, "outlines", lambda: None)() if prep.rois is not None else None,
        sink_options={"embeddings": opts.embeddings, "density_grid_um": opts.density_grid_um,
                      "tile_cores": prep.plan.core_boxes_level0(), "tile_grid": (prep.plan.xs.count,
                                                                                prep.plan.ys.count),
                      "roi_shapes": list(zip(prep.rois.names, prep.rois.geoms)) if prep.rois is not None else None})
    sinks = output_sinks(info, opts.formats, overlay=opts.overlay)
    ctx = RunContext(stain=prep.stain, rois=prep.rois, timer=timer, area=prep.area, features=features)
    bar = _progress(len(prep.plan.selected), source.name, opts.progress)
    kept: list[Nuclei] = []
    paths: list[Path] = []
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
        used = runtimes_used(runner)
        summary = {**prep.facts(runner), **ctx.stats, "models": _models_as_run(models, used), "runtime": used,
                   "versions": _versions(), "resumed_tiles": resumed_tiles, "formats": list(opts.formats),
                   "fingerprint": fingerprint}
        last = [s for s in sinks if s.suffix == ".summary.json"]  # closed last: it records the times, marks done
        with timer("write"):  # old outputs go (summary first), then the new ones (h5ad keeps the run facts)
            _uncommit(finals)
            for s in sinks:
                if s not in last:
                    paths.append(s.close(summary))
        summary = {**summary, "timings_ms": timer.as_dict(), "wall_s": round(time.perf_counter() - t_start, 3)}
        for s in last:
            paths.append(s.close(summary))
        for p in paths:  # what was written, counts included
            if p.name.endswith(".summary.json"):
                summary = json.loads(p.read_text())
    except BaseException:
        bar.close()
        for s in sinks:
            s.abort()
        _uncommit(paths)  # outputs already in place: a failed input leaves none
        raise
    journal.clear()
    nuclei = _chunk_nuclei(kept, runner, source) if keep else None
    return SourceResult(source.name, "done", nuclei, summary, paths)


def _uncommit(paths: Sequence[Path]) -> None:
    """Remove an input's final outputs (files, or folders such as a ``.zarr`` store), its summary
    (the commit marker) first."""
    import shutil

    for p in sorted(paths, key=lambda p: not p.name.endswith(".summary.json")):
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink(missing_ok=True)
        except OSError:
            pass
