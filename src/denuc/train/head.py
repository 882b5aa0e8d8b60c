"""Training the classification head on cached point features (linear / mlp).

Recipe (DeNuC paper): SGD lr 1e-2, momentum 0.9, weight decay 5e-4, batch 256, cosine
schedule over ``epochs`` (default 100), cross-entropy. The epoch kept is the best on val:
mean class F1 at *detected* points when a detector is given (unmatched detections count as
errors, :func:`denuc.evaluate.evaluate`), else macro-F1 at ground-truth points.

Class balance (``class_balance``): ``none`` (default), ``weighted`` (cross-entropy weights
``N / (K n_c)``) or ``sampled`` (each epoch draws as many points as there are, with
replacement, each class equally likely). ``none`` stays the default: class weighting
measured no gain on val (``benchmarks/reported/classifier_site_cv.json``, "30 ep,
class-balanced": official val macro-F1 0.783 against 0.791 unweighted, site-CV mean 0.698
against 0.696).

The shipped head's recipe (``denuc train-head``'s defaults, :data:`HEAD_PRESETS`
``shipped``) and the paper's (``paper``) are named presets.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from denuc.classify.head import PointHead
from denuc.core.checks import check_int, check_number, plain_number
from denuc.core.result import Nuclei
from denuc.data.base import PointDataset
from denuc.errors import InputError, ModelError
from denuc.train.features import PointFeatures
from denuc.train.head_presets import CLASS_BALANCE, HEAD_PRESETS  # noqa: F401  (HEAD_PRESETS re-exported)

#: ``score(head) -> metrics dict`` with the selection metric under ``"select"``.
Scorer = Callable[[PointHead], dict[str, float]]


@dataclass
class HeadTrainConfig:
    """Settings of head training (recorded in the checkpoint)."""

    epochs: int = 100
    lr: float = 1e-2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 256
    class_weights: str = "none"  # former spelling of class_balance: "auto" = "weighted", "none"
    class_balance: str = "none"  # "none", "weighted" (loss weights N / (K n_c)) or "sampled" (class-balanced draws)
    hidden: int = 0  # 0 = linear head, else MLP width
    dropout: float = 0.0
    seed: int = 0
    select: str = "val"  # "val": keep the best epoch on val; "last": keep the last epoch (val only reported)
    extra: dict[str, object] = field(default_factory=dict)

    def check(self) -> HeadTrainConfig:
        """Raise :class:`InputError` for a setting that cannot train a usable head; return self."""
        check_int(self.epochs, 1, "epochs (--epochs)")
        check_int(self.batch_size, 1, "batch size (--batch-size)")
        check_int(self.hidden, 0, "MLP width (--hidden)")
        check_int(self.seed, 0, "seed (--seed)")
        check_number(self.lr, "learning rate (--lr)", low=0.0, low_open=True)
        check_number(self.weight_decay, "weight decay (--weight-decay)", low=0.0)
        check_number(self.momentum, "momentum", low=0.0, high=1.0)
        check_number(self.dropout, "dropout", low=0.0, high=1.0)
        if self.class_weights not in ("auto", "none"):
            raise InputError(f"class weights must be 'auto' or 'none'; got {self.class_weights!r}")
        if self.class_balance not in CLASS_BALANCE:
            raise InputError(f"class balance (--class-balance) must be one of {list(CLASS_BALANCE)}; "
                             f"got {self.class_balance!r}")
        if self.class_weights == "auto" and self.class_balance == "sampled":
            raise InputError("class_weights='auto' (weighted) and class_balance='sampled' are two balancings; "
                             "give one")
        if self.select not in ("val", "last"):
            raise InputError(f"epoch selection must be 'val' or 'last'; got {self.select!r}")
        return self

    @property
    def balance(self) -> str:
        """The class balancing in effect (``class_weights="auto"`` is ``weighted``)."""
        return "weighted" if self.class_weights == "auto" else self.class_balance


def split_train_val(ds: PointDataset, seed: int = 0, fraction: float = 0.1,
                    log: Callable[[str], None] = print, need_val: bool = True) -> tuple[list[str], list[str], bool]:
    """``(train stems, val stems, carved)``. Without a val split, ``fraction`` of train is carved
    off reproducibly (``numpy.random.default_rng(seed)`` over the sorted stems).

    ``need_val=False`` (val would only be reported, e.g. ``select="last"``): a single training
    image is kept for training and val is empty instead of raising.
    """
    train = ds.stems("train") or [s for s in ds.stems(None) if s not in set(ds.stems("test"))]
    val = ds.stems("val")
    if val:
        return list(train), list(val), False
    if not train:
        raise InputError(f"{ds.root}: the dataset has no training images")
    if len(train) < 2:
        if not need_val:
            log(f"{ds.root}: no val split and a single training image: training on it, no val scores")
            return list(train), [], False
        raise InputError(f"{ds.root}: need at least 2 training images to carve a validation split "
                         "(or add a val split; with --select last a single image trains without val)")
    from denuc.data.splits import carve_val

    n_all = len(train)
    train, val = carve_val(train, fraction, seed)
    log(f"{ds.root}: no val split; carved {len(val)} of {n_all} train images as val "
        f"(seed {seed}): {', '.join(val[:5])}{' ...' if len(val) > 5 else ''}")
    return train, val, True


def class_weight_tensor(labels: np.ndarray, n_classes: int, mode: str) -> torch.Tensor | None:
    """Inverse-frequency weights ``N / (K * n_c)`` for ``auto``; None for ``none``."""
    if mode == "none":
        return None
    if mode != "auto":
        raise InputError(f"class weights must be 'auto' or 'none'; got {mode!r}")
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    w = len(labels) / (n_classes * np.maximum(counts, 1))
    return torch.tensor(w, dtype=torch.float32)


def predict_probs(head: PointHead, feats: np.ndarray | torch.Tensor, batch: int = 8192) -> np.ndarray:
    """``(N, C)`` features -> ``(N, K)`` float32 softmax probabilities."""
    head.eval()
    x = torch.as_tensor(feats)
    outs = []
    with torch.inference_mode():
        for i in range(0, len(x), batch):
            outs.append(F.softmax(head(x[i:i + batch].float()), dim=1))
    return torch.cat(outs).numpy() if outs else np.zeros((0, head.net[-1].out_features), np.float32)


def macro_f1(y: np.ndarray, pred: np.ndarray, n_classes: int) -> tuple[float, list[float]]:
    """Mean over classes of the per-class F1 of a labelled classification."""
    f1s = []
    for c in range(n_classes):
        tp = float(np.sum((pred == c) & (y == c)))
        d = float(np.sum(pred == c) + np.sum(y == c))
        f1s.append(2 * tp / d if d else 0.0)
    return float(np.mean(f1s)), f1s


def gt_scorer(val: PointFeatures, n_classes: int) -> Scorer:
    """Selection by macro-F1 of classifying val ground-truth points."""

    known = val.labels >= 0
    feats, labels = val.feats[known], val.labels[known]
    if not len(labels):
        raise InputError("the validation images have no labelled points with a class")

    def score(head: PointHead) -> dict[str, float]:
        pred = predict_probs(head, feats).argmax(1)
        mf1, _ = macro_f1(labels, pred, n_classes)
        return {"select": mf1, "macro_f1": mf1, "accuracy": float(np.mean(pred == labels))}

    return score


def detected_nuclei(head: PointHead, det: PointFeatures, classes: Sequence[str]) -> dict[str, Nuclei]:
    """Classified detections per stem; score = detection score x probability of the argmax class."""
    probs = predict_probs(head, det.feats)
    ids = probs.argmax(1) if len(probs) else np.zeros(0, np.int64)
    out = {}
    for s in det.stems:
        n = det.nuclei(s, ids, classes, probs)
        if len(n):
            n.scores = (n.scores * n.probs.max(1)).astype(np.float32)
        out[s] = n
    return out


def det_scorer(det: PointFeatures, gt: dict[str, Nuclei], classes: Sequence[str], protocol: str = "denuc") -> Scorer:
    """Selection by mean class F1 of the classified detections (unmatched detections are errors)."""
    from denuc.evaluate.api import evaluate

    def score(head: PointHead) -> dict[str, float]:
        rep = evaluate(gt, detected_nuclei(head, det, classes), protocol=protocol)
        out = {"select": rep.mean_f1, "mean_f1": rep.mean_f1, "det_f1": rep.detection.f1}
        out.update({f"f1_{c}": v.f1 for c, v in rep.classes.items()})
        return out

    return score


def check_class_counts(counts: np.ndarray, names: Sequence[str]) -> list[int]:
    """Ids of the classes without training points, given ``(K,)`` training point ``counts``.

    Raises :class:`InputError` when fewer than 2 classes have points: such a head could only
    ever answer one class.
    """
    seen = [names[c] for c in range(len(names)) if counts[c]]
    if not seen:
        raise InputError("no training points with a class")
    if len(seen) < 2:
        raise InputError(f"only class {seen[0]!r} has training points ({int(counts.sum())}); a classification head "
                         f"needs points of at least 2 classes (classes: {list(names)}). Label other classes, or use "
                         "`denuc detect` for class-agnostic points")
    return [c for c in range(len(names)) if not counts[c]]


def fit_head(train: PointFeatures, n_classes: int, cfg: HeadTrainConfig, scorer: Scorer | None = None,
             log: Callable[[str], None] = print, head: PointHead | None = None,
             class_names: Sequence[str] | None = None,
             history: list[dict[str, float]] | None = None,
             keep_best: bool = True) -> tuple[PointHead, dict[str, float]]:
    """Train a :class:`PointHead` on cached features; keep the best epoch by ``scorer``.

    ``history``, when given, receives one ``{"epoch", "loss"[, "val"]}`` per epoch (mean
    training loss; the scorer's selection metric when there is a scorer). ``keep_best=False``
    only records the scorer's values: the last epoch is kept and its metrics returned.

    Classes with no training point cannot be learnt: they are named in a warning and the head
    never predicts them (:meth:`PointHead.set_untrained`; ``head.untrained`` marks them). Fewer
    than 2 classes with points, a non-finite feature, or a loss or weight that turns NaN/inf
    (divergence, e.g. a too high ``lr``) raise instead of returning an unusable head.

    Returns:
        the selected head (eval mode) and its val metrics (``{}`` without a scorer: last epoch).
    """
    cfg.check()
    keep = train.labels >= 0  # points of unknown class (id -1) cannot teach a class
    if not keep.all():
        log(f"  ignoring {int((~keep).sum())} training point(s) without a class")
        train = PointFeatures(train.feats[keep], train.labels[keep], train.image[keep], train.xy[keep],
                              train.scores[keep], train.stems, train.mpps)
    if len(train) == 0:
        raise InputError("no training points with a class")
    if int(train.labels.max()) >= n_classes:
        raise InputError(f"training labels reach class id {int(train.labels.max())}, but the head has {n_classes} classes")
    names = list(class_names or [f"class {i}" for i in range(n_classes)])
    missing = check_class_counts(np.bincount(train.labels, minlength=n_classes), names)
    if not np.isfinite(train.feats).all():
        raise InputError("training features contain NaN or infinite values (a corrupt cache or encoder output)")
    torch.manual_seed(cfg.seed)
    x = torch.from_numpy(train.feats.astype(np.float32))
    y = torch.from_numpy(train.labels)
    if head is None:
        head = PointHead(x.shape[1], n_classes, cfg.hidden, cfg.dropout)
        head.set_standardization(x)
    if missing:
        warnings.warn(f"class(es) {[names[c] for c in missing]} have no training points: the head cannot learn "
                      "them and will never predict them (recorded in the head as untrained_classes)", stacklevel=2)
    head.set_untrained(missing)
    opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps = max(1, cfg.epochs * -(-len(x) // cfg.batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    balance = cfg.balance
    weight = class_weight_tensor(train.labels, n_classes, "auto" if balance == "weighted" else "none")
    draw_p = None
    if balance == "sampled":  # each class equally likely per draw, uniform within a class
        counts = torch.bincount(y, minlength=n_classes).double()
        draw_p = (1.0 / counts.clamp_min(1))[y]
    g = torch.Generator().manual_seed(cfg.seed)
    best: tuple[float, dict[str, float], dict[str, torch.Tensor]] | None = None
    t0 = time.perf_counter()
    for ep in range(cfg.epochs):
        head.train()
        perm = (torch.randperm(len(x), generator=g) if draw_p is None
                else torch.multinomial(draw_p, len(x), replacement=True, generator=g))
        total = 0.0
        for i in range(0, len(x), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            loss = F.cross_entropy(head(x[idx]), y[idx], weight=weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            v = float(loss.detach())
            if not math.isfinite(v):
                raise ModelError(f"head training diverged: loss {v} at epoch {ep + 1}/{cfg.epochs} (lr {plain_number(cfg.lr)}, "
                                 f"weight decay {plain_number(cfg.weight_decay)}); nothing was written. Lower --lr")
            total += v * len(idx)
        m = scorer(head) if scorer is not None else None
        if history is not None:
            history.append({"epoch": ep + 1, "loss": total / len(x), **({"val": m["select"]} if m else {})})
        if m is not None:
            if best is None or m["select"] > best[0] or not keep_best:
                best = (m["select"], {"epoch": ep + 1, **m}, copy.deepcopy(head.state_dict()))
            if (ep + 1) % max(1, cfg.epochs // 10) == 0 or ep + 1 == cfg.epochs:
                kept = f"(best {best[0]:.4f} @ {best[1]['epoch']}) " if keep_best else ""
                log(f"  epoch {ep + 1}/{cfg.epochs} loss {total / len(x):.4f} val {m['select']:.4f} "
                    f"{kept}{time.perf_counter() - t0:.1f} s")
    if best is not None:
        head.load_state_dict(best[2])
    bad = [k for k, v in head.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelError(f"head training diverged: weights {bad[:3]} are NaN or infinite (lr {plain_number(cfg.lr)}); "
                         "nothing was written. Lower --lr")
    return head.eval(), (best[1] if best is not None else {})
