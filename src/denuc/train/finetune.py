"""``denuc finetune``: a lab's own labelled points -> a ready model folder, in one command.

Stages (each recorded in ``OUT/train/finetune.json`` when finished; rerunning the same
command skips finished stages, and an unfinished detector stage resumes from its last epoch
through ``train-detector``'s ``--resume``):

1. **detector**: fine-tune the starting detector (default: the shipped one) at its working
   mpp (0.25 µm/px for the shipped EfficientNet-Lite0) with ``train-detector``'s recipe
   (:mod:`denuc.train.detector_config`: 10 epochs, lr 3e-4, half an epoch's crops, H&E stain
   jitter p 0.8 / strength 0.5). One stage, no hand-tuned schedule. The best epoch and its
   score threshold are chosen on val (``OUT/train/detector``).
2. **select**: score the fine-tuned detector and the starting one on val over the score
   thresholds 0.1-0.7 (step 0.025); keep the better (a fine-tuning that does not beat its
   start on val is not shipped; the log and report say which) with its threshold, as
   ``OUT/detector.safetensors``.
3. **head**: train the classification head (encoder = the shipped head's unless given) on
   the ground-truth points and labels of train, scoring val at the points the selected
   detector finds; fit its temperature on val (calibrated probabilities):
   ``OUT/head.safetensors``. The default recipe, ``auto``, trains each of
   :data:`~denuc.train.head_presets.AUTO_CANDIDATES` (the shipped head's recipe and the
   paper's, ``OUT/train/head/<recipe>.safetensors``) and keeps the one with the higher mean
   class F1 at the detected val points; a named preset trains that one only.
4. **report**: run the finished model (detector + encoder + head) on the val images, and the
   shipped model with the same classes (else the default one, detection only) on the same
   images for comparison (:func:`compare_shipped`); write ``OUT/report/`` (``report.json``,
   ``report.md``, training curves and the reliability diagram as PNG), then ``OUT/model.yaml``
   (:mod:`denuc.modeldir`), last.

Val: each dataset's val split, or, for a dataset without one, a held-back share of its train
images (``val_fraction``, by image, seeded; the same images for detector and head), said in
the log and the report.

Every check of the settings, the datasets (classes, point files, the images' mpp) and the
output folder runs before any slow work, and a failed check leaves no ``OUT`` behind.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from denuc.core.files import atomic_target, atomic_write_text, removed_if_failed
from denuc.core.result import Nuclei
from denuc.data.base import PointDataset
from denuc.errors import InputError, ModelError
from denuc.train.detector_config import SHIPPED, TrainConfig

_DET = TrainConfig()
STATE_FORMAT = "denuc-finetune/1"
#: Score thresholds tried on val when choosing the detector and its threshold.
SELECT_THRESHOLDS = tuple(round(0.1 + 0.025 * i, 3) for i in range(25))
#: Plausible median nearest-neighbour distance between labelled nuclei, µm (see :func:`check_spacing`).
NN_UM_RANGE = (3.0, 50.0)
#: Files and folders of a finetune run in OUT (all that ``overwrite`` deletes).
RUN_ENTRIES = ("model.yaml", "detector.safetensors", "head.safetensors", "report", "train")


@dataclass
class FinetuneSettings:
    """Every option of ``denuc finetune``.

    Detector stage: ``init`` (``"shipped"`` or a detector checkpoint; its backbone and working
    mpp are kept), ``epochs``, ``lr``, ``batch_size``, ``crops_per_epoch``, ``stain_p``,
    ``stain_strength`` (defaults: ``train-detector``'s recipe). Head stage: ``encoder`` (None =
    the shipped head's), ``weights``, ``head_preset``, ``head_epochs`` (None = the preset's),
    ``head_select`` (None = the preset's), ``class_balance``. Data: ``data_mpp``, ``outside``,
    ``val_fraction``, ``mpp_check``. Run: the rest (they do not change results).
    """

    datasets: list[str] = field(default_factory=list)
    out: str = ""
    init: str = SHIPPED
    epochs: int = _DET.epochs
    lr: float = _DET.lr
    batch_size: int = _DET.batch_size
    crops_per_epoch: float = _DET.crops_per_epoch
    stain_p: float = _DET.stain_p
    stain_strength: float = _DET.stain_strength
    encoder: str | None = None
    weights: str | None = None
    head_preset: str = "auto"
    head_epochs: int | None = None
    head_select: str | None = None
    class_balance: str = "none"
    data_mpp: float | None = None
    outside: str = "error"
    val_fraction: float = 0.1
    mpp_check: bool = True
    seed: int = 0
    device: str | None = None
    threads: int = 0
    workers: int = -1
    cache_dir: str | None = None
    offline: bool = False
    progress: bool = True
    overwrite: bool = False
    stop_after: int = 0


#: Settings of the head stage only: when only these change, ``overwrite`` keeps the finished
#: detector stages and redoes the head and the report.
HEAD_STAGE = ("encoder", "weights", "head_preset", "head_epochs", "head_select", "class_balance")
#: Files and folders of the head and report stages (what such an ``overwrite`` deletes).
HEAD_ENTRIES = ("model.yaml", "head.safetensors", "report", "train/head")

#: Settings that do not change the result: they may differ when a run is resumed.
RUN_INDEPENDENT = ("out", "device", "threads", "workers", "cache_dir", "offline", "progress", "overwrite",
                   "stop_after")


@dataclass
class DataPlan:
    """The datasets as the run will use them (built by :func:`inspect_data`, no image read).

    Attributes:
        datasets: the opened datasets; ``splits``: per dataset ``{"train": [...], "val": [...]}``.
        held_back: folders of the datasets whose val is held back from train.
        classes: the union of the datasets' classes (the head's classes).
        train_points: labelled training points per class; ``val_points``: same for val.
        nn_um: per dataset, the median nearest-neighbour distance of labelled points, µm.
    """

    datasets: list[PointDataset]
    splits: list[dict[str, list[str]]]
    held_back: list[str]
    classes: tuple[str, ...]
    train_points: dict[str, int]
    val_points: dict[str, int]
    nn_um: list[float | None]

    def combined(self) -> PointDataset:
        from denuc.data.combined import CombinedDataset

        return CombinedDataset(self.datasets, self.splits)


# ------------------------------------------------------------------ checks (before slow work)
def detector_config(s: FinetuneSettings, out: Path) -> TrainConfig:
    """The ``train-detector`` settings of the detector stage (working mpp and backbone of ``init``)."""
    from denuc.detect.checkpoint import read_meta
    from denuc.train.detector import init_path

    p = init_path(s.init)
    if p is None:
        raise InputError("finetune starts from a detector: give --init shipped or a detector checkpoint")
    if not p.is_file():
        raise ModelError(f"--init {p}: detector checkpoint not found")
    meta = read_meta(p)
    cfg = meta.get("config", {})
    if len(cfg.get("class_names", ["nucleus"])) != 1:
        raise InputError(f"--init {p}: a class-aware detector; finetune starts from a class-agnostic one (the head "
                         "classifies)")
    return TrainConfig.from_preset(
        "recipe", datasets=list(s.datasets), out=str(out / "train" / "detector"), mpp=float(meta["mpp"]),
        backbone=cfg.get("backbone", _DET.backbone), neck_width=int(cfg.get("neck_width", 0)),
        head_activation=cfg.get("head_activation", _DET.head_activation), init=s.init, epochs=s.epochs, lr=s.lr,
        batch_size=s.batch_size, crops_per_epoch=s.crops_per_epoch, stain_p=s.stain_p,
        stain_strength=s.stain_strength, val_fraction=s.val_fraction, data_mpp=s.data_mpp, outside=s.outside,
        nms_radius_um=float(meta.get("nms_radius_um", _DET.nms_radius_um)), seed=s.seed, device=s.device,
        threads=s.threads, workers=s.workers, resume=True, stop_after=s.stop_after, progress=s.progress)


def head_recipes(s: FinetuneSettings) -> tuple[str, ...]:
    """The head recipes the head stage trains: the candidates of ``auto``, else the named one."""
    from denuc.train.head_presets import AUTO, AUTO_CANDIDATES, FINETUNE_HEAD_CHOICES

    if s.head_preset not in FINETUNE_HEAD_CHOICES:
        raise InputError(f"unknown head preset {s.head_preset!r}; known: {list(FINETUNE_HEAD_CHOICES)}")
    return AUTO_CANDIDATES if s.head_preset == AUTO else (s.head_preset,)


def head_settings(s: FinetuneSettings, preset: str | None = None) -> tuple[Any, dict[str, Any]]:
    """``(HeadTrainConfig, stain/augmentation arguments of train_head)`` of head recipe
    ``preset`` (default: ``s.head_preset``, which must then name one recipe)."""
    from denuc.train.head import HEAD_PRESETS, HeadTrainConfig

    preset = preset or s.head_preset
    if preset not in HEAD_PRESETS:
        raise InputError(f"unknown head preset {preset!r}; known: {sorted(HEAD_PRESETS)}")
    r = dict(HEAD_PRESETS[preset])
    cfg = HeadTrainConfig(epochs=s.head_epochs if s.head_epochs is not None else r["epochs"], lr=r["lr"],  # type: ignore[arg-type]
                          weight_decay=r["weight_decay"], select=s.head_select or r["select"],  # type: ignore[arg-type]
                          class_balance=s.class_balance, seed=s.seed).check()
    aug = {k: r[k] for k in ("stain_norm", "stain_augment", "stain_space", "stain_strength")}
    return cfg, aug


def head_encoder(s: FinetuneSettings) -> str:
    """The head's encoder: the given one, else the shipped head's."""
    if s.encoder:
        return s.encoder
    from denuc.classify.head import read_meta
    from denuc.pipeline import DEFAULT_HEAD

    return read_meta(DEFAULT_HEAD).encoder


def check_settings(s: FinetuneSettings) -> TrainConfig:
    """Check every setting cheaply (no image read); return the detector stage's settings."""
    from denuc.core.checks import check_int, check_number
    from denuc.encode.specs import get_spec
    from denuc.train.detector import check_config

    if not s.datasets:
        raise InputError("no dataset given: denuc finetune DATASET... --out DIR")
    if not s.out:
        raise InputError("no output folder given (--out DIR)")
    check_int(s.stop_after, 0, "stop after N detector epochs (--stop-after)")
    check_number(s.val_fraction, "held-back val share (--val-fraction)", low=0.0, low_open=True, high=0.5 + 1e-9)
    if s.class_balance not in ("none", "weighted", "sampled"):
        raise InputError(f"--class-balance must be none, weighted or sampled; got {s.class_balance!r}")
    if s.head_epochs is not None:
        check_int(s.head_epochs, 1, "head epochs (--head-epochs)")
    for preset in head_recipes(s):
        head_settings(s, preset)
    try:
        get_spec(head_encoder(s))
    except Exception as e:  # noqa: BLE001 - the registry raises DenucError; timm: names raise others
        raise ModelError(f"--encoder {s.encoder}: {e}") from None
    tcfg = detector_config(s, Path(s.out))
    check_config(tcfg)  # numbers, stain jitter, datasets open, init fits the backbone
    return tcfg


