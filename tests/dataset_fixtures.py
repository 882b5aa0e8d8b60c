"""Tiny OCELOT 2023 and PUMA folders written in exactly their published layouts (tests only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

#: OCELOT samples: id -> (subset, cell mpp, CSV text). "003" has an empty CSV (zero cells).
OCELOT_SAMPLES: dict[str, tuple[str, float, str]] = {
    "001": ("train", 0.19426718377508223, "10,20,1\n30,40,2\n63,5,2\n"),
    "002": ("train", 0.2, "0,0,2\n"),
    "003": ("val", 0.1943, ""),
    "004": ("test", 0.2025, "5,6,1\n"),
}
OCELOT_SIZE = 64  # the real cell patches are 1024 x 1024


def make_ocelot(root: Path, samples: dict[str, tuple[str, float, str]] | None = None) -> Path:
    """``metadata.json`` + ``images/<subset>/{cell,tissue}/<id>.jpg`` + ``annotations/<subset>/cell/<id>.csv``."""
    samples = OCELOT_SAMPLES if samples is None else samples
    pairs: dict[str, Any] = {}
    rng = np.random.default_rng(1)
    for sid, (subset, mpp, csv) in samples.items():
        pairs[sid] = {
            "slide_name": f"TCGA-XX-{sid}",
            "cell": {"x_start": 1000, "y_start": 2000, "x_end": 1808, "y_end": 2808,
                     "resized_mpp_x": mpp, "resized_mpp_y": mpp},
            "tissue": {"x_start": 0, "y_start": 0, "x_end": 3235, "y_end": 3235,
                       "resized_mpp_x": 4 * mpp, "resized_mpp_y": 4 * mpp},
            "patch_x_offset": 0.25, "patch_y_offset": 0.5,
            "mpp_x": 0.2462, "mpp_y": 0.2462,
            "organ": "kidney",
            "subset": subset,
        }
        for part in ("cell", "tissue"):
            d = root / "images" / subset / part
            d.mkdir(parents=True, exist_ok=True)
            img = rng.integers(0, 255, (OCELOT_SIZE, OCELOT_SIZE, 3), dtype=np.uint8)
            Image.fromarray(img).save(d / f"{sid}.jpg", quality=90)
        a = root / "annotations" / subset / "cell"
        a.mkdir(parents=True, exist_ok=True)
        (a / f"{sid}.csv").write_text(csv)
        t = root / "annotations" / subset / "tissue"
        t.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ones((8, 8), np.uint8)).save(t / f"{sid}.png")
    meta = {"dataset_name": "ocelot2023", "version": "1.0.1", "sample_pairs": pairs}
    (root / "metadata.json").write_text(json.dumps(meta, indent=2))
    return root


PUMA_IMAGES = "01_training_dataset_tif_ROIs"
PUMA_NUCLEI = "01_training_dataset_geojson_nuclei"
PUMA_SIZE = 48  # the real ROIs are 1024 x 1024


def square(x0: float, y0: float, side: float) -> list[list[float]]:
    """A closed square ring (GeoJSON order) with its lower-left corner at (x0, y0)."""
    return [[x0, y0], [x0 + side, y0], [x0 + side, y0 + side], [x0, y0 + side], [x0, y0]]


def puma_feature(puma_type: str, rings: list[list[list[float]]] | None = None,
                 multi: list[list[list[list[float]]]] | None = None) -> dict[str, Any]:
    """One PUMA nucleus as QuPath exports it (annotation objects with a classification)."""
    geom = {"type": "MultiPolygon", "coordinates": multi} if multi is not None else \
        {"type": "Polygon", "coordinates": rings}
    return {"type": "Feature", "id": "3c6d1a0e-0000-4000-8000-000000000000", "geometry": geom,
            "properties": {"objectType": "annotation",
                           "classification": {"name": puma_type, "color": [255, 0, 0]}}}


def make_puma(root: Path, rois: dict[str, list[dict[str, Any]]]) -> Path:
    """``<PUMA_IMAGES>/<stem>.tif`` (RGBA TIFF) + ``<PUMA_NUCLEI>/<stem>_nuclei.geojson`` per ROI."""
    (root / PUMA_IMAGES).mkdir(parents=True, exist_ok=True)
    (root / PUMA_NUCLEI).mkdir(parents=True, exist_ok=True)
    (root / "01_training_dataset_geojson_tissue").mkdir(exist_ok=True)  # present in the release, ignored
    rng = np.random.default_rng(2)
    for stem, feats in rois.items():
        rgba = rng.integers(0, 255, (PUMA_SIZE, PUMA_SIZE, 4), dtype=np.uint8)
        rgba[..., 3] = 255
        tifffile.imwrite(root / PUMA_IMAGES / f"{stem}.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
        fc = {"type": "FeatureCollection", "features": feats}
        (root / PUMA_NUCLEI / f"{stem}_nuclei.geojson").write_text(json.dumps(fc))
    return root
