"""Point features of a dataset, extracted once and cached on disk.

Each image is encoded once (:class:`~denuc.query.PointFeaturizer`) and queried at its
ground-truth points and, optionally, at a detector's points (both sets come out of the same
pass). Results are cached as ``.npz`` under ``cache_dir`` (default ``~/.cache/denuc``,
env ``DENUC_CACHE``) with a key over everything that changes the features: encoder name,
weights hash (and variant), input normalisation, dataset path, a content hash of its labels,
a content hash of its image files (sha256 of their bytes: a replaced image is a new key), the
image stems, working mpp, window/stride, align mode, input size and (for detected points) the
detector identity.
Files are written atomically (temporary file + rename). A cache file that cannot be read
(truncated, corrupt, inconsistent) is a miss: it is reported, deleted and re-extracted.
While an extraction runs, each image's features are also kept as soon as they are computed
(:class:`ImageParts`, under ``features/parts/<key>/``): an interrupted run (Ctrl-C, a killed
job) resumes at the first image it had not finished; the folder goes once the whole result is
cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from denuc.core.files import atomic_target
from denuc.core.result import Nuclei
from denuc.data.base import PointDataset
from denuc.data.stain import STAIN_SPACES, stain_jitter
from denuc.errors import InputError
from denuc.query.predictor import PointFeaturizer

#: ``detect(image (H, W, 3) uint8, mpp) -> Nuclei`` (points in image px).
DetectFn = Callable[[np.ndarray, float], Nuclei]


@dataclass
class PointFeatures:
    """Features at the points of several images, concatenated.

    Attributes:
        feats: ``(N, C)`` float16 features.
        labels: ``(N,)`` int64 class ids (GT points) or ``-1`` (detected points).
        image: ``(N,)`` int32 index into ``stems``.
        xy: ``(N, 2)`` float64 (x, y) in pixels of each image at its own mpp.
        scores: ``(N,)`` float32 detection scores (ones for GT points).
        stems: image stems; ``mpps``: µm/px of each image.
    """

    feats: np.ndarray
    labels: np.ndarray
    image: np.ndarray
    xy: np.ndarray
    scores: np.ndarray
    stems: list[str]
    mpps: list[float]

    def __len__(self) -> int:
        return len(self.labels)

    def save(self, path: Path) -> None:
        with atomic_target(path, suffix=".npz") as tmp:
            np.savez(tmp, feats=self.feats, labels=self.labels, image=self.image, xy=self.xy, scores=self.scores,
                     stems=np.array(json.dumps(self.stems)), mpps=np.array(self.mpps, dtype=np.float64))

    @classmethod
    def load(cls, path: Path) -> PointFeatures:
        """Read a file written by :meth:`save`; :class:`InputError` if it is unreadable or inconsistent."""
        try:
            with np.load(path, allow_pickle=False) as z:
                out = cls(z["feats"], z["labels"], z["image"], z["xy"], z["scores"], json.loads(str(z["stems"])),
                          z["mpps"].tolist())
        except Exception as e:  # noqa: BLE001 - zipfile, zlib, numpy and json raise many types on a bad file
            raise InputError(f"{path}: unreadable point-feature file ({type(e).__name__}: {e})") from None
        n = len(out.labels)
        if (out.feats.ndim != 2 or len(out.feats) != n or out.image.shape != (n,) or out.xy.shape != (n, 2)
                or out.scores.shape != (n,) or len(out.mpps) != len(out.stems)
                or (n and not 0 <= int(out.image.min()) <= int(out.image.max()) < len(out.stems))):
            raise InputError(f"{path}: inconsistent point-feature file (array shapes do not agree)")
        return out

    def subset(self, stems: Sequence[str]) -> PointFeatures:
        """Only the points of ``stems`` (re-indexed)."""
        keep_idx = [self.stems.index(s) for s in stems]
        remap = np.full(len(self.stems), -1, dtype=np.int32)
        remap[keep_idx] = np.arange(len(keep_idx), dtype=np.int32)
        m = remap[self.image] >= 0
        return PointFeatures(self.feats[m], self.labels[m], remap[self.image[m]], self.xy[m], self.scores[m],
                             list(stems), [self.mpps[i] for i in keep_idx])

    def nuclei(self, stem: str, class_ids: np.ndarray | None, class_names: Sequence[str],
               probs: np.ndarray | None = None) -> Nuclei:
        """The points of ``stem`` as :class:`Nuclei` with the given per-point classes (all points' arrays)."""
        i = self.stems.index(stem)
        m = self.image == i
        return Nuclei(self.xy[m], self.scores[m], None if class_ids is None else class_ids[m], tuple(class_names),
                      None if probs is None else probs[m], self.mpps[i], None, stem)


def concat_features(parts: Sequence[PointFeatures]) -> PointFeatures:
    """Stack point sets (e.g. plain + augmented passes); stems of later parts get ``#<k>``."""
    stems, mpps, imgs, off = [], [], [], 0
    for k, p in enumerate(parts):
        stems += [s if k == 0 else f"{s}#{k}" for s in p.stems]
        mpps += list(p.mpps)
        imgs.append(p.image + off)
        off += len(p.stems)
    return PointFeatures(np.concatenate([p.feats for p in parts]), np.concatenate([p.labels for p in parts]),
                         np.concatenate(imgs).astype(np.int32), np.concatenate([p.xy for p in parts]),
                         np.concatenate([p.scores for p in parts]), stems, mpps)


def default_cache_dir() -> Path:
    return Path(os.environ.get("DENUC_CACHE") or Path.home() / ".cache" / "denuc")


def check_writable_dir(folder: Path, what: str) -> None:
    """Raise :class:`InputError` unless files can be created in ``folder`` (or, where it does not
    exist yet, in its nearest existing ancestor, under which it would be created).

    Probes by creating and deleting a temporary file, so read-only mounts, permissions and
    ACLs are all caught (``os.access`` misses some). ``what`` names the option in the message.
    """
    a = Path(folder)
    while not a.exists() and a.parent != a:
        if a.is_symlink():  # a dangling link cannot be created through
            raise InputError(f"{what}: {a} is a broken symbolic link")
        a = a.parent
    if not a.is_dir():
        raise InputError(f"{what}: {a} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=a):
            pass
    except OSError as e:
        raise InputError(f"{what}: cannot write in {a} ({e.strerror or e})") from None


#: (resolved path, size, mtime_ns) -> sha256 of an image file, so one process hashes each file once.
_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _image_sha256(path: Path) -> str:
    from denuc.encode.weights import file_sha256

    try:
        st = path.stat()
    except OSError as e:
        raise InputError(f"{path}: cannot read the image ({e.strerror or e})") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = file_sha256(path)
    return _FILE_HASHES[key]


def images_hash(ds: PointDataset, stems: Sequence[str]) -> str:
    """sha256 over the sha256 of each image file's bytes of ``stems`` (order as given).

    About 0.35 ms per MB once the files are in the page cache (the 90 BRCA-M2C train+val
    images, 45 MB: 32-45 ms), memoised per (path, size, mtime) within a process.
    """
    h = hashlib.sha256()
    for s in stems:
        h.update(s.encode())
        h.update(_image_sha256(Path(ds.image_path(s))).encode())
    return h.hexdigest()


def labels_hash(ds: PointDataset, stems: Sequence[str]) -> str:
    """sha256 over the parsed labels (xy, class ids, classes, mpp) of ``stems``."""
    h = hashlib.sha256(json.dumps(list(ds.classes)).encode())
    for s in stems:
        pts = ds.points(s)
        h.update(s.encode())
        h.update(np.ascontiguousarray(pts.xy, dtype=np.float64).tobytes())
        ids = pts.class_ids if pts.class_ids is not None else np.zeros(0, np.int64)
        h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
        h.update(repr(ds.mpp_of(s)).encode())
    return h.hexdigest()


def cache_key(fz: PointFeaturizer, ds: PointDataset, stems: Sequence[str], points: str) -> tuple[str, dict[str, object]]:
    """``(hex key, the dict it hashes)``; ``points`` is ``gt`` or ``det:<detector id>``."""
    desc: dict[str, object] = {
        "encoder": fz.encoder.name, "weights": fz.encoder.weights_hash, "dim": fz.encoder.dim, **fz.encoder.variant(),
        "input_mean": list(fz.encoder.spec.mean), "input_std": list(fz.encoder.spec.std),
        "dataset": str(Path(ds.root).resolve()), "labels": labels_hash(ds, stems), "images": images_hash(ds, stems),
        "stems": list(stems),
        "points": points, **fz.geometry(),
        # bf16 (CUDA default) and fp32 features differ slightly: never reuse one as the other
        "precision": str(fz.autocast_dtype or torch.float32).replace("torch.", ""),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:32], desc


def _extract(fz: PointFeaturizer, ds: PointDataset, stems: Sequence[str], want_gt: bool,
             detect: DetectFn | None, log: Callable[[str], None],
             transform: Callable[[np.ndarray, int], np.ndarray] | None = None,
             parts: ImageParts | None = None) -> dict[str, PointFeatures]:
    """Features of ``stems`` (``transform(image, position in stems)`` applied first, if given).
    In a data-parallel run (:mod:`denuc.train.distributed`) every process encodes its share of
    the images and all get the whole result, the same as one process extracting everything.
    With ``parts`` (one process only) each image's features are kept on disk as soon as they
    are computed, and images already there are not encoded again."""
    from denuc.train.distributed import current

    ctx = current()
    if ctx.active:
        from denuc.train.distributed import extract_shared

        return extract_shared(lambda mine, pos: _extract_images(fz, ds, mine, want_gt, detect, log, transform, pos),
                              stems, [ds.mpp_of(s) for s in stems], ctx)
    return _extract_images(fz, ds, stems, want_gt, detect, log, transform, parts=parts)


class ImageParts:
    """Per-image features of one extraction, kept in a folder while it runs, so that an
    interrupted extraction (Ctrl-C, a killed job) resumes where it stopped.

    ``<folder>/<position>.npz`` holds, for each point set ``kind`` (``gt``, ``det``), the
    arrays ``<kind>.feats`` (float16), ``<kind>.labels``, ``<kind>.xy`` and ``<kind>.scores``
    of the image at that position of ``stems``, plus its stem; files are written atomically.
    The folder's name is the cache key of the whole extraction (it covers the image and label
    contents), so a part is only reused for the same images, labels, encoder and settings. The
    folder is removed once the whole result is cached.
    """

    def __init__(self, folder: Path, kinds: Sequence[str]) -> None:
        self.folder = folder
        self.kinds = tuple(kinds)

    def _path(self, i: int) -> Path:
        return self.folder / f"{i}.npz"

    def load(self, i: int, stem: str, dim: int) -> dict[str, tuple[np.ndarray, ...]] | None:
        """``{kind: (feats, labels, xy, scores)}`` of image ``i`` if kept (and readable), else None."""
        p = self._path(i)
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                if str(z["stem"]) != stem:
                    return None
                out = {k: (z[f"{k}.feats"].reshape(-1, dim), z[f"{k}.labels"], z[f"{k}.xy"].reshape(-1, 2),
                           z[f"{k}.scores"]) for k in self.kinds}
        except Exception:  # noqa: BLE001 - a truncated or foreign file is a miss: the image is encoded again
            return None
        return out

    def save(self, i: int, stem: str, sets: dict[str, tuple[np.ndarray, ...]]) -> None:
        """Keep image ``i``'s features (a failure to write only warns: they are in memory)."""
        arrays = {f"{k}.{name}": a for k, v in sets.items() for name, a in zip(("feats", "labels", "xy", "scores"), v,
                                                                                 strict=True)}
        try:
            with atomic_target(self._path(i), suffix=".npz") as tmp:
                np.savez(tmp, stem=np.array(stem), **arrays)
        except OSError as e:
            warnings.warn(f"{self.folder}: could not keep per-image features ({e.strerror or e})", stacklevel=3)

    def remove(self) -> None:
        """Delete the folder (its content is in the whole-extraction cache file now)."""
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _extract_images(fz: PointFeaturizer, ds: PointDataset, stems: Sequence[str], want_gt: bool,
                    detect: DetectFn | None, log: Callable[[str], None],
                    transform: Callable[[np.ndarray, int], np.ndarray] | None = None,
                    positions: Sequence[int] | None = None, parts: ImageParts | None = None
                    ) -> dict[str, PointFeatures]:
    """:func:`_extract` in this process; ``positions``: each stem's position for ``transform``
    (default: its index in ``stems``); ``parts``: per-image features kept on disk (reused, and
    written as each image is done)."""
    collected: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]]] = {"gt": [], "det": []}
    t0 = time.perf_counter()
    n_kept = 0
    for i, s in enumerate(stems):
        kept = parts.load(i, s, fz.encoder.dim) if parts is not None else None
        if kept is not None:
            for kind, (f, lab, xy, sc) in kept.items():
                collected[kind].append((f, lab, xy, sc, i))
            n_kept += 1
            continue
        sample = ds.load(s)
        if transform is not None:
            sample.image = transform(sample.image, i if positions is None else positions[i])
        fz.set_image(sample.image, sample.mpp)
        sets: dict[str, Nuclei] = {}
        if want_gt:
            sets["gt"] = sample.points
        if detect is not None:
            det = detect(sample.image, sample.mpp)
            h, w = sample.image.shape[:2]
            sets["det"] = det.select(det.inside(h, w))
        # one query for both point sets: a streamed image (larger than the map cache) is encoded once
        every = fz.features_at(np.concatenate([p.xy.reshape(-1, 2) for p in sets.values()]) if sets
                               else np.zeros((0, 2))).cpu().numpy().astype(np.float16)
        offsets = np.cumsum([0] + [len(p) for p in sets.values()])
        mine: dict[str, tuple[np.ndarray, ...]] = {}
        for (kind, pts), a, b in zip(sets.items(), offsets[:-1], offsets[1:], strict=True):
            f = every[a:b]
            lab = pts.class_ids if (kind == "gt" and pts.class_ids is not None) else np.full(len(pts), -1)
            sc = pts.scores if pts.scores is not None else np.ones(len(pts), np.float32)
            mine[kind] = (f, lab.astype(np.int64), np.asarray(pts.xy, np.float64).reshape(-1, 2), sc.astype(np.float32))
            collected[kind].append((*mine[kind], i))
        if parts is not None:
            parts.save(i, s, mine)
        if (i + 1) % 10 == 0 or i + 1 == len(stems):
            kept_note = f" ({n_kept} kept from an interrupted run)" if n_kept else ""
            log(f"  features: {i + 1}/{len(stems)} images{kept_note}, {fz.n_encoded} windows, "
                f"{time.perf_counter() - t0:.0f} s")
    out = {}
    mpps = [ds.mpp_of(s) for s in stems]
    for kind, lst in collected.items():
        if not lst:
            continue
        out[kind] = PointFeatures(
            np.concatenate([p[0] for p in lst]).reshape(-1, fz.encoder.dim), np.concatenate([p[1] for p in lst]),
            np.concatenate([np.full(len(p[1]), p[4], np.int32) for p in lst]), np.concatenate([p[2] for p in lst]),
            np.concatenate([p[3] for p in lst]), list(stems), mpps)
    return out


