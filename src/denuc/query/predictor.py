"""Encode an image once, answer any number of point-feature queries (SamPredictor-style).

::

    fp = PointFeaturizer(encoder)            # window 256 px at the encoder's working mpp
    fp.set_image(image, mpp=0.5)             # (H, W, 3) uint8 RGB, µm per pixel
    feats = fp.features_at(xy)               # (N, 2) (x, y) image pixels -> (N, C) float32

Frames. ``xy`` are (x, y) in pixels of the image passed to :meth:`set_image` (pixel-edge
frame). The image is resampled to the working mpp (``x_work = x * mpp / work_mpp``) and
covered by square windows of ``window`` px every ``stride`` px (:func:`denuc.merge.tiling.window_grid`;
an image smaller than a window is padded with white on the right/bottom). Each window is
resized to the encoder input size and encoded lazily: only windows that own a query point
are encoded, each at most once per image. A point lying in several windows takes its
feature from the window where it lies most inside (largest distance to that window's
edges). With ``stain_norm`` (e.g. ``macenko``, :data:`denuc.data.stain.STAIN_NORMALIZERS`)
each image is re-stained to a fixed H&E reference before anything else. Points outside the
image raise :class:`~denuc.errors.InputError` (documented policy: callers drop or clip them
first). The image is uploaded to the encoder's device as uint8; resizing, cropping and
sampling run there.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from denuc.core.mpp import check_mpp
from denuc.data.stain import STAIN_NORMALIZERS, STAIN_NORMALIZERS_TENSOR
from denuc.encode.encoder import Encoder
from denuc.errors import InputError, ModelError
from denuc.merge.tiling import window_origins
from denuc.query.sample import ALIGN_MODES, map_grid, sample_map, sample_maps

#: encoder precisions of :class:`PointFeaturizer`.
PRECISIONS = ("auto", "fp32", "bf16")

#: most feature values one batched sampling call may produce (bounds its memory: 2**26 fp32 = 256 MiB)
SAMPLE_CHUNK_VALUES = 2**26

#: default MiB of encoded window maps kept per image (:class:`PointFeaturizer` ``cache_mb``)
CACHE_MB = 256.0


def _as_uint8(arr: np.ndarray) -> np.ndarray:
    """uint8 as is; float in [0, 255] rounded and clipped (stain normalisers take uint8)."""
    return arr if arr.dtype == np.uint8 else np.clip(np.round(arr), 0, 255).astype(np.uint8)


def best_window(coord: np.ndarray, origins: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis: index of the window each coordinate lies most inside, and that depth.

    Args:
        coord: ``(N,)`` coordinates (pixels) along the axis.
        origins: ``(K,)`` window starts; window ``k`` covers ``[origins[k], origins[k] + window)``.

    Returns:
        ``(N,)`` int64 window indices and ``(N,)`` float depths ``min(c - o, o + window - c)``.
    """
    d = np.minimum(coord[:, None] - origins[None, :], origins[None, :] + window - coord[:, None])
    k = np.argmax(d, axis=1)
    return k, d[np.arange(len(coord)), k]


