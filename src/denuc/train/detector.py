"""Training loop of the DeNuC point detector (``denuc train-detector``).

Data: any mix of dataset folders (:func:`denuc.data.base.open_dataset`), every image and
its points resampled to one training resolution ``mpp`` (µm/px). An epoch draws
``ceil(H * W / crop²)`` augmented random crops per training image, prepared by ``workers``
processes when set (each crop has its own seed, so results do not depend on the count).
Class-agnostic by default (every point is a "nucleus"); ``classes=True`` keeps the datasets'
classes (union of their vocabularies) for an end-to-end joint detector-classifier.

Optimisation: AdamW (lr 1e-3, wd 1e-4, no decay on biases and norm weights), per-step
cosine from ``lr`` to ``min_lr``, AMP on CUDA only. After every epoch: val detection F1
(denuc protocol, radius ``val_radius_um``) at several score thresholds; ``last`` and
``best`` checkpoints (safetensors + metadata) and ``state.pt`` (optimizer, step, RNGs) for
``resume`` (bit-exact on the CPU; on CUDA up to its non-deterministic kernels); one JSON line
per epoch in ``log.jsonl``.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.data

from denuc.core.checks import check_int, check_number
from denuc.core.device import pick_device  # noqa: F401  (also imported from here by older callers)
from denuc.core.files import atomic_write_text, check_out_dir, removed_if_failed
from denuc.core.mpp import check_mpp
from denuc.core.result import Nuclei
from denuc.data.stain import STAIN_SPACES
from denuc.detect.checkpoint import save_detector
from denuc.detect.model import DetectorConfig, PointDetector, build_detector, normalise
from denuc.detect.windows import MARGIN, STRIDE, WINDOW, RawDetections, detect_images
from denuc.errors import InputError, ModelError
from denuc.train.augment import AugmentConfig, augment
from denuc.train.detector_config import RUN_INDEPENDENT, SHIPPED, TrainConfig
from denuc.train.distributed import (
    DistContext,
    all_gather_objects,
    all_reduce_sum,
    barrier,
    batch_share,
    check_replicas,
    per_rank_batch,
    sum_across,
    wrap_ddp,
)

#: Files of a training run in its output folder (a new run refuses a folder holding any of them).
RUN_FILES = ("state.pt", "best.safetensors", "last.safetensors", "log.jsonl")

THRESHOLDS = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


@dataclass
class Item:
    """One image at the training mpp with its points and labels."""

    stem: str
    image: np.ndarray
    xy: np.ndarray
    labels: np.ndarray
    gt: Nuclei


def load_items(paths: Sequence[str], split: str, mpp: float, keep_classes: bool,
               vocab: tuple[str, ...] | None = None, limit: int = 0, *, data_mpp: float | None = None,
               outside: str = "error", val_fraction: float = 0.0, seed: int = 0
               ) -> tuple[list[Item], tuple[str, ...]]:
    """Images of ``split`` (``train`` or ``val``) of every dataset, resampled to ``mpp``; labels
    index ``vocab`` (union of the datasets' classes when ``keep_classes``, else
    ``("nucleus",)``; -1 = an unclassified point, a nucleus of unknown class). Items are named
    ``"{dataset index}/{folder name}/{stem}"``.

    Splits as :func:`denuc.data.splits.train_val_stems` makes them: a dataset without a val
    split gives ``val_fraction`` of its training images (by image, seeded) to val.
    ``data_mpp`` and ``outside`` are passed to :func:`denuc.data.base.open_training_dataset`.
    """
    from denuc.data.base import open_training_dataset
    from denuc.data.resample import resample, resample_factor
    from denuc.data.splits import train_val_stems

    dsets = [open_training_dataset(p, mpp=data_mpp, outside=outside) for p in paths]
    if vocab is None:
        vocab = tuple(dict.fromkeys(c for d in dsets for c in d.classes)) if keep_classes else ("nucleus",)
    items: list[Item] = []
    for di, d in enumerate(dsets):
        tr, va, _ = train_val_stems(d, val_fraction, seed)
        stems = {"train": tr, "val": va}[split]
        if limit and split == "train":
            stems = stems[:limit]
        for stem in stems:
            s = d.load(stem)
            img = resample(s.image, resample_factor(s.mpp, mpp))
            pts = s.points.rescale(mpp)
            pts.image_size = img.shape[:2]
            pts = pts.select(pts.inside(*img.shape[:2]))
            if keep_classes:
                gt = pts.with_classes(vocab)
                labels = gt.class_ids
            else:
                gt = Nuclei(pts.xy, class_ids=np.zeros(len(pts), np.int64), class_names=vocab, mpp=mpp,
                            image_size=pts.image_size, name=stem)
                labels = gt.class_ids
            # keyed by dataset index too: two datasets may share a folder name (site1/x, site2/x)
            gt.mpp, gt.name = mpp, f"{di}/{Path(d.root).name}/{stem}"
            items.append(Item(gt.name, img, gt.xy.copy(), np.asarray(labels, np.int64), gt))
    return items, vocab


class CropSource(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Augmented training crops addressed by ``(item index, epoch, position in the epoch)``.

    Each crop draws from its own generator seeded with ``(seed, epoch, position)``, so a crop
    is the same whichever process makes it and in whatever order: training does not depend
    on the number of loader workers, and a resumed run repeats the crops of the epochs it redoes.
    """

    def __init__(self, items: list[Item], aug: AugmentConfig, seed: int) -> None:
        self.items, self.aug, self.seed = items, aug, seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        i, epoch, pos = key
        it = self.items[i]
        rng = np.random.default_rng((self.seed, epoch, pos))
        return augment(it.image, it.xy, it.labels, self.aug, rng)


