"""Distance-based precision / recall / F1 of predicted nucleus points against ground truth.

Counting (micro, pooled over images): for every image, predictions are matched one-to-one
to GT points within a radius by a protocol of :data:`~denuc.evaluate.matching.PROTOCOLS`;
``tp`` (matched pairs), ``n_pred`` and ``n_gt`` are summed over all images, then

* precision = tp / n_pred (0 when n_pred == 0),
* recall    = tp / n_gt   (0 when n_gt == 0),
* F1        = 2 tp / (n_pred + n_gt) (= 2PR/(P+R); 0 when tp == 0, which includes a class
  with neither predictions nor GT: such a class is flagged ``"empty": true``, gets F1 = 0
  and a warning, and still counts in the mean).

Detection counts are class-agnostic (all points). Per-class counts match the predictions
of class c only against the GT of class c (points without a class, id -1, count only for
detection). The headline ``mean_f1`` is the mean of the per-class F1 over the scored
classes (default: the whole GT vocabulary).

Class-agnostic predictions (no ``class`` column, empty class cells, or only the detector's
class-agnostic name ``"nucleus"``, as ``denuc detect`` writes; see
:func:`~denuc.evaluate.predictions.unclassify_agnostic`) are scored for detection; the
report is flagged ``class_agnostic`` and its table shows the per-class F1 as not
applicable (the counts stay: no class predictions, F1 0).

Radius: exactly one of ``radius_px`` (used as is for every image), ``radius_um`` (divided
by each image's µm/px) or neither (the protocol's default physical radius, converted
through each image's µm/px). Converted radii are rounded to 1e-9 px.

Predictions outside their image (when the GT knows the image size) are kept and count as
false positives, with one warning naming the files and counts; so are predictions that
repeat the exact (x, y) of another in the same file (one warning likewise); coordinates beyond
±:data:`~denuc.evaluate.matching.MAX_COORD` px and NaN scores are refused, naming the file.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from denuc.core.mpp import check_mpp
from denuc.core.result import NO_CLASS, Nuclei
from denuc.data.base import PointDataset, open_dataset
from denuc.errors import InputError
from denuc.evaluate.matching import MAX_COORD, PROTOCOLS, Protocol, round_radius
from denuc.evaluate.predictions import (
    MISSING_POLICIES,
    read_predictions,
    unclassify_agnostic,
)


@dataclass
class Counts:
    """Matching counts of one class (or of detection), and the scores derived from them."""

    tp: int = 0
    n_pred: int = 0
    n_gt: int = 0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tp + other.tp, self.n_pred + other.n_pred, self.n_gt + other.n_gt)

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_gt - self.tp

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else 0.0

    @property
    def recall(self) -> float:
        return self.tp / self.n_gt if self.n_gt else 0.0

    @property
    def f1(self) -> float:
        return 2.0 * self.tp / (self.n_pred + self.n_gt) if self.tp else 0.0

    @property
    def empty(self) -> bool:
        """True when there is neither a prediction nor a GT point (F1 is then defined as 0)."""
        return self.n_pred == 0 and self.n_gt == 0

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"precision": self.precision, "recall": self.recall, "f1": self.f1,
                             "tp": self.tp, "n_pred": self.n_pred, "n_gt": self.n_gt}
        if self.empty:
            d["empty"] = True
        return d


@dataclass
class ImageCounts:
    """Counts of one image: detection, per class, and the radius used (px)."""

    detection: Counts
    classes: dict[str, Counts]
    radius_px: float

    def to_dict(self) -> dict[str, Any]:
        return {"detection": self.detection.to_dict(),
                "classes": {k: v.to_dict() for k, v in self.classes.items()},
                "radius_px": self.radius_px}


@dataclass
class EvalReport:
    """Result of :func:`evaluate`: pooled counts and F1 values, and a per-image breakdown.

    ``radius_px`` is the radius in pixels when every image used the same one, else None
    (then ``radius_px_range`` holds the min and max). ``radius_um`` is the radius in µm
    when known. ``class_agnostic`` is True when there are predictions and none carries a
    class: per-class F1 (0 by the counts) does not apply, and the table says so.
    """

    protocol: str
    detection: Counts
    classes: dict[str, Counts]
    per_image: dict[str, ImageCounts]
    radius_px: float | None
    radius_um: float | None = None
    split: str | None = None
    radius_px_range: tuple[float, float] | None = None
    class_agnostic: bool = False

    @property
    def mean_f1(self) -> float:
        """Mean of the per-class F1 over the scored classes (0 when there are none)."""
        if not self.classes:
            return 0.0
        return float(np.mean([c.f1 for c in self.classes.values()]))

    @property
    def n_images(self) -> int:
        return len(self.per_image)

    def to_dict(self, per_image: bool = True) -> dict[str, Any]:
        """JSON-ready dict: ``detection``, ``classes``, ``mean_f1``, ``protocol``, ``radius_px``, ..."""
        d: dict[str, Any] = {
            "detection": self.detection.to_dict(),
            "classes": {k: v.to_dict() for k, v in self.classes.items()},
            "mean_f1": self.mean_f1,
            "protocol": self.protocol,
            "radius_px": self.radius_px,
            "radius_um": self.radius_um,
            "split": self.split,
            "n_images": self.n_images,
            "class_agnostic": self.class_agnostic,
        }
        if self.radius_px_range is not None:
            d["radius_px_range"] = list(self.radius_px_range)
        if per_image:
            d["per_image"] = {k: v.to_dict() for k, v in self.per_image.items()}
        return d

    def table(self) -> str:
        """A readable text table of precision, recall, F1 and counts."""
        if self.radius_px is not None:
            rad = f"{self.radius_px:g} px"
        elif self.radius_px_range is not None:
            rad = f"{self.radius_px_range[0]:g}-{self.radius_px_range[1]:g} px"
        else:
            rad = "? px"
        if self.radius_um is not None:
            rad += f" ({self.radius_um:g} µm)"
        head = (f"protocol {self.protocol}, radius {rad}, "
                f"split {self.split or '-'}, {self.n_images} image(s)")
        rows = [("detection", self.detection), *self.classes.items()]
        w = max([len("mean class F1"), *(len(n) for n, _ in rows)])
        lines = [head, f"{'':{w}}  {'prec':>6} {'recall':>6} {'F1':>6} {'TP':>7} {'#pred':>7} {'#GT':>7}"]
        for i, (name, c) in enumerate(rows):
            if self.class_agnostic and i > 0:
                lines.append(f"{name:{w}}  {'n/a':>6} {'n/a':>6} {'n/a':>6} {'-':>7} {'-':>7} {c.n_gt:7d}")
                continue
            note = "  (no pred, no GT)" if c.empty else ""
            lines.append(f"{name:{w}}  {c.precision:6.3f} {c.recall:6.3f} {c.f1:6.3f} "
                         f"{c.tp:7d} {c.n_pred:7d} {c.n_gt:7d}{note}")
        if self.class_agnostic:
            lines.append(f"{'mean class F1':{w}}  {'':6} {'':6} {'n/a':>6}  "
                         "(class-agnostic predictions: detection only)")
        else:
            lines.append(f"{'mean class F1':{w}}  {'':6} {'':6} {self.mean_f1:6.3f}")
        return "\n".join(lines)


# ------------------------------------------------------------------ inputs
def _load_gt(gt: str | os.PathLike[str] | PointDataset | Mapping[str, Nuclei],
             split: str | None) -> tuple[dict[str, Nuclei], tuple[str, ...]]:
    """GT points per stem (with mpp set where known) and the class vocabulary."""
    if isinstance(gt, (str, os.PathLike)):
        gt = open_dataset(Path(gt))
    if isinstance(gt, PointDataset):
        stems = gt.stems(split)
        if not stems:
            raise InputError(f"{gt.root}: split {split!r} has no images")
        out = {}
        for s in stems:
            pts = gt.points(s)
            pts.mpp = gt.mpp_of(s)
            out[s] = pts
        return out, tuple(gt.classes)
    if isinstance(gt, Mapping):
        out = dict(gt)
        for s, v in out.items():
            if not isinstance(v, Nuclei):
                raise InputError(f"ground truth of {s!r} must be a Nuclei; got {type(v).__name__}")
        vocabs = {v.class_names for v in out.values() if v.class_names}
        if len(vocabs) > 1:
            raise InputError(f"ground-truth images use different class vocabularies: {sorted(vocabs)}")
        return out, (vocabs.pop() if vocabs else ())
    raise InputError(f"gt must be a dataset folder, a PointDataset or a mapping stem -> Nuclei; got {type(gt).__name__}")


def _load_pred(pred: str | os.PathLike[str] | Mapping[str, Nuclei], gt: Mapping[str, Nuclei],
               class_names: tuple[str, ...], missing: str, pred_format: str) -> dict[str, Nuclei]:
    """Predictions per GT stem, classes re-expressed in the GT vocabulary, at the GT's mpp."""
    if missing not in MISSING_POLICIES:
        raise InputError(f"missing must be one of {MISSING_POLICIES}; got {missing!r}")
    if isinstance(pred, (str, os.PathLike)):
        raw = read_predictions(pred, list(gt), class_names, pred_format, missing)
    elif isinstance(pred, Mapping):
        raw = {}
        for s in gt:
            if s in pred:
                raw[s] = pred[s]
            elif missing == "error":
                raise InputError(f"no predictions for GT image {s!r} (pass missing='empty' to count it as none)")
            else:
                raw[s] = Nuclei.empty(class_names, name=s)
    else:
        raise InputError(f"pred must be a folder or a mapping stem -> Nuclei; got {type(pred).__name__}")
    out = {}
    outside: list[tuple[str, int, tuple[float, float]]] = []
    repeated: list[tuple[str, int, tuple[float, float]]] = []
    for s, p in raw.items():
        if not isinstance(p, Nuclei):
            raise InputError(f"predictions of {s!r} must be a Nuclei; got {type(p).__name__}")
        src = str(p.meta.get("source") or f"predictions of {s!r}")
        p = unclassify_agnostic(p, class_names, src)
        far = ~(np.abs(p.xy) <= MAX_COORD).all(axis=1)
        if far.any():
            x, y = (float(v) for v in p.xy[far][0])
            raise InputError(f"{src}: {int(far.sum())} prediction(s) with absurd coordinates, e.g. (x, y) = "
                             f"({x:g}, {y:g}); coordinates are pixels of the image, within ±{MAX_COORD:g}")
        if p.scores is not None and np.isnan(p.scores).any():
            raise InputError(f"{src}: prediction scores contain NaN ({int(np.isnan(p.scores).sum())} of {len(p)})")
        if p.class_ids is not None and p.class_names != class_names:
            unknown = [c for c in p.class_names if c not in class_names]
            if unknown:
                raise InputError(f"predictions of {s!r} use class name(s) {unknown} that are not in the "
                                 f"ground-truth vocabulary {list(class_names)}")
            p = p.with_classes(class_names)
        gmpp = gt[s].mpp
        if p.mpp is not None and gmpp is not None and p.mpp != gmpp:
            p = p.rescale(gmpp)  # exact: same image, other pixel size
        n_dup, first = _duplicates(p.xy)
        if n_dup:
            repeated.append((src, n_dup, first))
        size = gt[s].image_size
        if size is not None and len(p):
            bad = ~p.inside(*size)
            if bad.any():
                x, y = (float(v) for v in p.xy[bad][0])
                outside.append((src, int(bad.sum()), (x, y)))
        out[s] = p
    if repeated:
        warnings.warn(f"{_listed(repeated)} repeat the (x, y) of another prediction of their file and count as "
                      f"separate predictions (at most one can match): {_shown(repeated)}", stacklevel=3)
    if outside:
        warnings.warn(f"{_listed(outside)} lie outside their image and count as false positives: {_shown(outside)}",
                      stacklevel=3)
    return out