def check_spacing(ds: PointDataset, stems: list[str]) -> float | None:
    """Median over images of the median distance (µm) from each labelled point to its nearest
    neighbour; None when no image has 2 points. Nuclei are 4-10 µm across and touch at most,
    so a value far below :data:`NN_UM_RANGE` means the dataset's mpp is too small (or
    points are duplicated), one far above, that it is too large (or labels are sparse)."""
    from scipy.spatial import cKDTree

    meds = []
    for st in stems:
        p = ds.points(st)
        if len(p) >= 2:
            d, _ = cKDTree(p.xy).query(p.xy, k=2)
            meds.append(float(np.median(d[:, 1])) * ds.mpp_of(st))
    return float(np.median(meds)) if meds else None


def inspect_data(s: FinetuneSettings, log: Callable[[str], None] = print) -> DataPlan:
    """Open the datasets and read their point files (not the images): splits, classes, counts.

    Raises :class:`InputError` (one line, naming the dataset) for: a dataset without training
    images; a dataset whose training point files are all empty; fewer than 2 classes with
    training points; a class without any training point; label points outside their image
    (with ``outside="error"``); an implausible spacing of the labelled nuclei for the
    dataset's mpp (unless ``mpp_check`` is off); and :class:`~denuc.errors.ResolutionError`
    for a missing or absurd mpp.
    """
    from denuc.data.base import open_training_dataset
    from denuc.data.splits import train_val_stems

    datasets, splits, held = [], [], []
    for p in s.datasets:
        d = open_training_dataset(p, mpp=s.data_mpp, outside=s.outside)
        tr, va, carved = train_val_stems(d, s.val_fraction, s.seed)
        if not tr:
            raise InputError(f"{d.root}: the dataset has no training images")
        if carved:
            held.append(str(p))
        datasets.append(d)
        splits.append({"train": tr, "val": va})
    classes = tuple(dict.fromkeys(c for d in datasets for c in d.classes))
    train_pts = dict.fromkeys(classes, 0)
    val_pts = dict.fromkeys(classes, 0)
    nn: list[float | None] = []
    for d, sp in zip(datasets, splits, strict=True):
        n_points, empty = 0, 0
        for split, counts in (("train", train_pts), ("val", val_pts)):
            for st in sp[split]:
                pts = d.points(st)
                ids = pts.class_ids[pts.class_ids >= 0]
                for c, n in zip(*np.unique(ids, return_counts=True), strict=True):
                    counts[d.classes[int(c)]] += int(n)
                if split == "train":
                    n_points += len(pts)
                    empty += len(pts) == 0
        if n_points == 0:
            raise InputError(f"{d.root}: all {len(sp['train'])} training point files are empty (no labelled "
                             "nucleus to learn from); check the point files, or leave this dataset out")
        if empty:
            log(f"{d.root}: {empty} of {len(sp['train'])} training images have no labelled points (trained as "
                "images without nuclei)")
        spacing = check_spacing(d, sp["train"] + sp["val"])
        nn.append(spacing)
        if s.mpp_check and spacing is not None and not NN_UM_RANGE[0] <= spacing <= NN_UM_RANGE[1]:
            side = "small" if spacing < NN_UM_RANGE[0] else "large"
            raise InputError(
                f"{d.root}: labelled nuclei lie a median {spacing:.3g} µm from their nearest neighbour at the "
                f"dataset's {d.mpp:g} µm/px, outside the plausible {NN_UM_RANGE[0]:g}-{NN_UM_RANGE[1]:g} µm: is the "
                f"mpp too {side}? Fix the dataset's mpp (or --data-mpp); if it is right (e.g. sparse labels), pass "
                "--no-mpp-check")
    seen = [c for c in classes if train_pts[c]]
    if not seen:
        raise InputError(f"no training point has a class in {', '.join(map(str, s.datasets))}: the head needs "
                         "classified points (use `denuc train-detector` for detection only)")
    if len(seen) < 2:
        raise InputError(f"only class {seen[0]!r} has training points: a classifier needs labelled points of at "
                         "least 2 classes (use `denuc train-detector` for detection only)")
    missing = [c for c in classes if not train_pts[c]]
    if missing:
        raise InputError(f"class(es) {missing} have no training point (classes: {list(classes)}, points "
                         f"{train_pts}): label some, or remove them from the dataset's class list")
    return DataPlan(datasets, splits, held, classes, train_pts, val_pts, nn)


