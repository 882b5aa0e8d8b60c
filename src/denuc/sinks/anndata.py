"""``<stem>.h5ad``: the nuclei of one input as an AnnData file (cells as data for scanpy/squidpy).

Layout (AnnData's on-disk HDF5 format, written with h5py alone, so ``anndata`` is not needed to
write it; ``anndata.read_h5ad`` reads it):

* ``obs`` (one row per nucleus, in the order of the CSV's rows; index ``"0", "1", ...``):
  ``class`` (categorical over the run's class names), ``score``, ``det_score``,
  ``prob_<class>`` (float32, when the chunks carry them), ``roi`` (categorical, when the input
  has regions of interest; ``""`` = none), ``tile`` (int32, when the run streams tiles: a
  ``predict``/``detect`` run, not ``embed``).
* ``tile``: the index of the tile (streaming window) that produced the nucleus, in the input's
  tile plan (:class:`denuc.tiles.plan.TilePlan`): tiles are cells of the detector's working
  frame numbered row-major, ``tile = ky * nx + kx`` with ``(nx, ny) = uns['denuc']['tiles']
  ['grid']``; every nucleus lies in the **core** of its tile, the part of the tile that owns its
  points (each point of the frame has exactly one owner), whose level-0 box (x0, y0, x1, y1),
  half-open, is row ``tile`` of ``uns['denuc']['tiles']['core_level0']`` (``(nx * ny, 4)``
  float64, every tile of the plan, also those not run for lack of tissue). A tile reads one
  detector window of context beyond its core on each side; that context is not its box here.
  The ids depend on ``--tile-px`` (the core side), not on ``--chunk-tiles`` or a resume.
* ``obsm['spatial']``: ``(N, 2)`` float64 (x, y) in **level-0 pixels** of the input (pixel-edge
  frame, as the CSV's ``x, y``); multiply by ``uns['denuc']['mpp']`` for µm.
* ``obsm['X_denuc']``: ``(N, C)`` the point features the head classified (the encoder's features
  sampled at each nucleus, before the head's standardisation), float16 by default
  (``embeddings="float32"`` keeps them exactly; ``"none"`` leaves them out).
* ``var`` is empty and ``X`` absent: the features are an embedding, not measured variables.
* ``uns['denuc']``: ``encoder``, ``taps``, ``working_mpp`` (µm/px the features were sampled
  at), ``encoder_weights_sha256``, ``head_sha256``, ``classes``, ``mpp`` (level-0 µm/px),
  ``size`` (level-0 width, height), ``embeddings`` (dtype or ``none``), ``summary`` (the run
  summary as JSON text, as ``<stem>.summary.json`` less its counts), ``fingerprint``
  (sha256 of the models description) and, with the ``tile`` column, ``tiles`` (``grid``,
  ``core_level0``).

Memory: each chunk is appended to resizable (chunked) HDF5 datasets as it arrives, so the sink
holds one chunk, never the slide's features (1e5 nuclei x 1536 float16 channels would be
300 MB). The file is written to a hidden temporary path and moved into place on close.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from denuc.core.result import Nuclei
from denuc.errors import InputError
from denuc.sinks.base import TILE_KEY, OutputInfo
from denuc.sinks.tabular import TableSink

#: ``--embeddings`` choices: the stored dtype of ``obsm['X_denuc']``, or ``none`` to omit it.
EMBEDDING_DTYPES = ("float16", "float32", "none")
#: rows per HDF5 chunk of the growing datasets
ROWS_PER_CHUNK = 4096


def _require_h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise InputError("--format h5ad needs h5py: pip install 'denuc[anndata]'") from None
    return h5py


def _enc(obj: Any, kind: str, version: str = "0.2.0") -> None:
    obj.attrs["encoding-type"] = kind
    obj.attrs["encoding-version"] = version


def _str_attr(values: list[str]) -> np.ndarray:
    return np.array(values, dtype=object)


class AnnDataSink(TableSink):
    """Writes ``<stem>.h5ad`` chunk by chunk (see the module docstring)."""

    suffix = ".h5ad"
    stores_features = True

    def __init__(self, info: OutputInfo) -> None:
        super().__init__(info)
        self.embeddings = str(info.sink_options.get("embeddings", "float16"))
        if self.embeddings not in EMBEDDING_DTYPES:
            raise InputError(f"--embeddings must be one of {', '.join(EMBEDDING_DTYPES)}; got {self.embeddings!r}")
        self._h5: Any = None
        self._feat_dim: int | None = None  # fixed by the first chunk with nuclei (None: no features)
        self._roi_names = [""] + sorted(info.roi_areas_um2 or {})
        #: more categorical obs columns: name -> categories; each chunk gives its values as
        #: ``chunk.meta["extra_obs"][name]`` (``(N,)`` strings), e.g. the labels of given points
        self._extra: dict[str, list[str]] = {str(k): [str(c) for c in v]
                                             for k, v in (info.sink_options.get("extra_obs") or {}).items()}
        self._tiles = tile_plan_of(info)
        self._h5_path = self._tmp  # where the HDF5 file is written (a subclass may write it elsewhere)

    @classmethod
    def check_available(cls) -> None:
        _require_h5py()

    # ------------------------------------------------------------------ writing
    def column_names(self) -> list[str]:
        return super().column_names() + list(self._extra) + [TILE_KEY] * (self._tiles is not None)

    def columns_of(self, chunk: Nuclei) -> dict[str, np.ndarray]:
        cols = super().columns_of(chunk)
        given = chunk.meta.get("extra_obs") or {}
        for name, cats in self._extra.items():
            if name not in given:
                raise InputError(f"{self._path}: a chunk lacks the obs column {name!r}")
            lut = {c: i for i, c in enumerate(cats)}
            try:
                cols[name] = np.array([lut[str(v)] for v in given[name]], dtype=np.int64)
            except KeyError as e:
                raise InputError(f"{self._path}: {name} {e.args[0]!r} is not one of {cats}") from None
        if self._tiles is not None:
            cols[TILE_KEY] = tile_ids_of(chunk, len(self._tiles[0]), self._path)
        return cols

    def _write(self, chunk: Nuclei) -> None:
        if len(chunk) and self._fields is None:  # the first chunk with nuclei decides about features
            store = self.embeddings != "none" and chunk.features is not None
            self._feat_dim = int(chunk.features.shape[1]) if store and chunk.features is not None else None
        elif len(chunk) and (self._feat_dim is not None) != (chunk.features is not None and
                                                            self.embeddings != "none"):
            raise InputError(f"{self._path}: a chunk {'lacks' if self._feat_dim is not None else 'carries'} point "
                             f"features unlike the first one; every chunk must carry the same fields")
        super()._write(chunk)
        if len(chunk) and self._feat_dim is not None:
            assert chunk.features is not None
            if chunk.features.shape[1] != self._feat_dim:
                raise InputError(f"{self._path}: a chunk has {chunk.features.shape[1]} feature channels, the first "
                                 f"had {self._feat_dim}")
            self._append(self._h5["obsm/X_denuc"], _as_dtype(chunk.features, self.embeddings))

    def _start(self) -> None:
        h5py = _require_h5py()
        try:
            self._h5 = h5py.File(self._h5_path, "w")
        except OSError as e:
            raise InputError(f"{self._path}: cannot write ({e})") from None
        f = self._h5
        _enc(f, "anndata", "0.1.0")
        obs = f.create_group("obs")
        _enc(obs, "dataframe")
        obs.attrs["_index"] = "_index"
        cols = [c for c in self.column_names() if c not in ("x", "y", "x_um", "y_um")]
        obs.attrs["column-order"] = _str_attr(cols)
        self._grow(obs, "_index", (), h5py.string_dtype("utf-8"), "string-array")
        for c in cols:
            if c in ("class", "roi", *self._extra):
                g = obs.create_group(c)
                _enc(g, "categorical")
                g.attrs["ordered"] = False
                cats = (list(self.info.class_names) if c == "class" else self._roi_names if c == "roi"
                        else self._extra[c])
                d = g.create_dataset("categories", data=np.array(cats, dtype=object),
                                     dtype=h5py.string_dtype("utf-8"))
                _enc(d, "string-array")
                self._grow(g, "codes", (), np.int16 if len(cats) < 2**15 else np.int32, "array")
            else:
                self._grow(obs, c, (), np.int32 if c == TILE_KEY else np.float32, "array")
        var = f.create_group("var")
        _enc(var, "dataframe")
        var.attrs["_index"] = "_index"
        var.attrs["column-order"] = np.array([], dtype="float64")
        d = var.create_dataset("_index", shape=(0,), dtype=h5py.string_dtype("utf-8"))
        _enc(d, "string-array")
        for g in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            _enc(f.create_group(g), "dict", "0.1.0")
        self._grow(f["obsm"], "spatial", (2,), np.float64, "array")
        if self._feat_dim is not None:
            self._grow(f["obsm"], "X_denuc", (self._feat_dim,), np.dtype(self.embeddings), "array")

    @staticmethod
    def _grow(group: Any, name: str, tail: tuple[int, ...], dtype: Any, kind: str) -> None:
        d = group.create_dataset(name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype,
                                 chunks=(ROWS_PER_CHUNK, *tail) if not tail or tail[0] * ROWS_PER_CHUNK <= 2**20
                                 else (max(1, 2**20 // tail[0]), *tail))
        _enc(d, kind)

    @staticmethod
    def _append(d: Any, values: np.ndarray) -> None:
        n = d.shape[0]
        d.resize(n + len(values), axis=0)
        d[n:] = values

    def _rows(self, cols: dict[str, np.ndarray]) -> None:
        f = self._h5
        n = len(cols["x"])
        start = self.rows
        self._append(f["obs/_index"], np.array([str(i) for i in range(start, start + n)], dtype=object))
        for c, v in cols.items():
            if c in ("x", "y", "x_um", "y_um"):
                continue
            if c == "class" or c in self._extra:
                self._append(f[f"obs/{c}/codes"], v.astype(f[f"obs/{c}/codes"].dtype))
            elif c == "roi":
                lut = {r: i for i, r in enumerate(self._roi_names)}
                try:
                    codes = np.array([lut[str(r)] for r in v], dtype=f["obs/roi/codes"].dtype)
                except KeyError as e:
                    raise InputError(f"{self._path}: ROI {e.args[0]!r} is not one of the run's regions") from None
                self._append(f["obs/roi/codes"], codes)
            else:
                self._append(f[f"obs/{c}"], np.asarray(v, dtype=f[f"obs/{c}"].dtype))
        self._append(f["obsm/spatial"], np.stack([cols["x"], cols["y"]], axis=1).astype(np.float64))

    def _end(self) -> None:
        pass

    def _finish(self, summary: dict[str, Any]) -> None:
        super()._finish(summary)  # creates the file when no chunk had nuclei
        f = self._h5
        if self._feat_dim is None and self.embeddings != "none" and "X_denuc" not in f["obsm"]:
            dim = _feature_dim(summary)
            if dim is not None and self.rows == 0:  # an empty output still says how wide its features are
                self._grow(f["obsm"], "X_denuc", (dim,), np.dtype(self.embeddings), "array")
        write_uns(f["uns"], {"denuc": self._uns(summary)})
        f.close()
        self._h5 = None

    def _uns(self, summary: dict[str, Any]) -> dict[str, Any]:
        models = summary.get("models") or {}
        stored = "X_denuc" in self._h5["obsm"]
        tiles = {} if self._tiles is None else {"tiles": {"grid": list(self._tiles[1]), "core_level0": self._tiles[0]}}
        return {
            "encoder": str(models.get("encoder") or ""),
            "taps": [str(t) for t in (models.get("encoder_taps") or [])],
            "working_mpp": float(summary.get("encoder_mpp") or 0.0),
            "encoder_weights_sha256": str(models.get("encoder_weights_sha256") or ""),
            "head_sha256": str(models.get("head_sha256") or ""),
            "classes": list(self.info.class_names),
            "mpp": float(self.info.mpp),
            "size": [int(v) for v in self.info.size],
            "embeddings": self.embeddings if stored else "none",
            "summary": json.dumps(summary, sort_keys=True, default=str),
            "fingerprint": hashlib.sha256(json.dumps(models, sort_keys=True, default=str).encode()).hexdigest(),
            **tiles,
        }

    def abort(self) -> None:
        h5, self._h5 = self._h5, None
        if h5 is not None:
            try:
                h5.close()
            except Exception:  # a failing close must not hide the error that made us abort
                pass
        super().abort()


def _as_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` as ``dtype``; float32 -> float16 through torch (the same IEEE round-to-nearest-even
    values as numpy's ``astype``, several times faster on x86)."""
    if dtype == "float16" and x.dtype != np.float16:
        import torch

        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(torch.float16).numpy()
    return x.astype(dtype, copy=False)


