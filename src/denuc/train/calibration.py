"""Calibration and per-class scores of a classification head on labelled val points.

* :func:`fit_temperature`: the temperature ``T`` that minimises the negative log-likelihood
  of ``softmax(logits / T)`` on val (Guo et al. 2017, "On calibration of modern neural
  networks"). Dividing every logit by one ``T > 0`` keeps the arg-max, so predicted classes
  and every accuracy or F1 stay the same; only the probabilities (and the output scores
  ``detection score x class probability``) change.
* :func:`reliability`: confidence (max probability) against accuracy in equal-width bins
  and the expected calibration error ECE = sum over bins of (bin share) x |accuracy -
  confidence|.
* :func:`class_report`: per-class precision, recall, F1 and the confusion matrix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: Fewest labelled val points a temperature is fitted on; with fewer the head keeps T = 1.
MIN_CALIBRATION_POINTS = 20
#: Search range of the temperature.
T_RANGE = (0.05, 20.0)
ECE_BINS = 15


def fit_temperature(logits: np.ndarray | torch.Tensor, labels: np.ndarray) -> float:
    """The temperature ``T`` in :data:`T_RANGE` minimising the mean NLL of ``softmax(logits / T)``.

    Args:
        logits: ``(N, K)`` class logits (``-inf`` for classes the head never predicts).
        labels: ``(N,)`` class ids in ``[0, K)`` whose logit is finite.
    """
    from scipy.optimize import minimize_scalar

    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    lo, hi = math.log(T_RANGE[0]), math.log(T_RANGE[1])
    res = minimize_scalar(nll, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    best = float(res.x) if res.success and nll(float(res.x)) <= nll(0.0) else 0.0
    return float(math.exp(best))


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of ``labels`` under ``(N, K)`` ``probs``."""
    p = probs[np.arange(len(labels)), labels]
    return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0)))) if len(labels) else 0.0


def reliability(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, Any]:
    """Reliability of ``(N, K)`` probabilities against ``(N,)`` true class ids.

    Returns:
        ``{"ece", "bins": [{"lo", "hi", "count", "confidence", "accuracy"}, ...]}``: bins
        of the max probability, equal width over [0, 1] (empty bins have count 0 and no
        confidence/accuracy).
    """
    conf = probs.max(1) if len(probs) else np.zeros(0)
    correct = (probs.argmax(1) == labels) if len(probs) else np.zeros(0, bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        m = idx == b
        n = int(m.sum())
        row: dict[str, Any] = {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": n}
        if n:
            c, a = float(conf[m].mean()), float(correct[m].mean())
            row.update(confidence=c, accuracy=a)
            ece += n / len(conf) * abs(a - c)
        bins.append(row)
    return {"ece": float(ece), "bins": bins}


def class_report(labels: np.ndarray, pred: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """Per-class precision/recall/F1 (and support = true points) and the ``(K, K)`` confusion
    matrix (rows: true class, columns: predicted class) of a labelled classification."""
    k = len(names)
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (labels, pred), 1)
    per = {}
    for c, name in enumerate(names):
        tp, n_pred, n_true = int(cm[c, c]), int(cm[:, c].sum()), int(cm[c].sum())
        p = tp / n_pred if n_pred else 0.0
        r = tp / n_true if n_true else 0.0
        per[name] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": n_true}
    return {"per_class": per, "confusion": cm.tolist(), "classes": list(names),
            "accuracy": float(np.trace(cm) / max(cm.sum(), 1)),
            "macro_f1": float(np.mean([v["f1"] for v in per.values()])) if per else 0.0}


def format_class_report(rep: dict[str, Any]) -> list[str]:
    """Lines of a small table: class, precision, recall, F1, support."""
    lines = [f"  {'class':<16} {'precision':>9} {'recall':>7} {'F1':>6} {'points':>7}"]
    for name, v in rep["per_class"].items():
        lines.append(f"  {name:<16} {v['precision']:>9.3f} {v['recall']:>7.3f} {v['f1']:>6.3f} {v['support']:>7d}")
    return lines


def head_logits(head: torch.nn.Module, feats: np.ndarray, batch: int = 8192) -> np.ndarray:
    """``(N, C)`` features -> ``(N, K)`` float64 logits of ``head`` at temperature 1."""
    old = getattr(head, "temperature", 1.0)
    head.temperature = 1.0  # type: ignore[assignment]
    head.eval()
    x = torch.as_tensor(feats)
    outs = []
    try:
        with torch.inference_mode():
            for i in range(0, len(x), batch):
                outs.append(head(x[i:i + batch].float()).double())
    finally:
        head.temperature = old  # type: ignore[assignment]
    k = int(getattr(head, "untrained").numel())
    return torch.cat(outs).numpy() if outs else np.zeros((0, k))


def _softmax(z: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(z), dim=1).numpy() if len(z) else z


def calibrate_head(head: torch.nn.Module, feats: np.ndarray, labels: np.ndarray,
                   names: Sequence[str]) -> tuple[float, dict[str, Any], dict[str, Any]]:
    """Fit the temperature of ``head`` on labelled val points and score it.

    Args:
        feats: ``(N, C)`` features of val ground-truth points; ``labels``: ``(N,)`` class ids
            (``-1`` = no class; such points are left out).

    Returns:
        ``(temperature, calibration record, class report)``: the temperature is 1 (not
        fitted, said in the record's ``note``) with fewer than :data:`MIN_CALIBRATION_POINTS`
        usable points; the record holds the point count, NLL and ECE before and after, and
        the reliability bins before and after; the class report (:func:`class_report`) is
        at every labelled point.
    """
    labels = np.asarray(labels, np.int64)
    known = labels >= 0
    z = head_logits(head, feats[known])
    y = labels[known]
    report = class_report(y, z.argmax(1) if len(z) else np.zeros(0, np.int64), names)
    usable = np.isfinite(z[np.arange(len(y)), y]) if len(y) else np.zeros(0, bool)
    z, y = z[usable], y[usable]
    before = _softmax(z)
    rec: dict[str, Any] = {"points": int(len(y)), "source": "ground-truth points of the val images"}
    if len(y) < MIN_CALIBRATION_POINTS:
        rec.update(temperature=1.0, note=f"not fitted: {len(y)} labelled val points (fewer than "
                                         f"{MIN_CALIBRATION_POINTS}); temperature 1")
        if len(y):
            rel = reliability(before, y)
            rec.update(nll_before=nll(before, y), ece_before=rel["ece"], reliability_before=rel["bins"])
        return 1.0, rec, report
    t = fit_temperature(z, y)
    after = _softmax(z / t)
    rb, ra = reliability(before, y), reliability(after, y)
    rec.update(temperature=t, nll_before=nll(before, y), nll_after=nll(after, y), ece_before=rb["ece"],
               ece_after=ra["ece"], reliability_before=rb["bins"], reliability_after=ra["bins"])
    return t, rec, report