def assign_windows(xy: np.ndarray, xs: np.ndarray, ys: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Per point the (column, row) index of the window of the grid ``xs`` x ``ys`` it lies most inside.

    Maximising ``min(depth_x, depth_y)`` over the grid separates into the two axes.
    """
    kx, _ = best_window(xy[:, 0], xs, window)
    ky, _ = best_window(xy[:, 1], ys, window)
    return kx, ky


class PointFeaturizer:
    """Dense-feature point queries on one image at a time.

    Args:
        encoder: a frozen :class:`~denuc.encode.Encoder`.
        mpp: working resolution, µm per pixel (default: the encoder's recommended mpp).
        window: window side in pixels at the working mpp (default: the encoder's, 256).
        stride: window step in pixels (default ``window - window // 4``).
        align: ``center`` (right token-centre geometry) or ``corners`` (authors' code).
        batch_size: windows per encoder call (default: 64 on CUDA; on the CPU 16 with ONNX
            Runtime, which splits a batch over the threads, and 4 with PyTorch, where larger
            batches leave the CPU caches and run slower).
        device: device of the encoder (default: where its parameters live).
        stain_norm: stain normaliser applied to each image first (``none`` or ``macenko``).
        precision: ``auto`` = bf16 autocast on CUDA and fp32 elsewhere, ``fp32``, or ``bf16``
            (autocast on any device); maps are stored and sampled in fp32 either way.
        feature_tta: 1, or 2/4/8 dihedral passes of the image (:data:`denuc.detect.tta.TTA_PASSES`):
            each point's feature is the mean of its features in the flipped/rotated images
            (costs that many encodings; nuclei classes do not depend on orientation).
        cache_mb: MiB of encoded window maps kept for the current image (default
            :data:`CACHE_MB`; at least one batch). A query needing more windows streams them:
            each batch is encoded, sampled and dropped, so memory does not grow with the image
            (later queries re-encode what was dropped). Features are the same either way.
        runtime: what runs the encoder's forward pass (:mod:`denuc.runtime`): ``torch`` (the
            reference, default), ``onnx`` (ONNX Runtime on the CPU), ``onnx-int8`` (the same
            quantized to 8 bits, calibrated on :meth:`calibration_inputs`) or ``auto`` (on the CPU
            when installed: ``onnx-int8`` for encoders that :attr:`~denuc.encode.Encoder.calibrates`,
            else ``onnx``); a ``bf16`` precision always runs on PyTorch. ``onnx`` features equal
            PyTorch's within float32 rounding (about 1e-5); ``onnx-int8`` ones within quantization
            error (see ``docs/runtime.md``).

    Attributes:
        n_encoded: windows encoded since construction (counts encoder work).
        encode_ms: milliseconds spent resizing + encoding since construction.
    """

    def __init__(self, encoder: Encoder, *, mpp: float | None = None, window: int | None = None,
                 stride: int | None = None, align: str = "center", batch_size: int | None = None,
                 device: str | torch.device | None = None, stain_norm: str = "none",
                 precision: str = "auto", feature_tta: int = 1, cache_mb: float | None = None,
                 runtime: str = "torch") -> None:
        if align not in ALIGN_MODES:
            raise InputError(f"align must be one of {ALIGN_MODES}; got {align!r}")
        if stain_norm not in STAIN_NORMALIZERS:
            raise InputError(f"unknown stain normaliser {stain_norm!r}; known: {list(STAIN_NORMALIZERS)}")
        self.stain_norm = stain_norm
        self.encoder = encoder
        self.mpp = float(mpp if mpp is not None else encoder.spec.mpp)
        self.window = int(window if window is not None else encoder.spec.window)
        self.stride = int(stride if stride is not None else self.window - self.window // 4)
        if not 0 < self.stride <= self.window:
            raise InputError(f"need 0 < stride <= window; got window={self.window}, stride={self.stride}")
        self.align = align
        p = next(encoder.parameters(), None)
        self.device = torch.device(device) if device is not None else (p.device if p is not None else torch.device("cpu"))
        if precision not in PRECISIONS:
            raise InputError(f"precision must be one of {PRECISIONS}; got {precision!r}")
        self.precision = precision
        from denuc.runtime import make_runner

        self.runtime = runtime
        #: the encoder's forward pass (:mod:`denuc.runtime`; PyTorch under bf16 autocast)
        self.runner = make_runner(encoder, runtime if self.autocast_dtype is None else "torch",
                                  name=f"encoder-{encoder.name}", device=self.device,
                                  calibration=self.calibration_inputs, auto_int8=encoder.calibrates)
        from denuc.runtime.base import ONNX_RUNTIMES

        default_batch = 64 if self.device.type == "cuda" else 16 if self.runner.runtime in ONNX_RUNTIMES else 4
        self.batch_size = int(batch_size if batch_size is not None else default_batch)
        from denuc.detect.tta import TTA_PASSES

        if feature_tta not in TTA_PASSES:
            raise InputError(f"feature_tta must be one of {sorted(TTA_PASSES)}; got {feature_tta!r}")
        self.feature_tta = int(feature_tta)
        self._passes: list[tuple[tuple[int, bool], PointFeaturizer]] = []
        #: normalise stains on the encoder's device (default: unless it is the CPU, where numpy is faster)
        self.stain_on_device = self.device.type != "cpu"
        self.cache_mb = float(CACHE_MB if cache_mb is None else cache_mb)
        if not self.cache_mb >= 0:
            raise InputError(f"cache_mb must be >= 0; got {cache_mb!r}")
        self.n_encoded = 0
        self.encode_ms = 0.0
        self._image_encoded = 0  # windows encoded for the current image
        self._img: torch.Tensor | None = None
        self._maps: dict[tuple[int, int], torch.Tensor] = {}
        self._batches: list[torch.Tensor] = []  # (B, C, h, w) maps as encoded, batch by batch
        self._where: dict[tuple[int, int], tuple[int, int]] = {}  # window key -> (batch, row)

    def calibration_inputs(self, shape: tuple[int, ...]) -> np.ndarray:
        """``(N, *shape)`` float32 encoder inputs that calibrate the ``onnx-int8`` runtime: every
        window of the bundled sample image (:func:`denuc.runtime.int8.sample_rgb`) at this
        featurizer's mpp, window and stride, prepared as :meth:`features_at` prepares them
        (without stain normalisation or feature TTA).

        Args:
            shape: ``(3, S, S)``, the encoder's input.
        """
        from denuc.runtime.int8 import sample_rgb

        rgb, mpp = sample_rgb()
        # the same geometry, no stain normalisation or TTA; its own (PyTorch) runner is never called
        probe = PointFeaturizer(self.encoder, mpp=self.mpp, window=self.window, stride=self.stride, align=self.align,
                                device=self.device, precision="fp32", runtime="torch")
        probe.set_image(rgb, mpp)
        crops = torch.stack([probe.crop((i, j)) for j in range(len(probe._ys)) for i in range(len(probe._xs))])
        with torch.inference_mode():
            x = self.prepare(crops).float().cpu().numpy()
        if tuple(x.shape[1:]) != tuple(shape):
            raise ModelError(f"encoder inputs are {tuple(x.shape[1:])}, the runtime asked for {tuple(shape)}")
        return x

    # ------------------------------------------------------------------ image
    def geometry(self) -> dict[str, object]:
        """Settings that determine the features (for cache keys and checkpoints); ``stain_norm``
        is listed only when one is used."""
        g: dict[str, object] = {"mpp": self.mpp, "window": self.window, "stride": self.stride, "align": self.align,
                                "input_size": self.encoder.input_size}
        if self.stain_norm != "none":
            g["stain_norm"] = self.stain_norm
        if self.feature_tta != 1:
            g["feature_tta"] = self.feature_tta
        return g

    def with_stain_norm(self, stain_norm: str) -> PointFeaturizer:
        """A featurizer with the same encoder and geometry but another stain normaliser."""
        out = PointFeaturizer(self.encoder, mpp=self.mpp, window=self.window, stride=self.stride, align=self.align,
                              batch_size=self.batch_size, device=self.device, stain_norm=stain_norm,
                              precision=self.precision, feature_tta=self.feature_tta, cache_mb=self.cache_mb,
                              runtime=self.runtime)
        out.runner = self.runner  # one export and session per encoder
        return out

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 when the encoder runs under autocast, else None (fp32)."""
        if self.precision == "bf16" or (self.precision == "auto" and self.device.type == "cuda"):
            return torch.bfloat16
        return None

    def set_image(self, image: np.ndarray, mpp: float | None) -> None:
        """Take an ``(H, W, 3)`` RGB image at ``mpp`` µm/px: uint8, or float in [0, 255] (a float
        image whose values all lie in [0, 1] is taken as [0, 1], as :func:`denuc.data.image.to_rgb_uint8`
        does).

        Nothing is encoded yet; windows are encoded on demand by :meth:`features_at`.
        """
        self.image_mpp = check_mpp(mpp, "image")
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise InputError(f"image must be (H, W, 3) RGB; got shape {arr.shape}")
        if arr.dtype.kind == "f":
            if not np.isfinite(arr).all():
                raise InputError("image contains NaN or inf")
            if arr.size and float(arr.max()) <= 1.0:
                arr = arr * 255.0
        self.image_hw = (int(arr.shape[0]), int(arr.shape[1]))
        if self.feature_tta > 1:
            self._set_passes(arr)
            return
        on_device = self.stain_norm != "none" and self.stain_on_device
        if self.stain_norm != "none":
            arr = _as_uint8(arr)
            if not on_device:
                arr = STAIN_NORMALIZERS[self.stain_norm](arr)
        # to the encoder's device first (as uint8 when it is), so normalising, resizing and
        # cropping run there (the numpy and tensor normalisers agree to the last rounding bit)
        src = np.ascontiguousarray(arr if arr.dtype == np.uint8 else arr.astype(np.float32))
        if not src.flags.writeable:  # torch wants writable memory; a uint8 copy is cheap
            src = src.copy()
        t = torch.from_numpy(src).to(self.device)
        if on_device:
            t = STAIN_NORMALIZERS_TENSOR[self.stain_norm](t)
        t = t.permute(2, 0, 1)[None].float() / 255.0
        f = self.image_mpp / self.mpp
        if abs(f - 1.0) > 1e-6:  # same exact frame as denuc.data.resample: x_work = f * x
            t = F.interpolate(t, scale_factor=f, mode="bilinear", align_corners=False,
                              recompute_scale_factor=False, antialias=f < 1)
        h, w = t.shape[-2:]
        ph, pw = max(self.window - h, 0), max(self.window - w, 0)
        if ph or pw:
            t = F.pad(t, (0, pw, 0, ph), value=1.0)  # white, like slide background
        self._img = t[0].contiguous()  # (3, H, W) rows in memory order: window crops copy fast
        self.work_hw = (int(h), int(w))
        self._xs = window_origins(max(w, self.window), self.window, self.stride)
        self._ys = window_origins(max(h, self.window), self.window, self.stride)
        self._drop_maps()
        self._image_encoded = 0

    def _drop_maps(self) -> None:
        self._maps, self._batches, self._where = {}, [], {}

    @property
    def cache_windows(self) -> int:
        """Windows whose maps may be kept at once: :attr:`cache_mb` worth, rounded down to whole
        batches (at least one), so streaming encodes the same batches as keeping everything."""
        s = self.encoder.map_size()
        per = self.encoder.dim * s * s * 4  # fp32 bytes of one window's map
        n = int(self.cache_mb * 2**20 // max(per, 1))
        return max(self.batch_size, n - n % self.batch_size)

    def _set_passes(self, arr: np.ndarray) -> None:
        """Stain-normalise once, then give every dihedral pass of the image to its own featurizer."""
        from denuc.detect.tta import tta_passes, transform_image

        if self.stain_norm != "none":
            arr = STAIN_NORMALIZERS[self.stain_norm](_as_uint8(arr))
        if not self._passes:
            self._passes = [(p, PointFeaturizer(self.encoder, mpp=self.mpp, window=self.window, stride=self.stride,
                                                align=self.align, batch_size=self.batch_size, device=self.device,
                                                precision=self.precision, cache_mb=self.cache_mb / self.feature_tta,
                                                runtime=self.runtime))
                            for p in tta_passes(self.feature_tta)]
            for _, sub in self._passes:
                sub.runner = self.runner
        for (k, flip), sub in self._passes:
            sub.set_image(transform_image(arr, k, flip), self.image_mpp)
        self._img = self._passes[0][1]._img
        self._maps = {}

    @property
    def windows_encoded(self) -> int:
        """Windows encoded for the current image (all passes)."""
        return sum(sub._image_encoded for _, sub in self._passes) if self._passes else self._image_encoded

    def _features_tta(self, xy: np.ndarray) -> torch.Tensor:
        from denuc.detect.tta import points_to_transformed

        self._check_inside(xy)
        h, w = self.image_hw
        out = None
        n0, ms0 = sum(sub.n_encoded for _, sub in self._passes), sum(sub.encode_ms for _, sub in self._passes)
        for (k, flip), sub in self._passes:
            th, tw = sub.image_hw
            # a point on the left/top edge lands on the right/bottom edge: keep it inside
            q = np.clip(points_to_transformed(xy, k, flip, (h, w)), 0.0, [np.nextafter(tw, 0), np.nextafter(th, 0)])
            f = sub.features_at(q)
            out = f if out is None else out + f
        self.n_encoded += sum(sub.n_encoded for _, sub in self._passes) - n0
        self.encode_ms += sum(sub.encode_ms for _, sub in self._passes) - ms0
        assert out is not None
        return out / len(self._passes)

    # --------------------------------------------------------------- queries
    def prepare(self, crops: torch.Tensor) -> torch.Tensor:
        """``(B, 3, window, window)`` RGB in [0, 1] -> normalised encoder input ``(B, 3, S, S)``."""
        s = self.encoder.input_size
        crops = crops.to(self.device)
        if s != self.window:
            crops = F.interpolate(crops, size=(s, s), mode="bilinear", align_corners=False, antialias=s < self.window)
        return self.encoder.normalize(crops)

    def crop(self, key: tuple[int, int]) -> torch.Tensor:
        """``(3, window, window)`` RGB in [0, 1] of window ``key`` = (column, row) grid index."""
        assert self._img is not None
        x0, y0 = int(self._xs[key[0]]), int(self._ys[key[1]])
        return self._img[:, y0:y0 + self.window, x0:x0 + self.window]

    def _encode(self, keys: list[tuple[int, int]]) -> None:
        t0 = time.perf_counter()
        for i in range(0, len(keys), self.batch_size):
            chunk = keys[i:i + self.batch_size]
            dt = self.autocast_dtype
            with torch.inference_mode(), torch.autocast(self.device.type, dtype=dt or torch.bfloat16,
                                                        enabled=dt is not None):
                maps = self.runner(self.prepare(torch.stack([self.crop(k) for k in chunk])))[0].float()
            for r, (k, m) in enumerate(zip(chunk, maps)):
                self._maps[k] = m
                self._where[k] = (len(self._batches), r)
            self._batches.append(maps)
            self.n_encoded += len(chunk)
            self._image_encoded += len(chunk)
        self.encode_ms += (time.perf_counter() - t0) * 1e3

    def _check_inside(self, xy: np.ndarray) -> None:
        """Raise :class:`InputError` if a point lies outside the image (``0 <= x < W``, ``0 <= y < H``)."""
        h, w = self.image_hw
        bad = ~((xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h))
        if bad.any():
            raise InputError(f"{int(bad.sum())} query point(s) lie outside the {w}x{h} image, "
                             f"e.g. (x, y) = ({xy[bad][0][0]:.2f}, {xy[bad][0][1]:.2f})")

    def _locate(self, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per point the flat index ``column * rows + row`` of the window that owns it and its
        ``(n, 2)`` window-local (x, y) at the working mpp."""
        if self._img is None:
            raise InputError("call set_image(image, mpp) before querying points")
        self._check_inside(xy)
        work = xy * (self.image_mpp / self.mpp)
        kx, ky = assign_windows(work, self._xs, self._ys, self.window)
        local = work - np.stack([self._xs[kx], self._ys[ky]], axis=1).astype(np.float64)
        return np.asarray(kx, np.int64) * len(self._ys) + np.asarray(ky, np.int64), local

    def group_points(self, xy: np.ndarray) -> list[tuple[tuple[int, int], np.ndarray, np.ndarray]]:
        """Points grouped by the window that owns them.

        Args:
            xy: ``(N, 2)`` (x, y) in pixels of the image given to :meth:`set_image`.

        Returns:
            ``[(key, indices into xy, (n, 2) window-local xy at the working mpp), ...]``, sorted
            by key = (column, row), indices ascending.

        Raises:
            InputError: a point lies outside the image (``0 <= x < W``, ``0 <= y < H``).
        """
        flat, local = self._locate(xy)
        if len(xy) == 0:
            return []
        ny = len(self._ys)
        order = np.argsort(flat, kind="stable")
        uniq, starts = np.unique(flat[order], return_index=True)
        return [((u // ny, u % ny), sel, local[sel])
                for u, sel in zip(uniq.tolist(), np.split(order, starts[1:]), strict=True)]

    def sample(self, fmap: torch.Tensor, local_xy: np.ndarray) -> torch.Tensor:
        """``(C, h, w)`` map of one window, ``(n, 2)`` window-local points -> ``(n, C)`` features."""
        grid = map_grid(torch.from_numpy(local_xy).to(fmap.device), self.window, self.encoder.input_size,
                        self.encoder.stride, (fmap.shape[-2], fmap.shape[-1]), self.align)
        return sample_map(fmap, grid, self.align)

    def features_at(self, xy: np.ndarray) -> torch.Tensor:
        """Features at points.

        Args:
            xy: ``(N, 2)`` (x, y) in pixels of the image given to :meth:`set_image`.

        Returns:
            ``(N, C)`` float32 tensor on the encoder's device.

        Raises:
            InputError: a point lies outside the image (``0 <= x < W``, ``0 <= y < H``).
        """
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        if self._passes and self.feature_tta > 1:
            return self._features_tta(xy)
        flat, local = self._locate(xy)
        out = torch.zeros((len(xy), self.encoder.dim), dtype=torch.float32, device=self.device)
        if len(xy) == 0:
            return out
        ny = len(self._ys)
        need = np.unique(flat)
        new = np.array([u for u in need.tolist() if (u // ny, u % ny) not in self._maps], dtype=np.int64)
        cap = self.cache_windows
        if len(self._maps) + len(new) <= cap:  # everything fits: encode what is missing, sample all
            self._encode([(u // ny, u % ny) for u in new.tolist()])
            self._sample_points(out, flat, local, np.arange(len(flat)))
            return out
        # stream: points of kept windows first, then encode, sample and drop `cap` windows at a time
        self._sample_points(out, flat, local, np.flatnonzero(~np.isin(flat, new)))
        for c0 in range(0, len(new), cap):
            chunk = new[c0:c0 + cap]
            if len(self._maps) + len(chunk) > cap:
                self._drop_maps()
            self._encode([(u // ny, u % ny) for u in chunk.tolist()])
            self._sample_points(out, flat, local, np.flatnonzero(np.isin(flat, chunk)))
        return out

    def _sample_points(self, out: torch.Tensor, flat: np.ndarray, local: np.ndarray, sel: np.ndarray) -> None:
        """Write the features of points ``sel`` (their windows ``flat[sel]`` are encoded) into ``out``."""
        if len(sel) == 0:
            return
        ny = len(self._ys)
        need = np.unique(flat[sel])
        # (batch, row) of every point's map, without a loop over points or windows
        where = np.array([self._where[(u // ny, u % ny)] for u in need.tolist()],
                         dtype=np.int64)[np.searchsorted(need, flat[sel])]
        # one grid_sample per encoded batch (not per window): host-device traffic and kernel
        # launches do not grow with the number of windows
        for b in np.unique(where[:, 0]).tolist():
            s = np.flatnonzero(where[:, 0] == b)
            self._sample_into(out, self._batches[b], where[s, 1], sel[s], local[sel[s]])

    def _sample_into(self, out: torch.Tensor, fmaps: torch.Tensor, rows: np.ndarray, dest: np.ndarray,
                     local: np.ndarray) -> None:
        """Sample the maps ``fmaps[rows[i]]`` at window-local points ``local[i]`` (working-mpp px)
        and write the features to ``out[dest[i]]``.

        The points are laid out as a ``(maps, n_max, 2)`` grid (slot = rank of the point among
        those of its map) and sampled in chunks of maps of at most :data:`SAMPLE_CHUNK_VALUES` values.
        """
        order = np.lexsort((dest, rows))  # by map, then by output row
        rows, dest = rows[order], dest[order]
        g = map_grid(torch.from_numpy(local[order]), self.window, self.encoder.input_size, self.encoder.stride,
                     (fmaps.shape[-2], fmaps.shape[-1]), self.align)
        counts = np.bincount(rows, minlength=len(fmaps))
        rank = np.arange(len(rows)) - (np.cumsum(counts) - counts)[rows]
        n_max = int(counts.max())
        step = max(1, SAMPLE_CHUNK_VALUES // max(fmaps.shape[1] * n_max, 1))
        r0, r_end = int(rows[0]), int(rows[-1]) + 1  # sample only the span of maps that own points
        for c0 in range(r0, r_end, step):
            c1 = min(c0 + step, r_end)
            lo, hi = np.searchsorted(rows, [c0, c1])
            if lo == hi:
                continue
            ij = torch.from_numpy(np.stack([rows[lo:hi] - c0, rank[lo:hi], dest[lo:hi]]))  # (3, m): map, slot, row
            grid = torch.zeros((c1 - c0, n_max, 2), dtype=torch.float32)
            grid[ij[0], ij[1]] = g[lo:hi]
            ij = ij.to(fmaps.device)
            feats = sample_maps(fmaps[c0:c1], grid.to(fmaps.device), self.align)  # (c1 - c0, n_max, C) view
            out[ij[2].to(self.device)] = feats[ij[0], ij[1]].float()