def tile_plan_of(info: OutputInfo) -> tuple[np.ndarray, tuple[int, int]] | None:
    """``(core_level0 (T, 4) float64, (nx, ny))`` of the input's tile plan from
    ``info.sink_options`` (``tile_cores``, ``tile_grid``), or None when the run gave none."""
    cores = info.sink_options.get("tile_cores")
    if cores is None:
        return None
    cores = np.asarray(cores, dtype=np.float64).reshape(-1, 4)
    nx, ny = (int(v) for v in info.sink_options.get("tile_grid") or (len(cores), 1))
    if nx * ny != len(cores):
        raise InputError(f"{info.stem}: a tile grid of {nx} x {ny} does not match {len(cores)} tile cores")
    return cores, (nx, ny)


def tile_ids_of(chunk: Nuclei, count: int, where: Any) -> np.ndarray:
    """``(N,)`` int32 tile index of each nucleus of ``chunk`` (``chunk.meta[TILE_KEY]``), checked
    to be one per nucleus and in ``[0, count)``."""
    ids = chunk.meta.get(TILE_KEY)
    if ids is None:
        if not len(chunk):
            return np.zeros(0, np.int32)
        raise InputError(f"{where}: a chunk lacks the tile index of its nuclei (meta[{TILE_KEY!r}])")
    ids = np.asarray(ids).reshape(-1)
    if len(ids) != len(chunk) or ids.dtype.kind not in "iu":
        raise InputError(f"{where}: a chunk has {len(ids)} tile indices ({ids.dtype}) for {len(chunk)} nuclei")
    if len(ids) and (ids.min() < 0 or ids.max() >= count):
        raise InputError(f"{where}: tile indices must lie in [0, {count}); got {ids.min()}..{ids.max()}")
    return ids.astype(np.int32)


