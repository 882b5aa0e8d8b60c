"""``train_head``: from a dataset folder to a self-describing head checkpoint.

Steps: open the dataset (:func:`~denuc.data.open_dataset`), pick train/val (carving val
from train when there is none), build the encoder and point featurizer, extract (or load
cached) features at GT points of train and val and, with a detector, at detected points of
val; train the head (``linear``/``mlp`` on cached features; ``lora``/``full`` additionally
update the encoder on window crops, see :mod:`denuc.train.head_finetune`); keep the best
epoch on val (or the last); fit the temperature on val ground-truth points
(:mod:`denuc.train.calibration`) and report per-class precision/recall there; write the
checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from denuc.classify.head import HEAD_MODES, HeadMeta, save_head
from denuc.core.mpp import check_mpp
from denuc.data.base import PointDataset, open_training_dataset
from denuc.encode.encoder import Encoder, build_encoder
from denuc.errors import InputError
from denuc.query.predictor import PointFeaturizer
from denuc.train.calibration import calibrate_head, format_class_report
from denuc.train.features import (
    DetectFn,
    augmented_gt_features,
    cached_features,
    check_writable_dir,
    concat_features,
    default_cache_dir,
)
from denuc.train.head import (
    HeadTrainConfig,
    Scorer,
    check_class_counts,
    det_scorer,
    fit_head,
    gt_scorer,
    split_train_val,
)


def check_out_file(out: str | os.PathLike[str]) -> Path:
    """Refuse (:class:`InputError`) an ``out`` checkpoint path that is a folder or cannot be written.

    Checked before any work, so a run never ends with a traceback after hours of training.
    """
    p = Path(out)
    if p.is_dir():
        raise InputError(f"--out {p} is a folder; give the head's file name, e.g. {p / 'head.safetensors'}")
    if p.exists() and not p.is_file():
        raise InputError(f"--out {p} exists and is not a regular file")
    check_writable_dir(p.parent, f"--out {p}")
    return p


def log_calibration(calib: dict[str, Any], report: dict[str, Any], log: Callable[[str], None]) -> None:
    """Print the per-class precision/recall at val GT points and the calibration (ECE before/after)."""
    if report:
        log(f"val classification at ground-truth points: accuracy {report['accuracy']:.3f}, macro-F1 "
            f"{report['macro_f1']:.3f}")
        for line in format_class_report(report):
            log(line)
    if "ece_after" in calib:
        log(f"calibration on {calib['points']} val points: temperature {calib['temperature']:.3f}, ECE "
            f"{calib['ece_before']:.3f} -> {calib['ece_after']:.3f}, NLL {calib['nll_before']:.3f} -> "
            f"{calib['nll_after']:.3f}")
    elif calib:
        log(f"calibration: {calib.get('note', '')}")


def load_detector(path: str | os.PathLike[str] | None, device: str | None = None) -> tuple[DetectFn, str]:
    """``(detect(image, mpp) -> Nuclei, identity string for cache keys)`` of a detector checkpoint
    (``None`` = the shipped default)."""
    from denuc.detect.api import Detector, default_detector_path
    from denuc.encode.weights import file_sha256

    det = Detector.load(path, device=device)
    src = Path(path) if path is not None else default_detector_path()
    ident = file_sha256(src)
    return det.detect, ident


def make_scorer(fz: PointFeaturizer, ds: PointDataset, val: list[str], n_classes: int, *,
                detect: DetectFn | None, detector_id: str, cache_dir: Path | None,
                log: Callable[[str], None], use_cache: bool = True) -> tuple[Scorer, str, dict[str, Any]]:
    """``(val scorer, what it scores, the val features {"gt"[, "det"]})``: the scorer works at
    detected points when a detector is given, else at GT points; GT-point features are always
    extracted (in the same pass), for calibration."""
    feats = cached_features(fz, ds, val, gt=True, detect=detect, detector_id=detector_id,
                            cache_dir=cache_dir, use_cache=use_cache, log=log)
    if detect is not None:
        gt = {}
        for s in val:
            p = ds.points(s)
            p.mpp = ds.mpp_of(s)
            gt[s] = p
        return det_scorer(feats["det"], gt, ds.classes), "mean class F1 at detected val points", feats
    return gt_scorer(feats["gt"], n_classes), "macro-F1 at GT val points", feats


def train_head(
    data: str | os.PathLike[str] | PointDataset,
    encoder: str | Encoder,
    out: str | os.PathLike[str],
    *,
    weights: str | None = None,
    variant: str | None = None,
    taps: str | list[str] | tuple[str, ...] | None = None,
    detector: str | os.PathLike[str] | None = None,
    use_detector: bool = False,
    mode: str = "linear",
    mpp: float | None = None,
    window: int | None = None,
    stride: int | None = None,
    align: str = "center",
    config: HeadTrainConfig | None = None,
    finetune: dict[str, Any] | None = None,
    stain_augment: int = 0,
    stain_strength: float = 0.1,
    stain_space: str = "od",
    stain_norm: str = "none",
    feature_tta: int = 1,
    cache_dir: str | os.PathLike[str] | None = None,
    device: str | None = None,
    offline: bool | None = None,
    data_mpp: float | None = None,
    outside: str = "error",
    calibrate: bool = True,
    history: list[dict[str, float]] | None = None,
    log: Callable[[str], None] = print,
) -> HeadMeta:
    """Train a classification head and write it to ``out`` (``.safetensors``).

    Args:
        data: dataset folder (any format :func:`open_dataset` knows) or an opened dataset.
        encoder: encoder name (built with ``weights``) or a built :class:`Encoder`.
        variant, taps: for an encoder name, a named taps + working mpp choice of its spec and/or
            other taps (:func:`~denuc.encode.build_encoder`); the head records the taps it reads.
        detector, use_detector: select the epoch at detected val points with this detector
            checkpoint (``use_detector`` with ``detector=None`` = the shipped detector).
        mode: ``linear``, ``mlp``, ``lora`` (ViT encoders only) or ``full``.
        mpp, window, stride, align: point-query geometry (defaults: the encoder's).
        config: head optimisation settings; ``finetune``: settings of lora/full training.
        stain_augment: extra passes of training features over stain-jittered images
            (:func:`~denuc.data.stain.stain_jitter` with ``stain_strength`` in ``stain_space``,
            ``od`` or ``hed``), cached like the plain pass.
        feature_tta: dihedral passes whose features are averaged (1, 2, 4, 8), stored in the head
        stain_norm: stain normaliser applied to every image before encoding, stored in the head
            (so prediction does the same). The stain-jittered passes are encoded *without* it,
            since it would undo the jitter: the head then sees both normalised images and raw
            colour variation.
        data_mpp, outside: µm/px of a dataset whose files do not say, and the policy for label
            points outside their image (:func:`~denuc.data.base.open_training_dataset`).
        calibrate: fit the temperature on the val images' ground-truth points (stored in the
            head; with fewer than 20 labelled val points it stays 1).
        history: when given, receives ``{"epoch", "loss"[, "val"]}`` per head epoch (with val,
            the val metric of every epoch, also under ``select="last"``).

    ``config.select``: ``val`` keeps the best epoch on val, ``last`` the last epoch of the
    schedule (val is scored once, for the record).

    Under ``torchrun`` (several processes, :mod:`denuc.train.distributed`) each process encodes
    its share of the images for the feature cache and all use the whole cache; the head on
    cached features is fitted in every process alike (rank 0's copy is kept; it takes seconds);
    ``lora``/``full`` fine-tuning splits each batch of windows over the processes. Rank 0 logs
    and writes ``out``. The result is the one-process result, up to float rounding in the
    fine-tuned encoder.
    """
    from denuc.core.device import launched_world

    if launched_world()[1] > 1:
        from denuc.core.device import pick_device
        from denuc.train.distributed import barrier, distributed, main_only_log

        with distributed(pick_device(device)) as (ctx, dev):
            meta = _train_head(data, encoder, out, weights=weights, detector=detector, use_detector=use_detector,
                               mode=mode, mpp=mpp, window=window, stride=stride, align=align, config=config,
                               finetune=finetune, stain_augment=stain_augment, stain_strength=stain_strength,
                               stain_space=stain_space, stain_norm=stain_norm, feature_tta=feature_tta,
                               cache_dir=cache_dir, device=str(dev), offline=offline, data_mpp=data_mpp,
                               outside=outside, calibrate=calibrate, history=history, variant=variant, taps=taps,
                               log=main_only_log(log, ctx))
            barrier(ctx)  # rank 0 has written the head when any rank returns
            return meta
    return _train_head(data, encoder, out, weights=weights, detector=detector, use_detector=use_detector, mode=mode,
                       mpp=mpp, window=window, stride=stride, align=align, config=config, finetune=finetune,
                       stain_augment=stain_augment, stain_strength=stain_strength, stain_space=stain_space,
                       stain_norm=stain_norm, feature_tta=feature_tta, cache_dir=cache_dir, device=device,
                       offline=offline, data_mpp=data_mpp, outside=outside, calibrate=calibrate, history=history,
                       variant=variant, taps=taps, log=log)


def _train_head(
    data: str | os.PathLike[str] | PointDataset,
    encoder: str | Encoder,
    out: str | os.PathLike[str],
    *,
    weights: str | None,
    detector: str | os.PathLike[str] | None,
    use_detector: bool,
    mode: str,
    mpp: float | None,
    window: int | None,
    stride: int | None,
    align: str,
    config: HeadTrainConfig | None,
    finetune: dict[str, Any] | None,
    stain_augment: int,
    stain_strength: float,
    stain_space: str,
    stain_norm: str,
    feature_tta: int,
    cache_dir: str | os.PathLike[str] | None,
    device: str | None,
    offline: bool | None,
    data_mpp: float | None,
    outside: str,
    calibrate: bool,
    history: list[dict[str, float]] | None,
    variant: str | None,
    taps: str | list[str] | tuple[str, ...] | None,
    log: Callable[[str], None],
) -> HeadMeta:
    """:func:`train_head` in this process (one of several under ``torchrun``)."""
    from denuc.train.distributed import broadcast_params, current

    ctx = current()
    if mode not in HEAD_MODES:
        raise InputError(f"unknown head mode {mode!r}; known: {list(HEAD_MODES)}")
    cfg = config or HeadTrainConfig()
    if mode == "mlp" and not cfg.hidden:
        cfg.hidden = 256
    # every setting and output location is checked before any feature is extracted
    cfg.check()
    if mpp is not None:
        mpp = check_mpp(mpp, "working resolution (--work-mpp)")
    if isinstance(stain_augment, bool) or int(stain_augment) != stain_augment or stain_augment < 0:
        raise InputError(f"stain-jittered passes (--stain-augment) must be a whole number >= 0; got {stain_augment}")
    if stain_augment and not (math.isfinite(float(stain_strength)) and 0 <= float(stain_strength) < 1):
        raise InputError(f"stain jitter strength (--stain-strength) must be a number >= 0 and < 1; "
                         f"got {float(stain_strength)}")
    if isinstance(encoder, Encoder) and (variant or taps):
        raise InputError("variant and taps select how an encoder is built by name; a built encoder keeps its own "
                         f"(taps {'+'.join(encoder.taps) or '(none)'})")
    if not isinstance(encoder, Encoder):
        from denuc.encode.specs import get_spec

        get_spec(encoder, variant, taps)  # unknown encoder, variant or taps: refused before any work
    fcfg = None
    if mode in ("lora", "full"):
        from denuc.train.head_finetune import FinetuneConfig

        try:
            fcfg = FinetuneConfig(**(finetune or {})).check()
        except TypeError as e:
            raise InputError(f"unknown fine-tuning setting ({e})") from None
    check_out_file(out)
    cdir = Path(cache_dir) if cache_dir is not None else None
    check_writable_dir((cdir or default_cache_dir()) / "features",
                       f"--cache-dir {cdir}" if cdir is not None else
                       f"feature cache {default_cache_dir()} (set --cache-dir or DENUC_CACHE)")
    ds = data if isinstance(data, PointDataset) else open_training_dataset(data, mpp=data_mpp, outside=outside)
    if not ds.classes:
        raise InputError(f"{ds.root}: the dataset defines no classes")
    # val is needed to select the epoch (select "val") and to judge fine-tuning epochs (lora/full)
    train, val, carved = split_train_val(ds, cfg.seed, log=log,
                                         need_val=cfg.select == "val" or mode in ("lora", "full"))
    ids = np.concatenate([ds.points(s).class_ids for s in train])  # cheap: refuse before any encoding
    check_class_counts(np.bincount(ids[ids >= 0], minlength=len(ds.classes)), ds.classes)
    from denuc.core.device import pick_device

    device = str(pick_device(device))  # None: cuda, then mps, then cpu (like predict and train-detector)
    enc = encoder if isinstance(encoder, Encoder) else build_encoder(encoder, weights, offline=offline, device=device,
                                                                     variant=variant, taps=taps)
    if mode == "lora":
        from denuc.train.head_finetune import check_lora_applies

        check_lora_applies(enc)
    fz = PointFeaturizer(enc, mpp=mpp, window=window, stride=stride, align=align, stain_norm=stain_norm,
                         feature_tta=feature_tta)
    detect, det_id = (None, "")
    if detector is not None or use_detector:
        detect, det_id = load_detector(detector, device)
    t0 = time.perf_counter()
    tr = cached_features(fz, ds, train, cache_dir=cdir, log=log)["gt"]
    if stain_augment:
        tr = concat_features([tr, *augmented_gt_features(fz.with_stain_norm("none"), ds, train, stain_augment, seed=cfg.seed,
                                                         strength=stain_strength, space=stain_space,
                                                         cache_dir=cdir, log=log)])
    scorer: Scorer | None = None
    select_desc = "no val images"
    val_feats: dict[str, Any] = {}
    if val:
        scorer, select_desc, val_feats = make_scorer(fz, ds, val, len(ds.classes), detect=detect,
                                                     detector_id=det_id, cache_dir=cdir, log=log)
    t_feat = time.perf_counter() - t0
    log(f"training {mode} head on {len(tr)} points of {len(train)} images; selection: "
        f"{select_desc if cfg.select == 'val' else 'last epoch'}")
    t1 = time.perf_counter()
    watch = cfg.select == "last" and history is not None  # score every epoch for the curves only
    head, scores = fit_head(tr, len(ds.classes), cfg, scorer if cfg.select == "val" or watch else None, log=log,
                            class_names=ds.classes, history=history, keep_best=not watch)
    if ctx.active:  # every rank fitted the same head; rank 0's is the one kept, bit for bit
        broadcast_params(head, ctx)
    if cfg.select == "last":
        scores = {"epoch": cfg.epochs, **(scorer(head) if scorer is not None else {})}
        select_desc = f"last epoch of a fixed schedule (not selected); val reported: {select_desc}"
    enc_tensors: dict[str, Any] = {}
    enc_hash = ""
    if mode in ("lora", "full"):
        from denuc.train.head_finetune import finetune_encoder

        assert fcfg is not None
        head, scores, enc_tensors, enc_hash = finetune_encoder(
            fz, ds, train, head, scores, mode, fcfg, cfg, make_val_scorer=lambda: make_scorer(
                fz, ds, val, len(ds.classes), detect=detect, detector_id=det_id, cache_dir=None, log=lambda m: None,
                use_cache=False)[0],
            log=log)
    t_train = time.perf_counter() - t1
    temperature, calib, report = 1.0, {}, {}
    if val:
        gt_val = val_feats["gt"]
        if mode in ("lora", "full") and enc_tensors:  # the encoder changed: its val features too
            gt_val = cached_features(fz, ds, val, gt=True, use_cache=False, log=lambda m: None)["gt"]
        temperature, calib, report = calibrate_head(head, gt_val.feats, gt_val.labels, ds.classes)
        if not calibrate:
            temperature, calib = 1.0, {"note": "not fitted (calibrate=False)", "points": calib.get("points", 0)}
        head.temperature = temperature
        log_calibration(calib, report, log)
    meta = HeadMeta(
        classes=list(ds.classes), colors=[list(c) for c in ds.colors] or [[255, 255, 0]] * len(ds.classes),
        encoder=enc.name, weights_hash=enc.weights_hash, weights_source=enc.weights_ref, dim=enc.dim, mpp=fz.mpp, window=fz.window,
        stride=fz.stride, align=fz.align, input_size=enc.input_size, hidden=head.hidden, mode=mode,
        val_scores={"selection": select_desc, **scores},
        train={**asdict(cfg), "dataset": str(ds.root), "train_images": len(train), "val_images": len(val),
               "val_carved": carved, "val_stems": val if carved else [], "train_points": len(tr),
               "stain_augment": stain_augment, "stain_strength": stain_strength, "stain_space": stain_space,
               "detector": det_id, "feature_seconds": round(t_feat, 1), "train_seconds": round(t_train, 1),
               **({"finetune": finetune or {}} if mode in ("lora", "full") else {})},
        encoder_hash=enc_hash, stain_norm=fz.stain_norm, feature_tta=fz.feature_tta,
        untrained_classes=[c for c, u in zip(ds.classes, head.untrained.tolist()) if u],
        temperature=temperature, calibration=calib, val_report=report,
        taps=list(enc.taps), encoder_variant=enc.spec.variant_name(enc.taps, fz.mpp) if enc.taps else "",
    )
    meta.train["class_balance"] = cfg.balance
    meta.train["class_points"] = {c: int((tr.labels == i).sum()) for i, c in enumerate(ds.classes)}
    if ctx.active:
        meta.train["processes"] = ctx.world
    if ctx.is_main:
        try:
            save_head(out, head, meta, enc_tensors)
        except OSError as e:
            raise InputError(f"{out}: cannot write the head checkpoint ({e.strerror or e})") from None
    log(f"wrote {out}: {meta.describe()}; val {scores}")
    return meta