def cached_features(fz: PointFeaturizer, ds: PointDataset, stems: Sequence[str], *, gt: bool = True,
                    detect: DetectFn | None = None, detector_id: str = "", cache_dir: Path | None = None,
                    use_cache: bool = True, log: Callable[[str], None] = print) -> dict[str, PointFeatures]:
    """Features at GT points (``"gt"``) and/or detected points (``"det"``) of ``stems``.

    Loads what is cached; extracts the rest in one pass over the images (each image encoded
    once for both point sets) and caches it. ``use_cache=False`` neither reads nor writes the
    cache (an encoder being fine-tuned changes under the same name and weights hash).
    """
    if not use_cache:
        return _extract(fz, ds, stems, gt, detect, log)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    wanted = (["gt"] if gt else []) + (["det"] if detect is not None else [])
    paths = {k: root / "features" / f"{cache_key(fz, ds, stems, 'gt' if k == 'gt' else f'det:{detector_id}')[0]}.npz"
             for k in wanted}
    out = {k: f for k, p in paths.items() if (f := _load_cached(p, fz.encoder.dim, stems)) is not None}
    todo = _agree([k for k in wanted if k not in out], wanted)
    if todo:
        log(f"extracting {'+'.join(todo)} point features of {len(stems)} images with {fz.encoder.name} "
            f"({fz.mpp} µm/px, window {fz.window}/{fz.stride}, align {fz.align})")
        parts = _parts_for([paths[k] for k in todo], todo)
        new = _extract(fz, ds, stems, "gt" in todo, detect if "det" in todo else None, log, parts=parts)
        for k in todo:
            if _writes_cache():
                _save_cached(new[k], paths[k])
            out[k] = new[k]
        if parts is not None and all(paths[k].is_file() for k in todo):
            parts.remove()
    else:
        log(f"using cached point features ({', '.join(str(p) for p in paths.values())})")
    return out


