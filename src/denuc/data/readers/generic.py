"""The generic point-dataset layout, DeNuC's own format (``denuc convert`` writes it).

::

    DIR/dataset.yaml                 # mpp, classes, splits (see below)
    DIR/images/<stem>.png|jpg|jpeg|tif|tiff
    DIR/points/<stem>.csv            # header x,y,class[,score]  (class = a name from dataset.yaml)
    DIR/points/<stem>.geojson[.gz]   # or QuPath GeoJSON points (see denuc.data.geojson_points)

``dataset.yaml``::

    mpp: 0.5                                         # µm per pixel of the images (required)
    classes: [inflammatory, epithelial, stromal]     # or [{name: inflammatory, color: [r, g, b]}, ...]
    splits:                                          # optional; a missing split is empty
      train: [stem, ...]
      val: [...]                                     # may be missing: the classifier carves one
      test: [...]
    image_mpp: {stem: 0.2425}                        # optional per-image override of mpp

Rules (all violations raise :class:`~denuc.errors.InputError` naming the file):

* every image needs exactly one point file; an empty point file (or a CSV with only the
  header) means the image has zero nuclei; a point file without an image is ignored with
  a warning;
* class names in point files must be listed in ``classes``; an empty ``class`` cell (or an
  unclassified GeoJSON point or nucleus outline) means "nucleus of unknown class" (class id -1);
* a GeoJSON polygon larger than :data:`~denuc.data.geojson_points.REGION_AREA_UM2` (400 µm²
  at the image's mpp) is a region annotation (e.g. a "Tumor" area), classified or not: it is
  skipped with one warning per file naming the count and the classes; its class need not be
  in ``classes``;
* points outside their image follow the reader's ``outside`` policy (``"error"`` or ``"drop"``);
* stems that are in no split are still listed by ``stems(None)``.
Coordinates are (x, y) = (column, row) in pixels of the image, origin at its top-left corner.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from denuc.core.files import atomic_write_text
from denuc.core.mpp import check_mpp
from denuc.core.palette import RGB, default_colors, parse_color
from denuc.core.result import NO_CLASS, Nuclei
from denuc.data.base import PointDataset, register_dataset
from denuc.data.geojson_points import (
    REGION_AREA_UM2,
    read_geojson_points,
    region_area_px2,
    region_mask,
)
from denuc.data.splits import SplitLists, ordered_stems, parse_splits
from denuc.errors import InputError, ResolutionError

DATASET_YAML = "dataset.yaml"
IMAGES_DIR = "images"
POINTS_DIR = "points"
#: Image suffixes of the generic layout (lower case; matched case-insensitively).
GENERIC_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
#: Point file suffixes, in the order they are looked for.
POINT_SUFFIXES = (".csv", ".geojson", ".geojson.gz")
#: Keys of dataset.yaml that the reader uses; INFO_KEYS are kept for people and ignored.
YAML_KEYS = ("mpp", "classes", "splits", "image_mpp")
INFO_KEYS = ("name", "description", "source", "license", "citation", "version")


def _detect(p: Path) -> bool:
    return (p / DATASET_YAML).is_file() and (p / IMAGES_DIR).is_dir()


def _suffix(name: str, suffixes: Sequence[str]) -> str | None:
    low = name.lower()
    return next((s for s in suffixes if low.endswith(s) and len(low) > len(s)), None)


def files_by_stem(folders: Sequence[Path], suffixes: Sequence[str], what: str) -> dict[str, Path]:
    """``stem -> file`` for the files in ``folders`` whose names end in one of ``suffixes``
    (case-insensitive; hidden files and missing folders skipped). Two files with the same
    stem raise :class:`InputError` naming both."""
    out: dict[str, Path] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            suf = _suffix(f.name, suffixes)
            if suf is None or f.name.startswith(".") or not f.is_file():
                continue
            stem = f.name[: -len(suf)]
            if stem in out:
                raise InputError(f"{folder}: two {what} files for {stem!r}: {out[stem].name} and {f.name}")
            out[stem] = f
    return out


def parse_classes(obj: Any, source: str) -> tuple[tuple[str, ...], tuple[RGB, ...]]:
    """``classes`` of dataset.yaml -> (names, colours). Names must be unique non-empty text."""
    if not isinstance(obj, list) or not obj:
        raise InputError(f"{source}: 'classes' must be a non-empty list of class names or {{name, color}} entries")
    names: list[str] = []
    colors: list[RGB | None] = []
    for i, c in enumerate(obj):
        if isinstance(c, dict):
            if "name" not in c:
                raise InputError(f"{source}: class entry {i} has no 'name'")
            name, col = c["name"], c.get("color")
        else:
            name, col = c, None
        if not isinstance(name, str) or not name.strip() or name != name.strip() or "," in name:
            raise InputError(f"{source}: class {i} name {name!r} must be non-empty text without commas or "
                             "surrounding spaces")
        names.append(name)
        colors.append(None if col is None else parse_color(col, f"{source}: class {name!r}"))
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"{source}: duplicate class name(s) {dup}")
    defaults = default_colors(len(names))
    return tuple(names), tuple(c if c is not None else d for c, d in zip(colors, defaults))


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        raise InputError(f"{path}: missing; the generic layout needs dataset.yaml with mpp and classes")
    try:
        obj = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    except yaml.YAMLError as e:
        raise InputError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: must be a YAML mapping with keys mpp, classes[, splits]")
    return obj


@register_dataset("generic", _detect)
class GenericDataset(SplitLists, PointDataset):
    """A folder in the generic layout (module docstring). Validates the layout on opening;
    point files are parsed when read."""

    accepts_mpp = True

    def __init__(self, root: str | os.PathLike[str], outside: str = "error", mpp: float | None = None) -> None:
        """``mpp``: µm per pixel of the images when dataset.yaml has no ``mpp`` (the training
        commands' ``--data-mpp``); one that disagrees with dataset.yaml's is refused."""
        super().__init__(root, outside)
        ypath = self.root / DATASET_YAML
        cfg = _read_yaml(ypath)
        src = str(ypath)
        unknown = sorted(str(k) for k in cfg if k not in YAML_KEYS + INFO_KEYS)
        if unknown:
            warnings.warn(f"{src}: ignoring unknown key(s) {unknown}", stacklevel=2)
        self.mpp = self._dataset_mpp(cfg.get("mpp"), mpp, src)
        self.classes, self.colors = parse_classes(cfg.get("classes"), src)
        if not (self.root / IMAGES_DIR).is_dir():
            raise InputError(f"{self.root / IMAGES_DIR}: image folder is missing")
        self._images = files_by_stem([self.root / IMAGES_DIR], GENERIC_IMAGE_SUFFIXES, "image")
        if not self._images:
            raise InputError(f"{self.root / IMAGES_DIR}: no images ({'/'.join(GENERIC_IMAGE_SUFFIXES)})")
        self._points = files_by_stem([self.root / POINTS_DIR], POINT_SUFFIXES, "point")
        missing = [s for s in self._images if s not in self._points]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise InputError(
                f"{self.root / POINTS_DIR}: no point file (<stem>.csv or .geojson) for {len(missing)} image(s): "
                f"{missing[:5]}{more}; write an empty file for an image without nuclei"
            )
        orphans = sorted(set(self._points) - set(self._images))
        if orphans:
            warnings.warn(f"{self.root / POINTS_DIR}: ignoring {len(orphans)} point file(s) without an image, "
                          f"e.g. {self._points[orphans[0]].name}", stacklevel=2)
        self._splits = parse_splits(cfg.get("splits"), f"{src}: splits", set(self._images))
        self._order = ordered_stems(self._splits, self._images)
        self._image_mpp = self._parse_image_mpp(cfg.get("image_mpp"), src)

    @staticmethod
    def _dataset_mpp(in_yaml: Any, given: float | None, src: str) -> float:
        """The images' µm per pixel from dataset.yaml or, when it has none, ``given``."""
        if in_yaml is None:
            if given is None:
                raise ResolutionError(f"{src}: resolution (µm per pixel) is unknown: no 'mpp'; add a line such as 'mpp: 0.5' "
                                      "to it, or pass --data-mpp 0.5 (your value) to the training command "
                                      "(Python: open_dataset(path, mpp=0.5))")
            return check_mpp(given, f"{src}: --data-mpp")
        v = check_mpp(in_yaml, src)
        if given is not None and check_mpp(given, f"{src}: --data-mpp") != v:
            raise InputError(f"{src}: says mpp {v:g} µm/px but --data-mpp is {float(given):g}; correct dataset.yaml "
                             "or leave --data-mpp out")
        return v

    def _parse_image_mpp(self, obj: Any, src: str) -> dict[str, float]:
        if obj is None:
            return {}
        if not isinstance(obj, dict):
            raise InputError(f"{src}: image_mpp must be a mapping {{stem: mpp}}")
        out: dict[str, float] = {}
        for stem, v in obj.items():
            if str(stem) not in self._images:
                raise InputError(f"{src}: image_mpp names {stem!r}, which has no image")
            out[str(stem)] = check_mpp(v, f"{src}: image_mpp of {stem!r}")
        return out

    def mpp_of(self, stem: str) -> float:
        return self._image_mpp.get(stem, self.mpp)

    def image_path(self, stem: str) -> Path:
        try:
            return self._images[stem]
        except KeyError:
            raise InputError(f"{self.root}: no image {stem!r}") from None

    def point_path(self, stem: str) -> Path:
        """The point file of ``stem``."""
        self.image_path(stem)
        return self._points[stem]

    def _read_points(self, stem: str) -> Nuclei:
        path = self.point_path(stem)
        if path.suffix.lower() == ".csv":
            pts = Nuclei.read_csv(path, self.classes)
        else:
            pts = geojson_to_nuclei(path, self.classes, self.mpp_of(stem))
        return Nuclei(pts.xy, pts.scores, pts.class_ids, self.classes)  # class_ids None -> -1 in points()


def geojson_to_nuclei(path: str | os.PathLike[str], classes: Sequence[str], mpp: float | None = None) -> Nuclei:
    """Read a QuPath GeoJSON point file into :class:`Nuclei` with vocabulary ``classes``.

    Points and nucleus-sized polygons (centroids) are nuclei; unclassified ones get class -1.
    Polygons larger than 400 µm² at ``mpp`` µm/px (6400 px² when ``mpp`` is None; see
    :func:`~denuc.data.geojson_points.region_area_px2`) are region annotations: they are
    skipped, classified or not, with one warning naming their count and classes. Unknown
    class names of the remaining features raise :class:`InputError` naming the file.
    Scores are kept when every kept feature has one.
    """
    g = read_geojson_points(path)
    region = region_mask(g, mpp)
    if region.any():
        kinds = sorted({"(unclassified)" if n is None else n for n, r in zip(g.names, region) if r})
        where = f"{REGION_AREA_UM2:g} µm² at {mpp:g} µm/px" if mpp else "mpp unknown"
        warnings.warn(f"{path}: skipped {int(region.sum())} polygon(s) larger than {region_area_px2(mpp):g} px² "
                      f"({where}) as region annotations, not nuclei; their classes: {kinds}", stacklevel=2)
    keep = ~region
    names = [n for n, k in zip(g.names, keep) if k]
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({n for n in names if n is not None and n not in index})
    if unknown:
        raise InputError(f"{path}: unknown class name(s) {unknown}; known: {list(classes)}")
    ids = np.array([NO_CLASS if n is None else index[n] for n in names], dtype=np.int64)
    scores = g.scores[keep] if keep.any() and np.all(np.isfinite(g.scores[keep])) else None
    name = Path(path).name
    suf = _suffix(name, POINT_SUFFIXES)
    return Nuclei(g.xy[keep], scores, ids, tuple(classes), name=name[: -len(suf)] if suf else Path(path).stem)


# ------------------------------------------------------------------ writers
def write_points_csv(nuclei: Nuclei, path: str | os.PathLike[str], classes: Sequence[str] | None = None) -> Path:
    """Write a point file of the generic layout (``x,y,class[,score]``) atomically.

    Args:
        classes: the dataset vocabulary; the points' class names must all be in it
            (the ids are re-expressed in it). Class probabilities are not written.
    """
    out = nuclei if classes is None else nuclei.with_classes(classes)
    return Nuclei(out.xy, out.scores, out.class_ids, out.class_names).to_csv(path)


def write_dataset_yaml(
    root: str | os.PathLike[str],
    mpp: float,
    classes: Sequence[str],
    colors: Sequence[Sequence[int]] | None = None,
    splits: Mapping[str, Sequence[str]] | None = None,
    image_mpp: Mapping[str, float] | None = None,
    info: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``root/dataset.yaml`` atomically (creates ``root``).

    Args:
        mpp: µm per pixel of the images (checked with :func:`~denuc.core.check_mpp`).
        classes: class names; ``colors`` one ``(r, g, b)`` each (defaults when None).
        splits: ``{"train": [...], "val": [...], "test": [...]}``; empty splits are omitted.
        image_mpp: per-image mpp overrides ``{stem: mpp}``.
        info: free-form keys for people (name, description, source, license, citation, version).
    """
    import yaml

    target = Path(root) / DATASET_YAML
    names, cols = parse_classes(
        [{"name": n, "color": list(c)} for n, c in zip(classes, colors)] if colors is not None else list(classes),
        str(target),
    )
    if colors is not None and len(colors) != len(classes):
        raise InputError(f"{len(colors)} colours for {len(classes)} classes")
    doc: dict[str, Any] = {}
    for k, v in (info or {}).items():
        if k not in INFO_KEYS:
            raise InputError(f"dataset.yaml info key {k!r} is not one of {list(INFO_KEYS)}")
        doc[k] = v
    doc["mpp"] = check_mpp(mpp, "dataset mpp")
    doc["classes"] = [{"name": n, "color": list(c)} for n, c in zip(names, cols)]
    if splits:
        sp = parse_splits({k: list(v) for k, v in splits.items()}, str(target))
        doc["splits"] = {k: v for k, v in sp.items() if v}
    if image_mpp:
        doc["image_mpp"] = {str(k): check_mpp(v, f"image_mpp of {k!r}") for k, v in image_mpp.items()}
    text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, allow_unicode=True, width=100)
    return atomic_write_text(target, text)
