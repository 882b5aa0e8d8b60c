"""H&E stain operations on ``(H, W, 3)`` uint8 RGB images: random stain jitter (training
augmentation) and Macenko stain normalisation (inference and training preprocessing).

Both work in optical density, ``od = -log((I + 1) / 256)`` per pixel and RGB channel
(0 for white glass, larger for more dye), where Beer-Lambert makes the dyes add linearly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from denuc.errors import InputError

if TYPE_CHECKING:
    import torch

#: Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in optical density, unit rows.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
RGB_FROM_HED /= np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)

#: colour spaces :func:`stain_jitter` can perturb.
STAIN_SPACES = ("od", "hed")


#: float32 optical density of every uint8 value (the same float32 arithmetic as computing it per
#: pixel, so looking it up gives identical values without a logarithm per pixel).
_OD_LUT = -np.log((np.arange(256, dtype=np.float32) + 1.0) / 256.0)
_OD_LUT64 = _OD_LUT.astype(np.float64)


def to_od(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB -> float32 optical density ``-log((I + 1) / 256)`` (>= 0)."""
    if image.dtype == np.uint8:
        return _OD_LUT[image]
    return -np.log((image.astype(np.float32) + 1.0) / 256.0)


def _od64(image: np.ndarray) -> np.ndarray:
    """``(H*W, 3)`` float64 of :func:`to_od` (one table lookup for uint8 images)."""
    if image.dtype == np.uint8:
        return _OD_LUT64[image].reshape(-1, 3)
    return to_od(image).reshape(-1, 3).astype(np.float64)


