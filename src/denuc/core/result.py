"""The one result type that flows through DeNuC: :class:`Nuclei`.

Frame and units
---------------
* ``xy`` is an ``(N, 2)`` float64 array of **(x, y)** = (column, row) coordinates in
  **level-0 pixels of the image they belong to**, origin at the top-left corner of the
  top-left pixel. The centre of pixel ``(col=i, row=j)`` is ``(i + 0.5, j + 0.5)``.
  Integer-valued labels such as BRCA-M2C's are taken as given (no half-pixel shift is
  invented); the frame only matters when rescaling, see :meth:`Nuclei.rescale`.
* ``mpp`` is the image's resolution in **µm per pixel** (never "20x/40x"); ``None`` when
  unknown.
* ``class_ids`` index into ``class_names``; ``-1`` means "no class" (e.g. a detection
  that has not been classified).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from denuc.core.files import atomic_target, atomic_write_text
from denuc.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

NO_CLASS = -1


def _as_xy(xy: Any) -> np.ndarray:
    arr = np.asarray(xy, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputError(f"points must be an (N, 2) array of (x, y); got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise InputError("points contain NaN or infinite coordinates")
    return arr


def _score_column(df: pd.DataFrame, column: str, source: str) -> np.ndarray | None:
    """Column ``column`` of ``df`` as float32 scores (None when absent); :class:`InputError`
    naming ``source`` for text or empty cells."""
    if column not in df.columns:
        return None
    try:
        values = df[column].to_numpy(np.float32)
    except (TypeError, ValueError) as e:
        raise InputError(f"{source}: {column} must be numbers ({e})") from None
    if np.isnan(values).any():
        raise InputError(f"{source}: {column} contains NaN or empty cells "
                         f"({int(np.isnan(values).sum())} of {len(values)}); drop the column or fill it")
    return values


@dataclass
class Nuclei:
    """Nucleus points of one image, with optional scores, classes and class probabilities.

    Attributes:
        xy: ``(N, 2)`` float64, (x, y) in level-0 pixels of the image.
        scores: ``(N,)`` float32 detection/classification confidence in [0, 1], or None.
        class_ids: ``(N,)`` int64 indices into ``class_names`` (``-1`` = no class), or None.
        class_names: the class vocabulary, e.g. ``("lymphocyte", "tumor", "stromal")``.
        probs: ``(N, len(class_names))`` float32 class probabilities, or None.
        mpp: µm per pixel of the image the coordinates refer to, or None if unknown.
        image_size: ``(height, width)`` in pixels of that image, or None.
        name: an identifier such as the image stem.
        det_scores: ``(N,)`` float32 detector confidence (before classification), or None;
            ``scores`` of a classified result is ``det_scores x`` the chosen class's probability.
        roi: ``(N,)`` object array of region-of-interest names (``""`` = none), or None.
        features: ``(N, C)`` float point features the head classified (the encoder's features
            sampled at each point, before the head's standardisation), or None (the default:
            kept only when asked for, e.g. by the ``h5ad`` output).
    """

    xy: np.ndarray
    scores: np.ndarray | None = None
    class_ids: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    probs: np.ndarray | None = None
    mpp: float | None = None
    image_size: tuple[int, int] | None = None
    name: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    det_scores: np.ndarray | None = None
    roi: np.ndarray | None = None
    features: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.xy = _as_xy(self.xy)
        n = len(self.xy)
        if self.det_scores is not None:
            self.det_scores = np.asarray(self.det_scores, dtype=np.float32).reshape(-1)
            if len(self.det_scores) != n:
                raise InputError(f"{len(self.det_scores)} detection scores for {n} points")
        if self.roi is not None:
            self.roi = np.asarray(self.roi, dtype=object).reshape(-1)
            if len(self.roi) != n:
                raise InputError(f"{len(self.roi)} ROI names for {n} points")
        if self.features is not None:
            self.features = np.asarray(self.features)
            f = self.features
            if f.ndim != 2 or len(f) != n or not np.issubdtype(f.dtype, np.floating):
                raise InputError(f"features must be an ({n}, C) float array; got {self.features.dtype} "
                                 f"{self.features.shape}")
        self.class_names = tuple(str(c) for c in self.class_names)
        if self.scores is not None:
            self.scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
            if len(self.scores) != n:
                raise InputError(f"{len(self.scores)} scores for {n} points")
        if self.class_ids is not None:
            self.class_ids = np.asarray(self.class_ids, dtype=np.int64).reshape(-1)
            if len(self.class_ids) != n:
                raise InputError(f"{len(self.class_ids)} class ids for {n} points")
            if n and (self.class_ids.max() >= len(self.class_names) or self.class_ids.min() < NO_CLASS):
                raise InputError(
                    f"class ids must lie in [-1, {len(self.class_names) - 1}] for classes {self.class_names}"
                )
        if self.probs is not None:
            self.probs = np.asarray(self.probs, dtype=np.float32)
            if n == 0 and self.probs.size == 0:
                self.probs = np.zeros((n, len(self.class_names)), dtype=np.float32)
            if self.probs.shape != (n, len(self.class_names)):
                raise InputError(f"probs must be ({n}, {len(self.class_names)}); got {self.probs.shape}")
        if self.mpp is not None:
            self.mpp = float(self.mpp)
            if not (np.isfinite(self.mpp) and self.mpp > 0):
                raise InputError(f"mpp must be a positive number of µm per pixel; got {self.mpp}")
        if self.image_size is not None:
            h, w = self.image_size
            self.image_size = (int(h), int(w))

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.xy)

    @property
    def x(self) -> np.ndarray:
        return self.xy[:, 0]

    @property
    def y(self) -> np.ndarray:
        return self.xy[:, 1]

    @property
    def classes(self) -> list[str]:
        """Class name of each point (``""`` where there is none)."""
        if self.class_ids is None:
            return [""] * len(self)
        return [self.class_names[i] if i >= 0 else "" for i in self.class_ids]

    @classmethod
    def empty(cls, class_names: Sequence[str] = (), **kw: Any) -> Nuclei:
        return cls(np.zeros((0, 2)), class_names=tuple(class_names), **kw)

    def select(self, index: np.ndarray | slice | Sequence[int]) -> Nuclei:
        """A new :class:`Nuclei` with the points at ``index`` (boolean mask or integer index)."""

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[index]

        return Nuclei(
            self.xy[index],
            pick(self.scores),
            pick(self.class_ids),
            self.class_names,
            pick(self.probs),
            self.mpp,
            self.image_size,
            self.name,
            dict(self.meta),
            pick(self.det_scores),
            pick(self.roi),
            pick(self.features),
        )

    def with_classes(self, class_names: Sequence[str]) -> Nuclei:
        """Re-express the class ids in another vocabulary (names must exist in it)."""
        class_names = tuple(class_names)
        if self.class_ids is None:
            return Nuclei(self.xy, self.scores, None, class_names, None, self.mpp, self.image_size, self.name,
                          det_scores=self.det_scores, roi=self.roi)
        lut = np.full(len(self.class_names) + 1, NO_CLASS, dtype=np.int64)
        for i, c in enumerate(self.class_names):
            if c not in class_names:
                raise InputError(f"class {c!r} is not one of {class_names}")
            lut[i] = class_names.index(c)
        ids = lut[self.class_ids]  # -1 maps to the last entry, which is NO_CLASS
        return Nuclei(self.xy, self.scores, ids, class_names, None, self.mpp, self.image_size, self.name,
                      det_scores=self.det_scores, roi=self.roi)

    @staticmethod
    def concat(parts: Sequence[Nuclei]) -> Nuclei:
        """Concatenate point sets of the same image (same classes and mpp)."""
        if not parts:
            return Nuclei.empty()
        first = parts[0]
        for p in parts[1:]:
            if p.class_names != first.class_names:
                raise InputError("cannot concatenate Nuclei with different class names")
            if p.mpp != first.mpp:
                raise InputError("cannot concatenate Nuclei at different mpp")

        def cat(attr: str) -> np.ndarray | None:
            # an empty part without the field (e.g. Nuclei.empty()) is compatible with any
            vals = [getattr(p, attr) for p in parts if len(p) or getattr(p, attr) is not None]
            if all(v is None for v in vals):
                return None
            if any(v is None for v in vals):
                raise InputError(f"cannot concatenate Nuclei where only some have {attr}")
            return np.concatenate(vals)

        return Nuclei(
            np.concatenate([p.xy for p in parts]),
            cat("scores"),
            cat("class_ids"),
            first.class_names,
            cat("probs"),
            first.mpp,
            first.image_size,
            first.name,
            det_scores=cat("det_scores"),
            roi=cat("roi"),
            features=cat("features"),
        )

    # -------------------------------------------------------------- geometry
    def rescale(self, mpp: float) -> Nuclei:
        """The same nuclei expressed in pixels of the same image resampled to ``mpp``.

        Pixel-edge frame: a point at physical position ``p`` µm from the image's top-left
        edge sits at ``p / mpp`` pixels, so coordinates scale by exactly ``self.mpp / mpp``.
        Round trips are exact up to float rounding (about 1e-13 px). ``image_size`` becomes the
        size :func:`denuc.data.resample.resample` gives the resampled image
        (:func:`~denuc.data.resample.resampled_size`).
        """
        if self.mpp is None:
            from denuc.errors import ResolutionError

            raise ResolutionError("cannot rescale points whose mpp is unknown; set mpp first")
        import math

        from denuc.errors import ResolutionError

        try:
            target = float(mpp)
        except (TypeError, ValueError):
            raise ResolutionError(f"rescale needs a target mpp in µm per pixel; got {mpp!r}") from None
        if isinstance(mpp, bool) or not math.isfinite(target) or target <= 0:
            raise ResolutionError(f"rescale needs a positive, finite target mpp in µm per pixel; got {mpp!r}")
        f = self.mpp / target
        size = None
        if self.image_size is not None:
            from denuc.data.resample import resampled_size

            size = resampled_size(self.image_size, f)
        return Nuclei(self.xy * f, self.scores, self.class_ids, self.class_names, self.probs, target, size,
                      self.name, dict(self.meta), self.det_scores, self.roi, self.features)

    def shift(self, dx: float, dy: float) -> Nuclei:
        """Translate every point by ``(dx, dy)`` pixels (e.g. window -> image frame)."""
        out = self.select(slice(None))
        out.xy = self.xy + np.array([dx, dy], dtype=np.float64)
        return out

    def inside(self, height: int, width: int) -> np.ndarray:
        """Boolean ``(N,)`` mask of points with ``0 <= x < width`` and ``0 <= y < height``."""
        return (self.xy[:, 0] >= 0) & (self.xy[:, 0] < width) & (self.xy[:, 1] >= 0) & (self.xy[:, 1] < height)

    # ------------------------------------------------------------ conversion
    def numpy(self) -> dict[str, np.ndarray]:
        """Plain arrays: ``xy``, and ``scores``/``class_ids``/``probs``/``det_scores``/``features`` where present
        (``roi`` as a unicode array)."""
        out: dict[str, np.ndarray] = {"xy": self.xy}
        if self.roi is not None:
            out["roi"] = self.roi.astype(str) if len(self.roi) else np.zeros(0, dtype="<U1")
        for k in ("scores", "class_ids", "probs", "det_scores", "features"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    def to_pandas(self) -> pd.DataFrame:
        """Columns ``x, y[, class][, score][, det_score][, prob_<class>...][, roi]`` (``class`` holds
        names; ``det_score`` is the detector's own confidence)."""
        import pandas as pd

        cols: dict[str, Any] = {"x": self.xy[:, 0], "y": self.xy[:, 1]}
        if self.class_ids is not None:
            cols["class"] = self.classes
        if self.scores is not None:
            cols["score"] = self.scores
        if self.det_scores is not None:
            cols["det_score"] = self.det_scores
        if self.probs is not None:
            for j, c in enumerate(self.class_names):
                cols[f"prob_{c}"] = self.probs[:, j]
        if self.roi is not None:
            cols["roi"] = self.roi
        return pd.DataFrame(cols)

    @classmethod
    def from_pandas(
        cls,
        df: pd.DataFrame,
        class_names: Sequence[str] | None = None,
        mpp: float | None = None,
        name: str = "",
        source: str = "table",
    ) -> Nuclei:
        """Build from columns ``x, y[, class][, score][, prob_<class>...]``.

        Args:
            class_names: the vocabulary. If given, every ``class`` value must be in it
                (unknown names raise :class:`InputError` naming ``source``). If None, the
                sorted distinct names present are used.
        """
        missing = {"x", "y"} - set(df.columns)
        if missing:
            raise InputError(f"{source}: missing column(s) {sorted(missing)}; need a header x,y[,class][,score]")
        try:
            xy = np.stack([df["x"].to_numpy(np.float64), df["y"].to_numpy(np.float64)], axis=1)
        except (TypeError, ValueError) as e:
            raise InputError(f"{source}: x/y must be numbers ({e})") from None
        if len(xy) and not np.all(np.isfinite(xy)):
            raise InputError(f"{source}: x/y contain NaN or empty cells")
        scores = _score_column(df, "score", source)
        det_scores = _score_column(df, "det_score", source)
        roi = df["roi"].astype(object).fillna("").astype(str).to_numpy(object) if "roi" in df.columns else None
        ids = None
        names = tuple(class_names) if class_names is not None else ()
        # without a vocabulary, prob_<class> columns (as written by to_csv) give it, in their order
        from_probs = tuple(str(c)[5:] for c in df.columns if str(c).startswith("prob_") and len(str(c)) > 5)
        if class_names is None:
            names = from_probs
        if "class" in df.columns:
            # empty cells (read as NaN) mean "no class"
            labels = df["class"].astype(object).fillna("").astype(str).str.strip().tolist()
            if class_names is None and not from_probs:
                names = tuple(sorted(set(labels) - {""}))
            index = {c: i for i, c in enumerate(names)}
            unknown = sorted({c for c in labels if c not in index and c != ""})
            if unknown:
                raise InputError(f"{source}: unknown class name(s) {unknown}; known: {list(names)}")
            ids = np.array([index.get(c, NO_CLASS) for c in labels], dtype=np.int64)
        probs = None
        pcols = [f"prob_{c}" for c in names]
        if names and all(c in df.columns for c in pcols):
            probs = df[pcols].to_numpy(np.float32)
        return cls(xy, scores, ids, names, probs, mpp, None, name, det_scores=det_scores, roi=roi)

    # --------------------------------------------------------- persistence
    def to_csv(self, path: str | os.PathLike[str]) -> Path:
        """Write ``x,y[,x_um,y_um],class[,score][,prob_*][,roi]`` CSV atomically (temp file +
        rename), the columns ``denuc predict`` writes: ``x_um, y_um`` = ``x * mpp, y * mpp``
        when ``mpp`` is known.

        Numbers are written losslessly (shortest repr that reads back to the same float64
        coordinates / float32 scores), so CSV round trips are exact (``mpp`` included, read back
        from ``x_um / x``).
        """
        df = self.to_pandas()
        if self.mpp is not None and "x_um" not in df.columns:
            df.insert(2, "x_um", self.xy[:, 0] * float(self.mpp))
            df.insert(3, "y_um", self.xy[:, 1] * float(self.mpp))
        if "class" not in df.columns:
            df.insert(4 if "x_um" in df.columns else 2, "class", [""] * len(df))
        return atomic_write_text(Path(path), df.to_csv(index=False))

    @classmethod
    def read_csv(
        cls, path: str | os.PathLike[str], class_names: Sequence[str] | None = None, mpp: float | None = None
    ) -> Nuclei:
        """Read a ``x,y,class[,score]`` CSV. An empty file or header-only file means zero nuclei."""
        import pandas as pd

        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: no such point file")
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{p}: cannot read ({e})") from None
        if not text.strip():
            return cls.empty(class_names or (), mpp=mpp, name=p.stem)
        try:
            # pandas >= 3 parses floats exactly by default (and deprecates the option); 2.x needs round_trip
            exact = {} if int(pd.__version__.split(".")[0]) >= 3 else {"float_precision": "round_trip"}
            df = pd.read_csv(p, keep_default_na=False, na_values=[""], dtype={"class": str, "roi": str}, **exact)
        except Exception as e:  # pandas raises several parser error types
            raise InputError(f"{p}: not a valid CSV ({e})") from None
        df.columns = [str(c).strip() for c in df.columns]
        if mpp is None:
            mpp = _mpp_from_um(df, p)
        return cls.from_pandas(df, class_names, mpp=mpp, name=p.stem, source=str(p))

    def save(self, path: str | os.PathLike[str], extra: dict[str, np.ndarray] | None = None) -> Path:
        """Save everything losslessly as ``.npz`` (atomic). ``extra``: more named arrays to store
        in the same archive (:meth:`load` ignores them; names must not clash with the fields')."""
        p = Path(path)
        arrays = self.numpy()
        for k, v in (extra or {}).items():
            if k in arrays or k == "header":
                raise InputError(f"{p}: extra array {k!r} clashes with a field of the saved nuclei")
            arrays[k] = np.asarray(v)
        header = {
            "class_names": list(self.class_names),
            "mpp": self.mpp,
            "image_size": list(self.image_size) if self.image_size else None,
            "name": self.name,
        }
        with atomic_target(p, suffix=".npz") as tmp:
            np.savez(tmp, header=np.array(json.dumps(header)), **arrays)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Nuclei:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            get = lambda k: z[k] if k in z.files else None  # noqa: E731
            size = header.get("image_size")
            roi = get("roi")
            return cls(get("xy"), get("scores"), get("class_ids"), tuple(header["class_names"]), get("probs"),
                       header["mpp"], tuple(size) if size else None, header.get("name", ""),
                       det_scores=get("det_scores"), roi=None if roi is None else roi.astype(object),
                       features=get("features"))

    def __repr__(self) -> str:
        return (f"Nuclei(n={len(self)}, classes={list(self.class_names)}, mpp={self.mpp}, "
                f"scores={'yes' if self.scores is not None else 'no'}, name={self.name!r})")


def _mpp_from_um(df: Any, p: Path) -> float | None:
    """The µm per pixel of a CSV with ``x, y, x_um, y_um`` columns (what ``denuc predict`` and
    :meth:`Nuclei.to_csv` write): ``x_um / x`` of the point farthest from the origin, checked
    against every row (None without those columns, rows, a nonzero coordinate, or when the
    rows disagree)."""
    cols = ("x", "y", "x_um", "y_um")
    if not all(c in df.columns for c in cols) or not len(df):
        return None
    try:
        a = df[list(cols)].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        return None
    k = int(np.argmax(np.abs(a[:, :2]).max(axis=1)))
    j = 0 if abs(a[k, 0]) >= abs(a[k, 1]) else 1
    if not np.isfinite(a).all() or a[k, j] == 0:
        return None
    mpp = float(f"{a[k, 2 + j] / a[k, j]:.10g}")  # the recorded value, not its division's last bit
    if not mpp > 0 or not np.allclose(a[:, :2] * mpp, a[:, 2:], rtol=1e-9, atol=1e-9 * max(1.0, mpp)):
        return None  # µm columns of another origin or scale: no mpp from them
    return mpp