def run_settings(s: FinetuneSettings) -> dict[str, Any]:
    """The settings that determine the result (stored; a resumed run must have the same)."""
    from denuc.train.detector import init_path

    d = {k: v for k, v in asdict(s).items() if k not in RUN_INDEPENDENT}
    d["datasets"] = [str(Path(p).resolve()) for p in s.datasets]
    ip = init_path(s.init)
    d["init"] = str(ip.resolve()) if ip is not None else ""
    return d


def prepare_out(s: FinetuneSettings, log: Callable[[str], None]) -> dict[str, Any]:
    """The run state to continue (``{"format", "settings", "done": {}}`` for a new run).

    An ``out`` holding a finetune run continues it when its settings are the same (else
    :class:`InputError` listing the changes, unless ``overwrite``). ``overwrite`` deletes the
    run's files, except when only head-stage settings (:data:`HEAD_STAGE`) changed: then it
    deletes the head's and the report's (:data:`HEAD_ENTRIES`) and keeps the detector stages.
    An ``out`` holding anything else is refused. Creates nothing.
    """
    out = Path(s.out)
    new = {"format": STATE_FORMAT, "settings": run_settings(s), "done": {}}
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: exists and is not a folder")
    if not out.exists():
        return new
    state_file = out / "train" / "finetune.json"
    ours = [e for e in RUN_ENTRIES if (out / e).exists()]
    st: Any = None
    if state_file.is_file():
        try:
            st = json.loads(state_file.read_text())
            ok = isinstance(st, dict) and st.get("format") == STATE_FORMAT and isinstance(st.get("done"), dict)
        except (OSError, ValueError):
            ok = False
        if not ok:
            if not s.overwrite:
                raise InputError(f"{state_file}: not a readable finetune state; pass --overwrite to start again "
                                 "there, or give a new --out")
            st = None
    if st is not None:
        old = st.get("settings", {})
        changed = [k for k, v in new["settings"].items() if old.get(k) != v]
        changes = "; ".join(f"{k}: {old.get(k)!r} -> {new['settings'][k]!r}" for k in changed)
        head_only = bool(changed) and set(changed) <= set(HEAD_STAGE)
        if s.overwrite and head_only:
            gone = [e for e in HEAD_ENTRIES if (out / e).exists()]
            log(f"--overwrite with only head settings changed ({changes}): keeping the finished detector stages, "
                f"deleting {', '.join(gone) or 'nothing'} and training the head again")
            _delete(out, gone)
            return {**st, "settings": new["settings"],
                    "done": {k: v for k, v in st["done"].items() if k in ("detector", "select")}}
        if changed and not s.overwrite:
            hint = (" (only head settings changed: --overwrite keeps the finished detector stages and trains the "
                    "head again)") if head_only else " (it deletes the run's files)"
            raise InputError(f"--out {out} holds a finetune run with other settings ({changes}); rerun with the "
                             f"same settings to continue it, give a new --out, or pass --overwrite{hint}")
    if s.overwrite:
        if ours:
            log(f"--overwrite: deleting the previous run's {', '.join(ours)} in {out}")
        _delete(out, ours)
        return new
    if st is not None:
        done = ", ".join(st["done"]) or "none"
        log(f"continuing the finetune run in {out} (finished stages: {done})")
        return st
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if others:
        what = "a partial finetune run without its state" if ours else "other files"
        raise InputError(f"--out {out} holds {what} ({', '.join(others[:5])}); give a new or empty folder, or pass "
                         "--overwrite" + (" to delete the run's files" if ours else ""))
    return new