def _duplicates(xy: np.ndarray) -> tuple[int, tuple[float, float]]:
    """How many of the ``(N, 2)`` points repeat an earlier point exactly, and the first repeated one."""
    if len(xy) < 2:
        return 0, (0.0, 0.0)
    uniq, first_index = np.unique(xy, axis=0, return_index=True)
    n = len(xy) - len(uniq)
    if not n:
        return 0, (0.0, 0.0)
    seen = np.zeros(len(xy), dtype=bool)
    seen[first_index] = True
    x, y = (float(v) for v in xy[~seen][0])
    return n, (x, y)


def _listed(found: Sequence[tuple[str, int, tuple[float, float]]]) -> str:
    return f"{sum(n for _, n, _ in found)} prediction(s) in {len(found)} file(s)"


def _shown(found: Sequence[tuple[str, int, tuple[float, float]]]) -> str:
    """``file: count (e.g. (x, y) = ...)`` for the first three files, and how many more."""
    shown = "; ".join(f"{src}: {n} (e.g. (x, y) = ({x:g}, {y:g}))" for src, n, (x, y) in found[:3])
    return shown + (f"; and {len(found) - 3} more file(s)" if len(found) > 3 else "")


def _radii(gt: Mapping[str, Nuclei], proto: Protocol, radius_px: float | None,
           radius_um: float | None) -> dict[str, float]:
    if radius_px is not None and radius_um is not None:
        raise InputError("give at most one of radius_px and radius_um")
    if radius_px is not None:
        r = float(radius_px)
        if not (np.isfinite(r) and r > 0):
            raise InputError(f"radius_px must be a positive number of pixels; got {r}")
        return {s: r for s in gt}
    if radius_um is not None:
        r = float(radius_um)
        if not (np.isfinite(r) and r > 0):
            raise InputError(f"radius_um must be a positive number of µm; got {r}")
    out = {}
    for s, pts in gt.items():
        hint = "; or pass radius_px" if radius_um is None else ""
        mpp = check_mpp(pts.mpp, f"ground truth of {s!r}{hint}")
        out[s] = round_radius(radius_um / mpp) if radius_um is not None else proto.default_radius.to_px(mpp)
    return out