def _feature_dim(summary: dict[str, Any]) -> int | None:
    dim = (summary.get("models") or {}).get("feature_dim")
    return int(dim) if isinstance(dim, int) and dim > 0 else None


def write_uns(group: Any, values: dict[str, Any]) -> None:
    """Write a nested dict into an AnnData ``uns`` HDF5 group: dicts as groups, ``str`` as
    string scalars, numbers as numeric scalars, lists of str / numbers as arrays."""
    import h5py

    for k, v in values.items():
        if isinstance(v, dict):
            g = group.create_group(k)
            _enc(g, "dict", "0.1.0")
            write_uns(g, v)
        elif isinstance(v, str):
            d = group.create_dataset(k, data=v, dtype=h5py.string_dtype("utf-8"))
            _enc(d, "string")
        elif isinstance(v, (bool, np.bool_)):
            d = group.create_dataset(k, data=np.bool_(v))
            _enc(d, "numeric-scalar")
        elif isinstance(v, (int, float, np.integer, np.floating)):
            d = group.create_dataset(k, data=v)
            _enc(d, "numeric-scalar")
        elif isinstance(v, (list, tuple, np.ndarray)):
            arr = np.asarray(v)
            if arr.dtype.kind in "UO" or (arr.size == 0 and isinstance(v, (list, tuple))):
                d = group.create_dataset(k, data=np.array([str(x) for x in v], dtype=object),
                                         dtype=h5py.string_dtype("utf-8"))
                _enc(d, "string-array")
            else:
                d = group.create_dataset(k, data=arr)
                _enc(d, "array")
        else:
            raise InputError(f"uns[{k!r}]: cannot store a {type(v).__name__}")


