"""Cell embeddings at given points: for labs that already have their nuclei and want features.

:func:`embed_points` samples the head's point features (what ``obsm['X_denuc']`` of the
``h5ad`` output holds) at points the user gives (a CSV ``x,y[,class]`` or a QuPath GeoJSON of
points / detections / cells), classifies them with the head as a bonus, and :func:`write_embeddings`
writes them as ``<stem>.h5ad`` (the layout of :mod:`denuc.sinks.anndata`, with the input's own
classes, when it has them, in ``obs['label']``). ``denuc embed`` is the command line.

Frame and units: points are (x, y) in **level-0 pixels** of the image (pixel-edge frame, as
the CSV that ``denuc predict`` writes and QuPath's GeoJSON).

Images are read whole, so their features equal those of a ``denuc predict`` run on the same
image; for a slide the level-0 box around the points (plus one encoder window of margin) is
read, at most :data:`denuc.data.image.MAX_IMAGE_PIXELS` pixels.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from denuc.core.result import Nuclei
from denuc.errors import InputError

#: label column of ``obs`` that holds the classes the input points came with
LABEL = "label"


def read_points(path: str | os.PathLike[str]) -> Nuclei:
    """Points of a CSV (``x,y[,class][,...]``, as ``denuc predict`` writes) or a GeoJSON file
    (:func:`denuc.data.geojson_points.read_geojson_points`); classes, when present, are the
    sorted names found (``class_ids`` -1 where a point has none)."""
    from denuc.data.geojson_points import GEOJSON_SUFFIXES, read_geojson_points

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such point file")
    name = p.name.lower()
    if name.endswith(GEOJSON_SUFFIXES):
        g = read_geojson_points(p)
        labels = sorted({n for n in g.names if n})
        ids = np.array([labels.index(n) if n else -1 for n in g.names], dtype=np.int64)
        return Nuclei(g.xy, class_ids=ids if labels else None, class_names=tuple(labels), name=p.stem)
    if name.endswith(".csv"):
        pts = Nuclei.read_csv(p)
        return Nuclei(pts.xy, class_ids=pts.class_ids, class_names=pts.class_names, name=p.stem)
    raise InputError(f"{p}: points must be a .csv (x,y[,class]) or a QuPath GeoJSON ({', '.join(GEOJSON_SUFFIXES)})")


def embed_points(model: Any, image: np.ndarray | str | os.PathLike[str], points: Nuclei | str | os.PathLike[str],
                 mpp: float | None = None) -> Nuclei:
    """Features and head classes at ``points``.

    Args:
        model: a :class:`denuc.pipeline.DeNuC`.
        image: an ``(H, W, 3)`` array, an image file or a slide file.
        points: :class:`Nuclei` (``xy`` level-0 px) or a point file (:func:`read_points`).
        mpp: level-0 µm per pixel (required for arrays and files without it).

    Returns:
        :class:`Nuclei` in the order of ``points``: the head's classes, probabilities and scores,
        ``features`` ``(N, C)`` float32, ``mpp`` the image's; ``meta["labels"]`` holds the
        input's own class names per point (``""`` = none) when it had classes.

    Raises:
        InputError: a point outside the image, an unreadable image or point file.
    """
    from denuc.data.image import MAX_IMAGE_PIXELS
    from denuc.source import open_source

    pts = read_points(points) if isinstance(points, (str, os.PathLike)) else points
    labels = pts.classes if pts.class_ids is not None else None
    name = pts.name
    with open_source(image, mpp=mpp, name=Path(image).stem if isinstance(image, (str, os.PathLike)) else "") as src:
        w, h = (int(v) for v in src.level_dimensions[0])
        inside = pts.inside(h, w)
        if not inside.all():
            k = int(np.flatnonzero(~inside)[0])
            raise InputError(f"{src.name}: point {k} at (x, y) = {tuple(pts.xy[k])} lies outside the "
                             f"{w} x {h} px image ({int((~inside).sum())} of {len(pts)} points outside)")
        x0 = y0 = 0
        x1, y1 = w, h
        if src.backend in ("openslide", "tiffslide") and len(pts):
            margin = math.ceil(model.featurizer.window * model.featurizer.mpp / src.mpp)
            x0, y0 = (max(0, int(v) - margin) for v in pts.xy.min(0))
            x1, y1 = (min(s, int(v) + 1 + margin) for v, s in zip(pts.xy.max(0), (w, h), strict=True))
        if (x1 - x0) * (y1 - y0) > MAX_IMAGE_PIXELS:
            raise InputError(f"{src.name}: the points span {x1 - x0} x {y1 - y0} px, more than "
                             f"{MAX_IMAGE_PIXELS} px read at once; embed smaller regions one by one")
        pixels = src.read(x0, y0, x1 - x0, y1 - y0, 0)
        mpp0 = float(src.mpp)
        stem = src.name
    local = pts.shift(-x0, -y0)
    out = model.classify(pixels, mpp0, local, features=True).shift(x0, y0)
    out.xy = pts.xy.copy()  # exactly the given coordinates
    out.image_size = (h, w)
    out.name = stem or name
    out.det_scores = None
    out.scores = out.probs.max(1) if out.probs is not None and len(out) else np.zeros(len(out), np.float32)
    if labels is not None:
        out.meta["labels"] = np.asarray(labels, dtype=object)
    return out


def write_embeddings(nuclei: Nuclei, out_dir: str | os.PathLike[str], *, embeddings: str = "float16",
                     models: dict[str, Any] | None = None, facts: dict[str, Any] | None = None) -> Path:
    """Write ``<out_dir>/<nuclei.name>.h5ad`` (atomically) from :func:`embed_points`'s result.

    Args:
        embeddings: stored dtype of ``obsm['X_denuc']`` (``float16``, ``float32``) or ``none``.
        models: the model description (:meth:`denuc.pipeline.DeNuC.models`) for ``uns``.
        facts: more run facts for ``uns['denuc']['summary']``.
    """
    from denuc.sinks.anndata import AnnDataSink
    from denuc.sinks.base import OutputInfo

    if nuclei.mpp is None or nuclei.image_size is None:
        raise InputError("write_embeddings needs nuclei with mpp and image_size (from embed_points)")
    h, w = nuclei.image_size
    labels = nuclei.meta.get("labels")
    extra = {LABEL: sorted(set(labels.tolist()) | {""})} if labels is not None else {}
    info = OutputInfo(stem=nuclei.name or "points", out_dir=Path(out_dir), kind="image",
                      class_names=nuclei.class_names, colors={}, mpp=nuclei.mpp, size=(w, h),
                      sink_options={"embeddings": embeddings, "extra_obs": extra})
    sink = AnnDataSink(info)
    chunk = nuclei.select(slice(None))
    if labels is not None:
        chunk.meta["extra_obs"] = {LABEL: labels}
    sink.write(chunk)
    summary = {"models": models or {}, "nuclei": len(nuclei), "points": "given", **(facts or {})}
    return sink.close(summary)