def _count(proto: Protocol, pred: Nuclei, gt: Nuclei, r: float) -> int:
    pi, _ = proto.match(pred.xy, pred.scores, gt.xy, r)
    return len(pi)


# ------------------------------------------------------------------ main
def evaluate(
    gt: str | os.PathLike[str] | PointDataset | Mapping[str, Nuclei],
    pred: str | os.PathLike[str] | Mapping[str, Nuclei],
    *,
    protocol: str = "denuc",
    radius_px: float | None = None,
    radius_um: float | None = None,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    missing: str = "error",
    pred_format: str = "csv",
) -> EvalReport:
    """Score predicted points against ground truth with distance-based matching.

    Args:
        gt: a dataset folder (opened with :func:`open_dataset`), a :class:`PointDataset`,
            or a mapping image stem -> :class:`Nuclei` (mpp set on each if the radius is
            given in µm or taken from the protocol default).
        pred: a folder with one prediction file per GT image (``<stem>.csv``, header
            ``x,y,class[,score]``; see ``pred_format``), or a mapping stem -> Nuclei.
            Coordinates are (x, y) pixels of the GT image; a Nuclei whose ``mpp`` differs
            from the GT's is rescaled exactly. Predictions of stems not in the GT are ignored.
            Predictions whose only class is ``"nucleus"`` (a class-agnostic detector's, e.g.
            ``denuc detect`` output) count as unclassified when the GT has no such class.
        protocol: a name in :data:`~denuc.evaluate.matching.PROTOCOLS`.
        radius_px, radius_um: the matching radius (at most one); default = the protocol's.
        split: split of a dataset to score (None = all images); recorded in the report.
        classes: classes to score for the per-class F1 and ``mean_f1`` (default: all GT classes;
            an empty sequence scores detection only, ``mean_f1`` is then 0).
        missing: ``"error"`` (a GT image without prediction file raises, naming it) or
            ``"empty"`` (it counts as zero predictions).
        pred_format: layout of a prediction folder, see
            :data:`~denuc.evaluate.predictions.PRED_FORMATS` (``csv``, ``brca-m2c``).

    Returns:
        an :class:`EvalReport` (pooled micro counts, F1s, per-image breakdown).
    """
    proto = PROTOCOLS.get(protocol)
    gt_map, vocab = _load_gt(gt, split)
    if not gt_map:
        raise InputError("the ground truth has no images")
    if classes is None:
        scored = vocab
    else:
        scored = tuple(classes)
        unknown = [c for c in scored if c not in vocab]
        if unknown:
            raise InputError(f"classes {unknown} are not in the ground-truth vocabulary {list(vocab)}")
    pred_map = _load_pred(pred, gt_map, vocab, missing, pred_format)
    radii = _radii(gt_map, proto, radius_px, radius_um)

    per_image: dict[str, ImageCounts] = {}
    for s, g in gt_map.items():
        p, r = pred_map[s], radii[s]
        det = Counts(_count(proto, p, g, r), len(p), len(g))
        per_class: dict[str, Counts] = {}
        for name in scored:
            k = vocab.index(name)
            gm = g.class_ids == k if g.class_ids is not None else np.zeros(len(g), bool)
            pm = p.class_ids == k if p.class_ids is not None else np.zeros(len(p), bool)
            gs, ps = g.select(gm), p.select(pm)
            per_class[name] = Counts(_count(proto, ps, gs, r), len(ps), len(gs))
        per_image[s] = ImageCounts(det, per_class, r)

    detection = sum((c.detection for c in per_image.values()), Counts())
    agnostic = detection.n_pred > 0 and all(p.class_ids is None or bool((p.class_ids == NO_CLASS).all())
                                            for p in pred_map.values())
    pooled = {name: sum((c.classes[name] for c in per_image.values()), Counts()) for name in scored}
    empty = [n for n, c in pooled.items() if c.empty]
    if empty:
        warnings.warn(f"class(es) {empty} have neither predictions nor ground truth; their F1 counts as 0 "
                      "in the mean", stacklevel=2)

    values = sorted(set(radii.values()))
    uniform = values[0] if len(values) == 1 else None
    if radius_um is not None:
        r_um: float | None = float(radius_um)
    elif radius_px is None:
        r_um = proto.default_radius.um
    else:
        mpps = {g.mpp for g in gt_map.values()}
        r_um = round(float(radius_px) * mpps.pop(), 9) if len(mpps) == 1 and None not in mpps else None
    return EvalReport(
        protocol=protocol, detection=detection, classes=pooled, per_image=per_image,
        radius_px=uniform, radius_um=r_um, split=split,
        radius_px_range=None if uniform is not None else (values[0], values[-1]), class_agnostic=agnostic,
    )