def _delete(out: Path, entries: Sequence[str]) -> None:
    """Delete the files and folders ``entries`` (relative to ``out``)."""
    for e in entries:
        p = out / e
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def _save_state(out: Path, state: dict[str, Any]) -> None:
    atomic_write_text(out / "train" / "finetune.json", json.dumps(state, indent=1) + "\n")


# ------------------------------------------------------------------ stages
def stage_detector(tcfg: TrainConfig, log: Callable[[str], None]) -> dict[str, Any] | None:
    """Train (or resume) the detector; its summary, or None when stopped early (``stop_after``)."""
    from denuc.train.detector import train

    log(f"[1/4] detector: fine-tuning {'the shipped detector' if tcfg.init == SHIPPED else tcfg.init} "
        f"({tcfg.backbone}) at {tcfg.mpp} µm/px: {tcfg.epochs} epochs, lr {tcfg.lr:g}, stain jitter p "
        f"{tcfg.stain_p:g} strength {tcfg.stain_strength:g} ({tcfg.stain_space})")
    t0 = time.perf_counter()
    res = train(tcfg, log=log)
    if len(res["history"]) < tcfg.epochs:
        log(f"detector stopped after {len(res['history'])}/{tcfg.epochs} epochs (--stop-after): rerun the same "
            "command to continue")
        return None
    return {"best_epoch": res["best_epoch"], "selected_by": res["selected_by"], "best_score": res["best_score"],
            "seconds": round(time.perf_counter() - t0, 1)}