def _load_cached(path: Path, dim: int, stems: Sequence[str]) -> PointFeatures | None:
    """The cached features at ``path``; None when absent, or (with a warning, file deleted)
    when unreadable or not features of ``stems`` with ``dim`` channels: a miss, re-extracted."""
    if not path.is_file():
        return None
    try:
        f = PointFeatures.load(path)
        if f.feats.shape[1] != dim or list(f.stems) != list(stems):
            raise InputError(f"{path}: cached features do not fit ({f.feats.shape[1]} channels, {len(f.stems)} images)")
    except InputError as e:
        warnings.warn(f"ignoring a bad feature-cache file, re-extracting: {e}", stacklevel=3)
        try:
            path.unlink()
        except OSError:
            pass  # rewritten atomically after extraction anyway
        return None
    return f


def _save_cached(feats: PointFeatures, path: Path) -> None:
    """Write a cache entry; a failure (disk full, permissions) only warns: the features are in memory."""
    try:
        feats.save(path)
    except OSError as e:
        warnings.warn(f"{path}: could not write the feature cache ({e.strerror or e}); continuing without it",
                      stacklevel=3)


def augmented_gt_features(fz: PointFeaturizer, ds: PointDataset, stems: Sequence[str], n_aug: int, *,
                          seed: int = 0, strength: float = 0.1, space: str = "od", cache_dir: Path | None = None,
                          log: Callable[[str], None] = print) -> list[PointFeatures]:
    """``n_aug`` extra passes of GT features over stain-jittered images (:func:`stain_jitter`
    with ``strength`` and ``space``), each cached (key adds pass index, seed, strength and, for
    ``space != "od"``, the space). Pass ``k`` of image ``i`` uses ``default_rng([seed, k, i])``,
    so the set is reproducible."""
    if space not in STAIN_SPACES:
        raise InputError(f"stain jitter space must be one of {list(STAIN_SPACES)}; got {space!r}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    tag = "" if space == "od" else f":{space}"
    out = []
    for k in range(n_aug):
        path = root / "features" / f"{cache_key(fz, ds, stems, f'gt-stain:{k}:{seed}:{strength}{tag}')[0]}.npz"
        cached = _load_cached(path, fz.encoder.dim, stems)
        if not _agree([] if cached is not None else ["pass"], ["pass"]):  # no process missed it
            assert cached is not None
            out.append(cached)
            continue
        log(f"extracting stain-jittered ({space}, strength {strength}) GT features, pass {k + 1}/{n_aug}")
        parts = _parts_for([path], ["gt"])
        feats = _extract(fz, ds, stems, True, None, log, transform=lambda img, i, k=k: stain_jitter(
            img, np.random.default_rng([seed, k, i]), strength, space), parts=parts)["gt"]
        if _writes_cache():
            _save_cached(feats, path)
        if parts is not None and path.is_file():
            parts.remove()
        out.append(feats)
    return out


def _parts_for(paths: Sequence[Path], kinds: Sequence[str]) -> ImageParts | None:
    """The per-image folder of an extraction that will be cached at ``paths`` (one process only:
    in a data-parallel run each rank holds only its share; None there)."""
    from denuc.train.distributed import current

    if current().active:
        return None
    name = "+".join(p.name.removesuffix(".npz") for p in paths)
    return ImageParts(paths[0].parent / "parts" / name, kinds)


def _agree(todo: list[str], wanted: Sequence[str]) -> list[str]:
    """The entries of ``wanted`` that some process of a data-parallel run must extract (its
    cache missed them): all processes then extract them together. ``todo`` with one process."""
    from denuc.train.distributed import all_gather_objects, current

    ctx = current()
    if not ctx.active:
        return todo
    need = {k for part in all_gather_objects(todo, ctx) for k in part}
    return [k for k in wanted if k in need]


def _writes_cache() -> bool:
    """This process writes cache files: the only one, or the first on its host (hosts may have
    separate caches; identical atomic writes to a shared one are harmless)."""
    from denuc.train.distributed import current

    return current().local_rank == 0