def read_h5ad_table(path: Any) -> dict[str, Any]:
    """Read a ``.h5ad`` written by :class:`AnnDataSink` with h5py alone (no anndata needed).

    Returns:
        ``{"obs": pandas DataFrame (categoricals as pandas categoricals), "spatial": (N, 2)
        float64, "X_denuc": (N, C) array or None, "uns": dict (``summary`` parsed)}``.
    """
    import pandas as pd

    h5py = _require_h5py()
    with h5py.File(path, "r") as f:
        obs = f["obs"]
        index = [s.decode() if isinstance(s, bytes) else str(s) for s in obs["_index"][()]]
        cols: dict[str, Any] = {}
        for c in obs.attrs["column-order"]:
            c = str(c)
            node = obs[c]
            if isinstance(node, h5py.Group):
                cats = [s.decode() if isinstance(s, bytes) else str(s) for s in node["categories"][()]]
                cols[c] = pd.Categorical.from_codes(node["codes"][()], categories=cats)
            else:
                cols[c] = node[()]
        table = pd.DataFrame(cols, index=index)
        spatial = f["obsm/spatial"][()]
        feats = f["obsm/X_denuc"][()] if "X_denuc" in f["obsm"] else None
        uns = _read_uns(f["uns"])
    if "summary" in uns.get("denuc", {}):
        uns["denuc"]["summary"] = json.loads(uns["denuc"]["summary"])
    return {"obs": table, "spatial": spatial, "X_denuc": feats, "uns": uns}


def _read_uns(group: Any) -> dict[str, Any]:
    import h5py

    out: dict[str, Any] = {}
    for k, node in group.items():
        if isinstance(node, h5py.Group):
            out[k] = _read_uns(node)
            continue
        kind = node.attrs.get("encoding-type", "")
        v = node[()]
        if kind == "string":
            out[k] = v.decode() if isinstance(v, bytes) else str(v)
        elif kind == "string-array":
            out[k] = [s.decode() if isinstance(s, bytes) else str(s) for s in v]
        elif kind == "numeric-scalar":
            out[k] = v.item()
        else:
            out[k] = v
    return out