def val_detection(det_path: Path, ds: PointDataset, stems: list[str], device: str | None
                  ) -> dict[float, dict[str, float]]:
    """Detection precision/recall/F1 (denuc protocol, 3 µm) on ``stems`` at each of
    :data:`SELECT_THRESHOLDS`, from one detection pass at the lowest."""
    from denuc.core.result import Nuclei
    from denuc.detect.api import Detector
    from denuc.evaluate.api import evaluate

    det = Detector.load(det_path, device=device, threshold=min(SELECT_THRESHOLDS) - 1e-6)
    gt, raw = {}, {}
    for st in stems:
        sample = ds.load(st)
        gt[st] = Nuclei(sample.points.xy, mpp=sample.mpp, image_size=sample.image.shape[:2], name=st)
        n = det.detect(sample.image, sample.mpp, name=st)
        raw[st] = Nuclei(n.xy, n.scores, mpp=n.mpp, image_size=n.image_size, name=st)
    out = {}
    for t in SELECT_THRESHOLDS:
        pred = {k: v.select(v.scores > t) for k, v in raw.items()}
        c = evaluate(gt, pred, protocol="denuc", radius_um=3.0, classes=()).detection
        out[float(t)] = {"precision": c.precision, "recall": c.recall, "f1": c.f1, "tp": c.tp,
                         "n_pred": c.n_pred, "n_gt": c.n_gt}
    return out


def _best_threshold(scores: dict[float, dict[str, float]]) -> float:
    return max(scores, key=lambda t: (scores[t]["f1"], -abs(t - 0.4)))


def stage_select(tcfg: TrainConfig, plan: DataPlan, out: Path, device: str | None,
                 log: Callable[[str], None]) -> dict[str, Any]:
    """Choose between the fine-tuned and the starting detector (and the threshold) on val;
    write ``out/detector.safetensors``."""
    from denuc.core.files import portable_meta
    from denuc.detect.checkpoint import load_detector, save_detector
    from denuc.train.detector import init_path

    ds = plan.combined()
    val = ds.stems("val")
    tuned, start = Path(tcfg.out) / "best.safetensors", init_path(tcfg.init)
    assert start is not None
    rec: dict[str, Any] = {"val_images": len(val), "held_back": [Path(h).name for h in plan.held_back]}
    if val:
        log(f"[2/4] select: val detection F1 of the fine-tuned and the starting detector on {len(val)} images")
        sc_tuned = val_detection(tuned, ds, val, device)
        sc_start = val_detection(start, ds, val, device)
        t1, t0 = _best_threshold(sc_tuned), _best_threshold(sc_start)
        keep_tuned = sc_tuned[t1]["f1"] >= sc_start[t0]["f1"]
        rec.update(fine_tuned={"threshold": t1, **sc_tuned[t1]}, start={"threshold": t0, **sc_start[t0]},
                   fine_tuned_by_threshold={str(t): v["f1"] for t, v in sc_tuned.items()},
                   start_by_threshold={str(t): v["f1"] for t, v in sc_start.items()})
        chosen, thr = (tuned, t1) if keep_tuned else (start, t0)
        log(f"  fine-tuned: val F1 {sc_tuned[t1]['f1']:.4f} @ {t1}; starting detector: {sc_start[t0]['f1']:.4f} @ {t0}"
            f" -> keeping the {'fine-tuned' if keep_tuned else 'starting'} detector"
            + ("" if keep_tuned else " (fine-tuning did not beat it on val)"))
    else:
        log("[2/4] select: no val images (a single training image): keeping the fine-tuned detector and its "
            "threshold")
        keep_tuned, chosen, thr = True, tuned, float(load_detector(tuned)[0].config.score_threshold)
    rec.update(chosen="fine-tuned" if keep_tuned else "start", threshold=thr)
    model, meta = load_detector(chosen)
    model.config.score_threshold = float(thr)
    meta = {k: v for k, v in meta.items() if k not in ("config", "format", "version", "tta_thresholds", "benchmark")}
    meta.update(val_threshold=thr, val_f1=rec.get("fine_tuned" if keep_tuned else "start", {}).get("f1"),
                finetune={"chosen": rec["chosen"], "val_images": len(val), "held_back_val": bool(plan.held_back),
                          "start": "shipped" if tcfg.init == SHIPPED else Path(tcfg.init).name})
    save_detector(out / "detector.safetensors", model, portable_meta(meta))  # type: ignore[arg-type]
    return rec