def _as_list(batch: list[Any]) -> list[Any]:
    return batch


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def crop_batches(source: CropSource, order: np.ndarray, epoch: int, batch_size: int, steps: int,
                 workers: int, share: Callable[[list[tuple[int, int, int]]], list[tuple[int, int, int]]] | None = None
                 ) -> Any:
    """Iterator over ``steps`` batches (lists of ``(crop, xy, labels)``) of the crops ``order``
    (item indices) of ``epoch``, prepared by ``workers`` processes (0 = here). ``share``: this
    process's part of each global batch (data-parallel training; all of it by default)."""
    keys = [(int(i), epoch, pos) for pos, i in enumerate(order)]
    chunks = [keys[b * batch_size:(b + 1) * batch_size] for b in range(steps)]
    if share is not None:
        chunks = [share(c) for c in chunks]
    if workers <= 0:
        return ([source[k] for k in chunk] for chunk in chunks)
    return iter(torch.utils.data.DataLoader(source, batch_sampler=chunks, num_workers=workers,
                                            collate_fn=_as_list, worker_init_fn=_one_thread,
                                            prefetch_factor=4))


def train_step(model: PointDetector, batch: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
               opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, lr: float,
               device: torch.device, parallel: DataParallelStep | None = None) -> dict[str, torch.Tensor]:
    """One optimisation step on a batch of ``(crop (S, S, 3) uint8, xy (n, 2) crop px, labels (n,))``.

    Sets every parameter group's learning rate to ``lr``; autocast (AMP) when ``scaler`` is
    enabled. Returns the model's loss dict (tensors on ``device``, not synchronised).
    ``parallel``: ``batch`` is this rank's share (possibly empty) of a global batch; the step
    goes through the DDP wrapper and the losses returned are this rank's shares.
    """
    imgs, targets = [], []
    for im, xy, lab in batch:
        imgs.append(im)
        targets.append({"points": torch.as_tensor(xy, dtype=torch.float32, device=device),
                        "labels": torch.as_tensor(lab, dtype=torch.long, device=device)})
    if imgs:
        x = normalise(np.stack(imgs), model.config.mean, model.config.std, device)
    else:  # an empty share of a short last batch: takes part in the collective step with nothing
        assert parallel is not None, "empty batch"
        x = torch.zeros((0, 3, parallel.crop, parallel.crop), device=device)
    for g in opt.param_groups:
        g["lr"] = lr
    with torch.autocast(device.type, enabled=scaler.is_enabled()):
        if parallel is None:
            losses = model(x, targets)
        else:
            losses = parallel.net(x, targets, sum_across=parallel.sum_across)
    opt.zero_grad(set_to_none=True)
    if parallel is None:
        scaler.scale(losses["loss"]).backward()
    else:  # DDP averages the ranks' gradients; the shares' gradients must add up
        scaler.scale(losses["loss"] * parallel.world).backward()
    scaler.step(opt)
    scaler.update()
    return losses