def from_od(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_od`, rounded and clipped to uint8."""
    out = np.exp(-od) * 256.0 - 1.0
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def stain_jitter(image: np.ndarray, rng: np.random.Generator, strength: float = 0.1, space: str = "od") -> np.ndarray:
    """Random stain/brightness variation of an ``(H, W, 3)`` uint8 RGB image.

    * ``space="od"``: each RGB channel of ``od`` is scaled by ``U(1 - s, 1 + s)`` and shifted by
      ``U(-s/5, s/5)`` (stain-intensity variation, channels independent);
    * ``space="hed"``: ``od`` is unmixed into haematoxylin/eosin/DAB concentrations
      (Ruifrok-Johnston vectors), each scaled by ``U(1 - s, 1 + s)`` and shifted by
      ``U(-s/5, s/5)``, and mixed back (HED jitter after Tellez et al. 2018), so the variation
      follows the dyes rather than the camera channels.
    """
    if space not in STAIN_SPACES:
        raise InputError(f"stain jitter space must be one of {list(STAIN_SPACES)}; got {space!r}")
    od = to_od(image)
    a = rng.uniform(1 - strength, 1 + strength, 3).astype(np.float32)
    b = rng.uniform(-strength / 5, strength / 5, 3).astype(np.float32)
    if space == "od":
        od = od * a + b
    else:
        conc = od.reshape(-1, 3) @ HED_FROM_RGB.astype(np.float32)
        od = ((conc * a + b) @ RGB_FROM_HED.astype(np.float32)).reshape(od.shape)
    return from_od(od)


@dataclass(frozen=True)
class StainReference:
    """Target of :func:`macenko_normalize`: unit stain vectors and robust maximum concentrations.

    ``stains``: ``(2, 3)`` rows haematoxylin, eosin, each a unit optical-density RGB vector;
    ``max_conc``: ``(2,)`` the 99th-percentile concentration of each stain in tissue pixels.
    """

    stains: tuple[tuple[float, float, float], tuple[float, float, float]]
    max_conc: tuple[float, float]

    def as_dict(self) -> dict[str, list[float] | list[list[float]]]:
        return {"stains": [list(r) for r in self.stains], "max_conc": list(self.max_conc)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> StainReference:
        s = np.asarray(d["stains"], dtype=np.float64)
        m = np.asarray(d["max_conc"], dtype=np.float64)
        if s.shape != (2, 3) or m.shape != (2,) or not np.all(np.isfinite(s)) or not np.all(m > 0):
            raise InputError(f"a stain reference needs stains (2 x 3) and max_conc (2 positive numbers); got {d!r}")
        return cls(tuple(map(tuple, s.tolist())), tuple(m.tolist()))  # type: ignore[arg-type]


#: The reference of Macenko et al. (2009) as commonly used (H&E vectors and maximum concentrations).
MACENKO_REFERENCE = StainReference(((0.5626, 0.7201, 0.4062), (0.2159, 0.8012, 0.5581)), (1.9705, 1.0308))


@dataclass(frozen=True)
class StainEstimate:
    """Stain vectors ``(2, 3)`` (H, E rows) and 99th-percentile concentrations ``(2,)`` of one image;
    ``fallback`` is True when too little tissue was found and Ruifrok-Johnston H&E vectors were used."""

    stains: np.ndarray
    max_conc: np.ndarray
    fallback: bool


def estimate_stains(image: np.ndarray, *, od_threshold: float = 0.15, alpha: float = 1.0,
                    min_pixels: int = 500, max_pixels: int = 250_000, seed: int = 0) -> StainEstimate:
    """Macenko et al. (2009) stain estimation on an ``(H, W, 3)`` uint8 RGB image.

    Tissue pixels are those whose optical density exceeds ``od_threshold`` in every channel;
    their OD is projected on the plane of its two main eigenvectors, and the stain vectors are
    the directions at the ``alpha`` and ``100 - alpha`` percentiles of the angle in that plane.
    The vector with the larger red OD is haematoxylin. At most ``max_pixels`` tissue pixels
    are used (a fixed-seed sample), so big tiles cost the same.
    """
    od = _od64(image)
    all_tissue = tissue = od[np.all(od > od_threshold, axis=1)]
    fallback_stains = RGB_FROM_HED[:2]
    if len(tissue) < min_pixels:
        return StainEstimate(fallback_stains.copy(), _max_conc(od, fallback_stains, od_threshold, all_tissue), True)
    if len(tissue) > max_pixels:
        tissue = tissue[np.random.default_rng(seed).choice(len(tissue), max_pixels, replace=False)]
    _, vecs = np.linalg.eigh(np.cov(tissue, rowvar=False))
    # the two largest eigenvalues (eigh sorts ascending); contiguous, so that the products below
    # run in BLAS (same values, several times faster than numpy's strided fallback)
    plane = np.ascontiguousarray(vecs[:, 1:3])
    plane = plane * np.where(plane.sum(0) < 0, -1.0, 1.0)  # point into positive OD
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    stains = np.stack([v1, v2] if v1[0] > v2[0] else [v2, v1])
    stains = np.abs(stains) / np.linalg.norm(stains, axis=1, keepdims=True)
    if not np.all(np.isfinite(stains)) or abs(float(stains[0] @ stains[1])) > 0.995:
        return StainEstimate(fallback_stains.copy(), _max_conc(od, fallback_stains, od_threshold, all_tissue), True)
    return StainEstimate(stains, _max_conc(od, stains, od_threshold, all_tissue), False)


def _concentrations(od: np.ndarray, stains: np.ndarray) -> np.ndarray:
    """Least-squares concentrations ``(N, 2)`` of ``od (N, 3)`` in the two ``stains (2, 3)``
    (through the pseudo-inverse of the 3 x 2 stain matrix: one matrix product, where a
    per-call ``lstsq`` over all pixels took half of the normalisation time)."""
    return od @ np.ascontiguousarray(np.linalg.pinv(stains.T).T)  # contiguous: BLAS, same values


def _max_conc(od: np.ndarray, stains: np.ndarray, od_threshold: float,
              tissue: np.ndarray | None = None) -> np.ndarray:
    """99th-percentile concentrations ``(2,)`` of the tissue pixels of ``od`` (``tissue``: those
    pixels when the caller already selected them)."""
    if tissue is None:
        tissue = od[np.all(od > od_threshold, axis=1)]
    if len(tissue) == 0:
        return np.ones(2)
    c = _concentrations(tissue, stains)
    m = np.percentile(c, 99, axis=0)
    return np.where(m > 1e-6, m, 1.0)


#: pixels :func:`macenko_normalize` converts at a time.
NORMALIZE_CHUNK_PIXELS = 1 << 17


def macenko_normalize(image: np.ndarray, reference: StainReference = MACENKO_REFERENCE, *,
                      estimate: StainEstimate | None = None, od_threshold: float = 0.15) -> np.ndarray:
    """Re-stain an ``(H, W, 3)`` uint8 RGB image to ``reference`` (Macenko et al. 2009).

    Each pixel's OD is unmixed into the image's own H and E concentrations
    (:func:`estimate_stains`, or ``estimate`` when given, e.g. one estimate per slide),
    the concentrations are scaled so their 99th percentiles match ``reference.max_conc``,
    and mixed back with the reference stain vectors. Geometry is unchanged; an image with
    too little tissue is left as it is (nothing to estimate from).
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"stain normalisation needs an (H, W, 3) uint8 RGB image; got {image.shape} {image.dtype}")
    est = estimate if estimate is not None else estimate_stains(image, od_threshold=od_threshold)
    if est.fallback and estimate is None:
        return image.copy()
    unmix = np.ascontiguousarray(np.linalg.pinv(est.stains.T).T)  # as _concentrations
    scale = np.asarray(reference.max_conc) / est.max_conc
    mix = np.asarray(reference.stains, dtype=np.float64)
    out = np.empty_like(image)
    # a band of rows at a time: the same per-pixel arithmetic, with float64 temporaries that stay
    # in the CPU's cache (about 5x faster on large tiles than whole-image temporaries)
    rows = max(1, NORMALIZE_CHUNK_PIXELS // max(1, image.shape[1]))
    for y in range(0, image.shape[0], rows):
        part = image[y:y + rows]
        conc = _od64(part) @ unmix
        conc *= scale
        out[y:y + rows] = from_od((conc @ mix).reshape(part.shape).astype(np.float32))
    return out


def macenko_normalize_tensor(image: torch.Tensor, reference: StainReference = MACENKO_REFERENCE, *,
                             od_threshold: float = 0.15, alpha: float = 1.0, min_pixels: int = 500,
                             max_pixels: int = 250_000, seed: int = 0) -> torch.Tensor:
    """:func:`macenko_normalize` for an ``(H, W, 3)`` uint8 tensor, computed on its device.

    The same float64 arithmetic as the numpy version (and the same tissue-pixel sample when
    there are more than ``max_pixels``), so the result equals it up to rounding of the last
    bit; on a GPU it spares the host a pass over every pixel. Returns an ``(H, W, 3)`` uint8
    tensor on the same device (the input itself when there is too little tissue).
    """
    import torch

    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != torch.uint8:
        raise InputError(f"stain normalisation needs an (H, W, 3) uint8 RGB image; got {tuple(image.shape)} "
                         f"{image.dtype}")
    # float32 optical density like to_od, then float64 like estimate_stains
    od = (-torch.log((image.to(torch.float32) + 1.0) / 256.0)).reshape(-1, 3).to(torch.float64)
    mask = (od > od_threshold).all(dim=1)
    n_tissue = int(mask.sum())
    if n_tissue < min_pixels:
        return image
    tissue = od[mask]
    if n_tissue > max_pixels:
        pick = np.random.default_rng(seed).choice(n_tissue, max_pixels, replace=False)
        tissue = tissue[torch.from_numpy(pick).to(tissue.device)]
    centred = tissue - tissue.mean(0, keepdim=True)
    cov = centred.T @ centred / (len(tissue) - 1)
    _, vecs = torch.linalg.eigh(cov)
    plane = vecs[:, 1:3]
    plane = plane * torch.where(plane.sum(0) < 0, -1.0, 1.0).to(plane.dtype)
    proj = tissue @ plane
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    q = torch.tensor([alpha / 100.0, 1.0 - alpha / 100.0], dtype=phi.dtype, device=phi.device)
    lo, hi = torch.quantile(phi, q).tolist()
    v1 = plane @ torch.tensor([np.cos(lo), np.sin(lo)], dtype=plane.dtype, device=plane.device)
    v2 = plane @ torch.tensor([np.cos(hi), np.sin(hi)], dtype=plane.dtype, device=plane.device)
    stains = torch.stack([v1, v2] if float(v1[0]) > float(v2[0]) else [v2, v1])
    stains = stains.abs() / torch.linalg.norm(stains, dim=1, keepdim=True)
    if not bool(torch.isfinite(stains).all()) or abs(float(stains[0] @ stains[1])) > 0.995:
        return image
    pinv = torch.linalg.pinv(stains.T).T  # (3, 2): od @ pinv = least-squares concentrations
    conc_t = od[mask] @ pinv
    max_conc = torch.quantile(conc_t, 0.99, dim=0) if len(conc_t) <= 16_000_000 else \
        torch.from_numpy(np.percentile(conc_t.cpu().numpy(), 99, axis=0)).to(conc_t.device)
    max_conc = torch.where(max_conc > 1e-6, max_conc, torch.ones_like(max_conc))
    ref_conc = torch.tensor(reference.max_conc, dtype=torch.float64, device=od.device)
    ref_stains = torch.tensor(reference.stains, dtype=torch.float64, device=od.device)
    out = ((od @ pinv) * (ref_conc / max_conc)) @ ref_stains
    rgb = torch.exp(-out.to(torch.float32)) * 256.0 - 1.0
    return rgb.round().clamp(0, 255).to(torch.uint8).reshape(image.shape)


#: Stain normalisers by name (``none`` = identity): ``fn(image (H, W, 3) uint8) -> same shape``.
STAIN_NORMALIZERS = {
    "none": lambda image: image,
    "macenko": macenko_normalize,
}

#: The same normalisers on ``(H, W, 3)`` uint8 tensors, computed on the tensor's device.
STAIN_NORMALIZERS_TENSOR = {
    "none": lambda image: image,
    "macenko": macenko_normalize_tensor,
}