def stage_head(s: FinetuneSettings, plan: DataPlan, out: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """Train the head on the ground-truth points of train, scored at the selected detector's val
    points; with several recipes (``auto``), each is trained to ``out/train/head/<recipe>.safetensors``
    (a finished one is reused when the stage resumes) and the one with the higher val score
    (mean class F1 at the detected val points; a tie keeps the first) becomes ``out/head.safetensors``."""
    from denuc.classify.head import load_head, read_meta, save_head
    from denuc.core.files import portable_meta
    from denuc.train.head_run import train_head

    recipes = head_recipes(s)
    name = head_encoder(s)
    tried: dict[str, dict[str, Any]] = {}
    histories: dict[str, list[dict[str, float]]] = {}
    t0 = time.perf_counter()
    for i, preset in enumerate(recipes):
        hcfg, aug = head_settings(s, preset)
        dest = out / "head.safetensors" if len(recipes) == 1 else out / "train" / "head" / f"{preset}.safetensors"
        what = f"recipe {preset}" + (f" ({i + 1} of {len(recipes)}: {s.head_preset})" if len(recipes) > 1 else "")
        log(f"[3/4] head: {name} features, {what}: {hcfg.epochs} epochs, {hcfg.select} epoch kept, stain norm "
            f"{aug['stain_norm']}, {aug['stain_augment']} stain-jittered passes, class balance {hcfg.balance}; "
            f"classes {list(plan.classes)}")
        history: list[dict[str, float]] = []
        t1 = time.perf_counter()
        if dest.is_file() and len(recipes) > 1:
            log(f"  {dest.name}: trained before, reused")
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            train_head(plan.combined(), name, dest, weights=s.weights, detector=out / "detector.safetensors",
                       config=hcfg, cache_dir=s.cache_dir, device=s.device, offline=True if s.offline else None,
                       history=history, log=log, **aug)  # type: ignore[arg-type]
            # the model folder is meant to be shared: no local paths in the head's metadata
            head, meta, enc_tensors = load_head(dest)
            meta.train = portable_meta(meta.train)  # type: ignore[assignment]
            save_head(dest, head, meta, enc_tensors)
        meta = read_meta(dest)
        histories[preset] = history
        tried[preset] = {"val_scores": meta.val_scores, "temperature": meta.temperature,
                         "seconds": round(time.perf_counter() - t1, 1)}
    scores = {p: float(r["val_scores"].get("select", float("-inf"))) for p, r in tried.items()}
    chosen = max(recipes, key=lambda p: (scores[p], -recipes.index(p)))
    if len(recipes) > 1:
        with atomic_target(out / "head.safetensors") as tmp:
            shutil.copyfile(out / "train" / "head" / f"{chosen}.safetensors", tmp)
        log("  val mean class F1 at detected points: " + ", ".join(f"{p} {v:.4f}" for p, v in scores.items())
            + f" -> keeping the {chosen} recipe's head")
    meta = read_meta(out / "head.safetensors")
    return {"history": histories[chosen], "val_scores": meta.val_scores, "temperature": meta.temperature,
            "encoder": meta.encoder, "weights_source": meta.weights_source, "recipe": chosen,
            "candidates": tried if len(recipes) > 1 else {},
            "seconds": round(time.perf_counter() - t0, 1)}


def stage_report(s: FinetuneSettings, plan: DataPlan, out: Path, state: dict[str, Any],
                 log: Callable[[str], None]) -> dict[str, Any]:
    """Run the finished model on val and write ``out/report``; returns the report dict."""
    from denuc.core.files import portable_meta
    from denuc.evaluate.api import evaluate
    from denuc.pipeline import DeNuC
    from denuc.train.finetune_report import write_report

    ds = plan.combined()
    val = ds.stems("val")
    log(f"[4/4] report: the finished model on {len(val)} val images")
    model = DeNuC.load(detector=out / "detector.safetensors", head=out / "head.safetensors", device=s.device,
                       encoder=head_encoder(s), weights=s.weights, offline=True if s.offline else None)
    gt, pred, images = {}, {}, {}
    t0 = time.perf_counter()
    for st in val:
        sample = ds.load(st)
        pts = sample.points
        pts.mpp = sample.mpp
        gt[st] = pts
        images[st] = (sample.image, sample.mpp)
        pred[st] = model(sample.image, sample.mpp, name=st)
    seconds = time.perf_counter() - t0
    rep: dict[str, Any] = {"val_images": len(val), "held_back_val": [Path(h).name for h in plan.held_back],
                           "classes": list(plan.classes),
                           "train_points": plan.train_points, "val_points": plan.val_points}
    if val:
        ev = evaluate(gt, pred, protocol="denuc", radius_um=3.0)
        rep["pipeline"] = {"detection": ev.detection.to_dict(), "classes": {c: v.to_dict() for c, v in ev.classes.items()},
                           "mean_class_f1": ev.mean_f1, "seconds_per_image": round(seconds / len(val), 2)}
    from denuc.classify.head import read_meta

    hm = read_meta(out / "head.safetensors")
    if val:
        rep["shipped"] = compare_shipped(plan.classes, gt, images, s.device, log)
    hd = state["done"].get("head", {})
    rep["head"] = {"encoder": hm.encoder, "temperature": hm.temperature, "calibration": hm.calibration,
                   "gt_points": hm.val_report, "val_scores": hm.val_scores, "preset": s.head_preset,
                   "recipe": hd.get("recipe", s.head_preset),
                   "candidates": {p: v["val_scores"].get("select") for p, v in hd.get("candidates", {}).items()}}
    rep["detector"] = state["done"]["select"]
    rep["stages"] = {k: {kk: vv for kk, vv in v.items() if kk != "history"} for k, v in state["done"].items()}
    rep["settings"] = portable_meta({k: v for k, v in state["settings"].items() if k != "datasets"})
    rep["datasets"] = [Path(p).name for p in s.datasets]
    det_log = out / "train" / "detector" / "log.jsonl"
    det_hist = [json.loads(x) for x in det_log.read_text().splitlines()] if det_log.is_file() else []
    write_report(out / "report", rep, det_hist, state["done"]["head"].get("history", []))
    return rep


def shipped_for_classes(classes: Sequence[str]) -> str:
    """The shipped model to compare a fine-tuned one with: the first whose classes are the same
    set as ``classes``, else the default one (:data:`denuc.modeldir.DEFAULT_MODEL`)."""
    from denuc.modeldir import DEFAULT_MODEL, load_model_dir, shipped_models

    for name, folder in shipped_models().items():
        try:
            if set(load_model_dir(folder).classes) == set(classes):
                return name
        except ModelError:
            continue
    return DEFAULT_MODEL


def compare_shipped(classes: Sequence[str], gt: dict[str, Nuclei], images: dict[str, tuple[Any, float]],
                    device: str | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Score a shipped model (:func:`shipped_for_classes`) on the same val images as the new one.

    Args:
        gt: val ground truth per stem (points at the image's mpp); ``images``: ``(image (H, W, 3)
            uint8, mpp)`` per stem.

    Returns:
        ``{"model", "classes", "detection", "mean_class_f1" (None when its classes are not the
        user's), "classes_compared"}``, or ``{"model", "note"}`` when it cannot be loaded.
    """
    from denuc.evaluate.api import evaluate
    from denuc.pipeline import DeNuC

    name = shipped_for_classes(classes)
    try:
        model = DeNuC.load(model=name, device=device)
    except ModelError as e:
        log(f"  shipped model {name}: not compared ({e})")
        return {"model": name, "note": f"not compared: {e}"}
    same = set(model.class_names) == set(classes)
    pred = {st: model(img, mpp, name=st) for st, (img, mpp) in images.items()}
    if not same:  # other classes: its points as class-agnostic detections
        pred = {st: Nuclei(p.xy, p.scores, np.zeros(len(p), np.int64), ("nucleus",), None, p.mpp, None, st)
                for st, p in pred.items()}
    ev = evaluate(gt, pred, protocol="denuc", radius_um=3.0)
    out = {"model": name, "classes": list(model.class_names), "classes_compared": same,
           "detection": ev.detection.to_dict(), "mean_class_f1": ev.mean_f1 if same else None,
           "classes_f1": {c: v.f1 for c, v in ev.classes.items()} if same else {}}
    log(f"  shipped model {name} on the same val images: detection F1 {ev.detection.f1:.4f}"
        + (f", mean class F1 {ev.mean_f1:.4f}" if same else f" (its classes {list(model.class_names)} are not "
           "yours: detection compared only)"))
    return out


def write_model_yaml(s: FinetuneSettings, plan: DataPlan, out: Path, state: dict[str, Any]) -> Path:
    """``out/model.yaml`` (written last: a folder with it is complete)."""
    import yaml

    from denuc import __version__
    from denuc.classify.head import read_meta
    from denuc.detect.checkpoint import read_meta as det_meta
    from denuc.modeldir import MODEL_FORMAT, MODEL_YAML

    hm = read_meta(out / "head.safetensors")
    dm = det_meta(out / "detector.safetensors")
    sel = state["done"]["select"]
    doc = {
        "format": MODEL_FORMAT,
        "detector": "detector.safetensors",
        "head": "head.safetensors",
        "encoder": hm.encoder,
        "weights": s.weights,
        "weights_source": hm.weights_source or None,
        "classes": list(hm.classes),
        "mpp": float(dm["mpp"]),
        "head_mpp": float(hm.mpp),
        "thresholds": {"detection": float(sel["threshold"])},
        "temperature": float(hm.temperature),
        "head_recipe": state["done"]["head"].get("recipe", s.head_preset),
        "detector_start": "shipped" if s.init == SHIPPED else Path(s.init).name,
        "detector_chosen": sel["chosen"],
        "datasets": [Path(p).name for p in s.datasets],
        "val": "held back from train: " + ", ".join(Path(p).name for p in plan.held_back) if plan.held_back
        else "the datasets' val splits",
        "report": "report/report.md",
        "made_by": f"denuc finetune {__version__}",
    }
    return atomic_write_text(out / MODEL_YAML, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


def finetune(s: FinetuneSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) ``denuc finetune``; see the module docstring.

    Returns:
        ``{"out", "finished": bool, "done": {stage: record}, "report": dict}``; ``finished``
        is False when ``stop_after`` stopped the detector stage early.
    """
    import torch

    t_start = time.perf_counter()
    from denuc.core.files import check_out_dir
    from denuc.train.features import check_writable_dir, default_cache_dir

    tcfg = check_settings(s)
    plan = inspect_data(s, log)
    cdir = Path(s.cache_dir) if s.cache_dir else None
    check_writable_dir((cdir or default_cache_dir()) / "features",
                       f"--cache-dir {cdir}" if cdir else f"feature cache {default_cache_dir()} (set --cache-dir "
                       "or DENUC_CACHE)")
    state = prepare_out(s, log)  # last check: with --overwrite it deletes the previous run's files
    out = Path(s.out)
    log(f"data: {sum(len(sp['train']) for sp in plan.splits)} train / {sum(len(sp['val']) for sp in plan.splits)} "
        f"val images; classes {list(plan.classes)}; training points {plan.train_points}")
    if plan.held_back:
        log(f"no val split in {', '.join(plan.held_back)}: {s.val_fraction:g} of its train images (by image, seed "
            f"{s.seed}) held back as val for choosing epochs, thresholds and the temperature")
    threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        with removed_if_failed(out):
            check_out_dir(out)
            done = state["done"]
            if "detector" not in done:
                from denuc.train.detector import RUN_FILES

                tcfg.resume = any((Path(tcfg.out) / f).exists() for f in RUN_FILES)  # continue an unfinished stage
                rec = stage_detector(tcfg, log)
                if rec is None:
                    _save_state(out, state)
                    return {"out": str(out), "finished": False, "done": done, "report": {}}
                done["detector"] = rec
                _save_state(out, state)
                for f in ("state.pt", "last.safetensors"):  # finished: only its best epoch and log are kept
                    (Path(tcfg.out) / f).unlink(missing_ok=True)
            else:
                log("[1/4] detector: finished before, skipped")
            if "select" not in done:
                t0 = time.perf_counter()
                done["select"] = stage_select(tcfg, plan, out, s.device, log)
                done["select"]["seconds"] = round(time.perf_counter() - t0, 1)
                _save_state(out, state)
            else:
                log("[2/4] select: finished before, skipped")
            if "head" not in done:
                done["head"] = stage_head(s, plan, out, log)
                _save_state(out, state)
            else:
                log("[3/4] head: finished before, skipped")
            if "report" not in done:
                t0 = time.perf_counter()
                rep = stage_report(s, plan, out, state, log)
                write_model_yaml(s, plan, out, state)
                done["report"] = {"seconds": round(time.perf_counter() - t0, 1)}
                _save_state(out, state)
            else:
                rep = json.loads((out / "report" / "report.json").read_text())
                log("[4/4] report: finished before, skipped")
    finally:
        torch.set_num_threads(threads)
    pl = rep.get("pipeline", {})
    if pl:
        log(f"val: detection F1 {pl['detection']['f1']:.4f}, mean class F1 {pl['mean_class_f1']:.4f} "
            f"({len(plan.classes)} classes)")
    log(f"wrote the model folder {out} (model.yaml, detector.safetensors, head.safetensors, report/) in "
        f"{(time.perf_counter() - t_start) / 60:.1f} min")
    return {"out": str(out), "finished": True, "done": state["done"], "report": rep}