@dataclass
class DataParallelStep:
    """How :func:`train_step` runs as one rank of a data-parallel run: ``net`` is the
    DDP-wrapped model, ``sum_across`` sums loss normalisers over the ``world`` ranks, ``crop``
    the crop side (for an empty share)."""

    net: torch.nn.Module
    sum_across: Callable[[torch.Tensor], torch.Tensor]
    world: int
    crop: int


def auto_workers(workers: int, device: torch.device) -> int:
    """Loader processes for ``workers`` (-1 = automatic: on CUDA up to 4, leaving one core to the
    training process; none elsewhere, where the crops compete with the CPU training itself).

    Four workers fed an H100 about 3.4x the crops/s of none (``benchmarks/detector_train_speed.py``);
    eight were no faster.
    """
    if workers >= 0:
        return workers
    import os

    return max(0, min(4, (os.cpu_count() or 1) - 1)) if device.type == "cuda" else 0


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on biases and 1-d (norm) parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(step: int, total: int, lr: float, min_lr: float) -> float:
    """Cosine decay from ``lr`` (step 0) to ``min_lr`` (step ``total``)."""
    t = min(step / max(total, 1), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def val_scores(gt: dict[str, Nuclei], pred: dict[str, RawDetections], mpp: float, radius_um: float,
               thresholds: Sequence[float], class_names: tuple[str, ...]) -> dict[float, tuple[float, float]]:
    """Pooled ``(detection F1, mean class F1)`` per score threshold (denuc protocol,
    ``radius_um`` µm); the class F1 is 0 for a class-agnostic model."""
    from denuc.evaluate.api import evaluate

    classes = class_names if len(class_names) > 1 else ()
    out = {}
    for t in thresholds:
        pm = {}
        for k, r in pred.items():
            f = r.filter(t)
            pm[k] = Nuclei(f.xy, f.scores, f.labels, class_names, mpp=mpp, name=k)
        rep = evaluate(gt, pm, protocol="denuc", radius_um=radius_um, classes=classes)
        out[float(t)] = (rep.detection.f1, rep.mean_f1 if classes else 0.0)
    return out


def _rng_state(np_rng: np.random.Generator) -> dict[str, Any]:
    st = {"torch": torch.get_rng_state(), "numpy": json.dumps(np_rng.bit_generator.state),
          "python": json.dumps(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return st


def _set_rng_state(state: dict[str, Any], np_rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(list(cuda))
    np_rng.bit_generator.state = json.loads(state["numpy"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def check_config(cfg: TrainConfig) -> None:
    """Raise :class:`InputError` (or :class:`~denuc.errors.ResolutionError` for the mpp) for a
    setting that cannot train, before any work."""
    if not cfg.datasets:
        raise InputError("no training datasets given")
    if not isinstance(cfg.datasets, (list, tuple)) or not all(isinstance(p, str) and p for p in cfg.datasets):
        raise InputError(f"datasets must be a list of folder paths; got {cfg.datasets!r}")
    check_mpp(cfg.mpp, "training mpp (--work-mpp)")
    if cfg.loss_ref_mpp != 0:
        check_mpp(cfg.loss_ref_mpp, "loss reference mpp (--loss-ref-mpp; 0 = training px)")
    check_int(cfg.epochs, 1, "epochs (--epochs)")
    check_int(cfg.batch_size, 1, "batch size (--batch-size)")
    # any size >= one 32-px padding unit works (the model pads to multiples of 32 px); multiples of
    # 32 waste nothing
    check_int(cfg.crop, 32, "crop size in px (--crop)")
    check_int(cfg.stop_after, 0, "stop after N epochs (--stop-after; 0 = run to the end)")
    check_int(cfg.max_train_images, 0, "max train images (--max-train-images; 0 = all)")
    check_int(cfg.neck_width, 0, "neck width (--neck-width; 0 = the backbone's default)")
    check_int(cfg.seed, 0, "seed (--seed)")
    check_int(cfg.threads, 0, "threads (--threads; 0 = torch default)")
    check_number(cfg.lr, "learning rate (--lr)", low=0.0)
    check_number(cfg.min_lr, "final learning rate (--min-lr)", low=0.0)
    check_number(cfg.weight_decay, "weight decay (--weight-decay)", low=0.0)
    check_number(cfg.crops_per_epoch, "crops per epoch (--crops-per-epoch)", low=0.0, low_open=True)
    check_number(cfg.offset_weight, "offset weight (--offset-weight)", low=0.0)
    check_number(cfg.bg_weight, "background weight (--bg-weight)", low=0.0, low_open=True)
    check_number(cfg.val_radius_um, "val matching radius in µm (--val-radius-um)", low=0.0, low_open=True)
    check_number(cfg.nms_radius_um, "NMS radius in µm (--nms-radius-um)", low=0.0)
    check_number(cfg.score_threshold, "score threshold (--score-threshold)", low=0.0, high=1.0)
    if cfg.workers < -1:
        raise InputError(f"workers must be >= 0, or -1 for automatic; got {cfg.workers}")
    if cfg.stain_space not in STAIN_SPACES or not 0.0 <= cfg.stain_p <= 1.0 or not 0.0 <= cfg.stain_strength < 1.0:
        raise InputError(f"stain jitter needs stain_p in [0, 1], stain_strength in [0, 1) and stain_space in "
                         f"{list(STAIN_SPACES)}; got {cfg.stain_p}, {cfg.stain_strength}, {cfg.stain_space!r}")
    if cfg.resume and cfg.overwrite:
        raise InputError("--resume continues the run in --out and --overwrite deletes it: give one of them")
    check_number(cfg.val_fraction, "held-back val share (--val-fraction)", low=0.0, high=0.5 + 1e-9)
    from denuc.data.base import OUTSIDE_POLICIES, open_training_dataset

    if cfg.outside not in OUTSIDE_POLICIES:
        raise InputError(f"--outside must be one of {list(OUTSIDE_POLICIES)}; got {cfg.outside!r}")
    seen: dict[Path, str] = {}
    for p in cfg.datasets:
        r = Path(p).resolve()
        if r in seen:
            raise InputError(f"dataset folder {r} is given twice (as {seen[r]!r} and {p!r}); give each dataset once")
        seen[r] = p
    for p in cfg.datasets:  # cheap (index files only): a missing or unreadable dataset fails before --out exists
        open_training_dataset(p, mpp=cfg.data_mpp, outside=cfg.outside)
    check_init(cfg)


def init_path(init: str) -> Path | None:
    """The checkpoint of ``TrainConfig.init``: None for ``""``, the shipped detector for ``"shipped"``."""
    if not init:
        return None
    if init == SHIPPED:
        from denuc.detect.api import default_detector_path

        return default_detector_path()
    return Path(init)


def check_init(cfg: TrainConfig) -> None:
    """Refuse an ``init`` checkpoint that is missing or of another backbone, before any work."""
    from denuc.detect.checkpoint import read_meta

    p = init_path(cfg.init)
    if p is None:
        return
    if not p.is_file():
        raise ModelError(f"--init {p}: detector checkpoint not found")
    arch = read_meta(p).get("config", {})
    if arch.get("backbone") != cfg.backbone:
        what = "the shipped detector" if cfg.init == SHIPPED else str(p)
        raise InputError(f"--init {cfg.init}: {what} has backbone {arch.get('backbone')} but --backbone is "
                         f"{cfg.backbone}; pass --backbone {arch.get('backbone')}, or --init '' to start from the "
                         "backbone's ImageNet weights (as --preset quick does)")


def load_init(model: PointDetector, path: Path) -> str:
    """Copy the weights of the detector checkpoint ``path`` into ``model`` (same architecture).

    A class-agnostic checkpoint may initialise a class-aware model (``classes``): every class
    starts as the checkpoint's "nucleus" with its bias lowered by ``log K``, so the K class
    logits together give the same background probability as before. Returns what was done,
    for the log; :class:`ModelError` when the weights do not fit.
    """
    from safetensors.torch import load_file

    try:
        sd = load_file(str(path))
    except (OSError, RuntimeError) as e:
        raise ModelError(f"{path}: cannot initialise the detector from it ({e})") from None
    note = ""
    k = model.config.num_classes
    w, b = sd.get("head.cls.weight"), sd.get("head.cls.bias")
    if w is not None and b is not None and w.shape[0] == 2 and k > 1:
        sd["head.cls.weight"] = torch.cat([w[:1], w[1:2].repeat(k, *([1] * (w.ndim - 1)))])
        sd["head.cls.bias"] = torch.cat([b[:1], b[1:2].repeat(k) - math.log(k)])
        note = f" (its nucleus class copied to the {k} classes)"
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{path}: cannot initialise the detector from it ({e})") from None
    return note


def dataset_ids(paths: Sequence[str]) -> list[str]:
    """Names of the dataset folders for checkpoint metadata: the resolved folder's last
    component, with as many parent components as needed to tell them apart
    (``site1/converted``, ``site2/converted``); never an absolute path."""
    parts = [Path(p).resolve().parts[1:] for p in paths]
    for n in range(1, max((len(q) for q in parts), default=1) + 1):
        ids = ["/".join(q[-n:]) for q in parts]
        if len(set(ids)) == len(ids):
            return ids
    return ["/".join(q) for q in parts]


def run_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The options that determine what a run computes (all but :data:`RUN_INDEPENDENT`), with
    dataset folders and the ``init`` checkpoint as resolved paths; stored in ``state.pt``."""
    d = {k: v for k, v in asdict(cfg).items() if k not in RUN_INDEPENDENT}
    d["datasets"] = [str(Path(p).resolve()) for p in cfg.datasets]
    ip = init_path(cfg.init)
    d["init"] = str(ip.resolve()) if ip is not None else ""
    return d


#: Settings added after runs were first stored, with the values that reproduce those runs.
LEGACY_SETTINGS: dict[str, Any] = {"val_fraction": 0.0, "data_mpp": None, "outside": "error"}


def changed_settings(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``"name: old -> new"`` for every setting of ``new`` that differs from ``old`` (a setting
    missing from ``old``, written by an older version, counts as its default)."""
    defaults = {**asdict(TrainConfig()), **LEGACY_SETTINGS}
    out = []
    for k, v in new.items():
        was = old.get(k, defaults.get(k))
        if was != v:
            out.append(f"{k}: {was!r} -> {v!r}")
    return out


def _prepare_out(cfg: TrainConfig, log: Callable[[str], None]) -> tuple[Path, dict[str, Any] | None, list[Path]]:
    """Check the output folder before any slow work: ``(folder, state to resume or None, files
    of an old run to delete before training)``.

    * ``resume`` with ``state.pt``: the state, if its stored settings equal ``cfg``'s (else
      :class:`InputError` listing each change); a state without settings (older versions)
      resumes with a warning.
    * ``resume`` without ``state.pt``: nothing to resume (no epoch finished); says so, deletes
      any files an unfinished run left and starts a new run.
    * a new run in a folder holding a run (:data:`RUN_FILES`): :class:`InputError`, unless
      ``overwrite`` (the old files are then returned for deletion).
    """
    out = check_out_dir(cfg.out)
    state_path = out / "state.pt"
    if cfg.resume and state_path.is_file():
        need = ("model", "optimizer", "step", "epoch", "best_f1", "best_epoch", "history", "rng")
        try:
            st = torch.load(state_path, map_location="cpu", weights_only=True)
            problem = "" if isinstance(st, dict) and all(k in st for k in need) else "entries are missing"
        except Exception as e:  # noqa: BLE001 - torch.load raises many types for a damaged file
            problem = str(e)
        if problem:
            raise ModelError(f"{state_path}: not a readable training state ({problem}); train into a new --out, "
                             "or pass --overwrite instead of --resume to start again there")
        if "config" not in st:
            log(f"warning: {state_path} was written by an older version without its settings: cannot check that "
                "this run's settings are the same; resuming anyway")
        else:
            changes = changed_settings(json.loads(st["config"]), run_settings(cfg))
            if changes:
                hint = (" (the cosine learning-rate schedule spans all epochs, so changing --epochs would change "
                        "the learning rates of the epochs already trained)"
                        if any(c.startswith("epochs:") for c in changes) else "")
                raise InputError(f"--resume: {state_path} was trained with other settings; changed: "
                                 f"{'; '.join(changes)}{hint}. Resume with the same settings, or train into a new "
                                 "--out")
        return out, st, []
    old = [out / f for f in RUN_FILES if (out / f).exists()]
    if cfg.resume:
        # no state: no epoch finished (state.pt is written last), so any run files left are stale
        log(f"--resume: {state_path} does not exist, nothing to resume; starting a new run"
            + (f" (deleting the unfinished run's {', '.join(p.name for p in old)})" if old else ""))
    if old and not (cfg.overwrite or cfg.resume):
        raise InputError(f"--out {out} already holds a training run ({', '.join(p.name for p in old)}): continue it "
                         "with --resume, train into a new --out, or pass --overwrite to delete it and start again")
    tmp = out / "state.tmp"
    return out, None, old + ([tmp] if old and tmp.exists() else [])


def train(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train a detector as configured; returns the summary (best epoch, its selection score
    ``best_score`` and what it is, ``selected_by``; paths).

    Settings, datasets and the output folder are checked before any slow work (see
    :func:`check_config`; a used ``out`` needs ``resume`` or ``overwrite``). The best epoch is
    the one with the highest val detection F1 (val mean class F1 with ``classes``), or, when
    no dataset has a val split, the lowest mean train loss (``best_score`` = minus that loss).
    ``cfg.threads`` (if set) applies to torch's CPU thread pool during the call only.

    Under ``torchrun`` (several processes) the run is data-parallel
    (:mod:`denuc.train.distributed`): ``batch_size`` is the global batch, shared by the
    processes; rank 0 logs and writes; the result is the one-process run's up to float rounding.
    """
    check_config(cfg)
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        with removed_if_failed(cfg.out):  # a run that fails before writing anything leaves no empty --out
            from denuc.train.distributed import distributed, launched_world, main_only_log

            if launched_world()[1] > 1:
                with distributed(pick_device(cfg.device)) as (ctx, device):
                    return _train(cfg, main_only_log(log, ctx), ctx, device)
            return _train(cfg, log, DistContext(), None)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, log: Callable[[str], None], ctx: DistContext, device: torch.device | None
           ) -> dict[str, Any]:
    per_rank = per_rank_batch(cfg.batch_size, ctx.world)
    out, state, stale = _prepare_out(cfg, log)
    if device is None:
        device = pick_device(cfg.device)
    if ctx.active:
        log(f"data-parallel: {ctx.world} processes ({ctx.backend}), {per_rank} of the {cfg.batch_size} crops "
            "of each batch per process")
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)

    t0 = time.time()
    split_kw = {"data_mpp": cfg.data_mpp, "outside": cfg.outside, "val_fraction": cfg.val_fraction, "seed": cfg.seed}
    train_items, vocab = load_items(cfg.datasets, "train", cfg.mpp, cfg.classes, limit=cfg.max_train_images,
                                    **split_kw)
    val_items, _ = load_items(cfg.datasets, "val", cfg.mpp, cfg.classes, vocab=vocab, **split_kw)
    if not train_items:
        raise InputError(f"datasets {cfg.datasets} have no training images")
    log(f"data: {len(train_items)} train / {len(val_items)} val images at {cfg.mpp} µm/px, classes {vocab} "
        f"({time.time() - t0:.1f} s)")
    held = held_back_val(cfg)
    if held:
        log(f"no val split in {', '.join(held)}: {cfg.val_fraction:g} of its train images held back as val "
            f"(by image, seed {cfg.seed})")
    n_unknown = sum(int((it.labels < 0).sum()) for it in train_items)
    if n_unknown:
        log(f"{n_unknown} unclassified training point(s): trained as nuclei of unknown class (no class target)")

    dcfg = DetectorConfig(backbone=cfg.backbone, neck_width=cfg.neck_width, num_classes=len(vocab),
                          class_names=vocab, head_activation=cfg.head_activation, matcher=cfg.matcher,
                          offset_weight=cfg.offset_weight, bg_weight=cfg.bg_weight,
                          length_scale=cfg.mpp / cfg.loss_ref_mpp if cfg.loss_ref_mpp > 0 else 1.0,
                          score_threshold=cfg.score_threshold, nms_radius_px=cfg.nms_radius_um / cfg.mpp)
    ipath = init_path(cfg.init)
    model = build_detector(dcfg, pretrained=cfg.pretrained and ipath is None)
    if ipath is not None:
        note = load_init(model, ipath)
        log(f"initialised from {'the shipped detector' if cfg.init == SHIPPED else ipath}{note}")
    model = model.to(device)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    crops_per_image = [max(1, math.ceil(cfg.crops_per_epoch * it.image.shape[0] * it.image.shape[1] / cfg.crop ** 2))
                       for it in train_items]
    steps_per_epoch = math.ceil(sum(crops_per_image) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    step, start_epoch, best_f1, best_epoch = 0, 0, -math.inf, -1
    history: list[dict[str, Any]] = []
    state_path = out / "state.pt"
    if state is not None:
        st = state
        try:
            model.load_state_dict(st["model"])
            opt.load_state_dict(st["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ModelError(f"{state_path}: its model does not fit this run's settings ({e}); resume with the "
                             "settings it was trained with, or train into a new --out") from None
        if "scaler" in st and use_amp:
            scaler.load_state_dict(st["scaler"])
        step, start_epoch = int(st["step"]), int(st["epoch"])
        best_f1, best_epoch = float(st["best_f1"]), int(st["best_epoch"])
        history = json.loads(st["history"])
        _set_rng_state(st["rng"], np_rng)
        # the log is rewritten from the state: a kill between an epoch's log line and its state
        # left a line the resumed run would repeat
        if ctx.is_main:
            atomic_write_text(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        log(f"resumed from {state_path} at epoch {start_epoch}")
    barrier(ctx)  # every rank has read the state and checked the folder before rank 0 changes it
    if not ctx.is_main:
        stale = []
    for old_file in stale:  # --overwrite: the old run's files go only now that the new run could be set up
        old_file.unlink(missing_ok=True)
    if stale:
        log(f"deleted the previous run's {', '.join(p.name for p in stale)} in {out}")
    settings = json.dumps(run_settings(cfg))

    aug = AugmentConfig(crop=cfg.crop, p_stain=cfg.stain_p, stain_strength=cfg.stain_strength,
                        stain_space=cfg.stain_space)
    source = CropSource(train_items, aug, cfg.seed)
    parallel = None
    if ctx.active:
        parallel = DataParallelStep(wrap_ddp(model, ctx, device), sum_across(ctx), ctx.world,  # type: ignore[arg-type]
                                    cfg.crop)
    workers = auto_workers(cfg.workers, device)
    if cfg.workers < 0:
        log(f"loader workers: {workers} (automatic on {device.type})")
    meta_base = {"mpp": cfg.mpp, "nms_radius_um": cfg.nms_radius_um, "window": WINDOW, "stride": STRIDE,
                 "margin": MARGIN, "datasets": dataset_ids(cfg.datasets), "train": asdict(cfg),
                 "epochs": cfg.epochs}
    last_epoch = cfg.epochs if not cfg.stop_after else min(cfg.epochs, start_epoch + cfg.stop_after)
    for epoch in range(start_epoch, last_epoch):
        model.train()
        order = np.concatenate([np.full(n, i) for i, n in enumerate(crops_per_image)])
        np_rng.shuffle(order)
        # loss sums stay on the device: reading them every step would stall a GPU step by step
        sums = {k: torch.zeros((), device=device) for k in ("loss", "loss_cls", "loss_offset")}
        te = time.time()
        batches = crop_batches(source, order, epoch, cfg.batch_size, steps_per_epoch, workers,
                               share=(lambda c: batch_share(c, ctx, per_rank)) if ctx.active else None)
        if cfg.progress and ctx.is_main:
            from tqdm import tqdm

            batches = tqdm(batches, total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for batch in batches:
            lr = cosine_lr(step, total_steps, cfg.lr, cfg.min_lr)
            losses = train_step(model, batch, opt, scaler, lr, device, parallel)
            step += 1
            for k in sums:
                sums[k] += losses[k].detach().float()
        for k in sums:  # the ranks' shares add up to the global losses
            all_reduce_sum(sums[k], ctx)
        check_replicas(model, ctx)
        rec: dict[str, Any] = {"epoch": epoch + 1, "step": step, "lr": lr, "train_s": round(time.time() - te, 1),
                               **{k: float(v) / steps_per_epoch for k, v in sums.items()}}
        scores = _validate(model, val_items, cfg, vocab, ctx) if val_items else {}
        if scores:
            # class-aware models are selected by mean class F1, class-agnostic ones by detection F1
            key = 1 if cfg.classes else 0
            thr = max(scores, key=lambda t: scores[t][key])
            rec.update({"val_f1": scores[thr][0], "val_threshold": thr,
                        "val_f1_by_threshold": {t: v[0] for t, v in scores.items()}})
            if cfg.classes:
                rec["val_mean_class_f1"] = scores[thr][1]
            score = scores[thr][key]
        else:  # no val split: the lowest train loss is "best"
            thr, score = cfg.score_threshold, -rec["loss"]
        model.config.score_threshold = thr
        meta = {**meta_base, "epoch": epoch + 1, "val_f1": rec.get("val_f1"), "val_threshold": thr,
                "val_mean_class_f1": rec.get("val_mean_class_f1"),
                "class_names": list(vocab)}
        improved = score > best_f1
        if improved:
            best_f1, best_epoch = score, epoch + 1
        rec["best_epoch"] = best_epoch
        history.append(rec)
        if ctx.is_main:  # one writer; `model` is the un-wrapped module, so any world size resumes it
            save_detector(out / "last.safetensors", model, meta)
            if improved:
                save_detector(out / "best.safetensors", model, meta)
            with open(out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                        "step": step, "epoch": epoch + 1, "best_f1": best_f1, "best_epoch": best_epoch,
                        "history": json.dumps(history), "rng": _rng_state(np_rng), "config": settings},
                       out / "state.tmp")
            (out / "state.tmp").replace(state_path)
        if not scores:
            val = "(no val split: best = lowest train loss)"
        else:
            val = f"val F1 {rec['val_f1']:.4f}" + (f" mean class F1 {rec['val_mean_class_f1']:.4f}"
                                                   if cfg.classes else "") + f" @ {thr}"
        log(f"epoch {epoch + 1}/{cfg.epochs} loss {rec['loss']:.4f} (cls {rec['loss_cls']:.4f} off "
            f"{rec['loss_offset']:.4f}) {val} [{rec['train_s']} s] best epoch {best_epoch}")
    if start_epoch >= cfg.epochs:
        log(f"{state_path}: all {cfg.epochs} epochs are already trained; nothing to do")
    barrier(ctx)  # rank 0 has written the last checkpoint when any rank returns
    selected_by = ("train loss" if not val_items else "val mean class F1" if cfg.classes else "val F1")
    return {"best_epoch": best_epoch, "best_score": best_f1, "selected_by": selected_by, "out": str(out),
            "history": history, "best": str(out / "best.safetensors"), "last": str(out / "last.safetensors")}


def held_back_val(cfg: TrainConfig) -> list[str]:
    """The datasets of ``cfg`` whose val images are held back from train (no val split)."""
    from denuc.data.base import open_training_dataset
    from denuc.data.splits import train_val_stems

    out = []
    for p in cfg.datasets:
        if train_val_stems(open_training_dataset(p, mpp=cfg.data_mpp, outside=cfg.outside), cfg.val_fraction,
                           cfg.seed)[2]:
            out.append(str(p))
    return out


def _validate(model: PointDetector, items: list[Item], cfg: TrainConfig, vocab: tuple[str, ...],
              ctx: DistContext | None = None) -> dict[float, tuple[float, float]]:
    """Val scores per threshold (:func:`val_scores`); with several processes each detects its
    share of the images (``items[rank::world]``) and every rank scores all of them."""
    model.eval()
    if ctx is None or not ctx.active:
        dets = detect_images(model, [it.image for it in items], threshold=min(THRESHOLDS) - 1e-6,
                             batch_size=cfg.batch_size)
    else:
        mine = detect_images(model, [it.image for it in items[ctx.rank::ctx.world]],
                             threshold=min(THRESHOLDS) - 1e-6, batch_size=cfg.batch_size)
        dets = [None] * len(items)  # type: ignore[list-item]
        for r, part in enumerate(all_gather_objects(mine, ctx)):
            dets[r::ctx.world] = part
    gt = {it.stem: it.gt for it in items}
    pred = dict(zip(gt, dets, strict=True))
    return val_scores(gt, pred, cfg.mpp, cfg.val_radius_um, THRESHOLDS, vocab)
