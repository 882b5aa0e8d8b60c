"""Leave-one-site-out cross-validation of head training on cached point features.

A validation split drawn from the same tissue-source sites as train cannot show how a head
copes with another site's staining. Here the images of train+val are grouped by site (for
TCGA names the tissue-source-site code, ``TCGA-A7-...`` -> ``A7``); each fold trains a head on
all sites but one and scores macro-F1 at the ground-truth points of the held-out site. The
folds' mean and standard deviation compare training configurations without touching test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from denuc.errors import InputError
from denuc.train.features import PointFeatures, concat_features
from denuc.train.head import HeadTrainConfig, Scorer, fit_head, macro_f1, predict_probs

#: ``group(stem) -> site id``.
GroupFn = Callable[[str], str]


def tcga_site(stem: str) -> str:
    """Tissue-source-site code of a TCGA image name (``TCGA-A7-A0D9-...`` -> ``A7``)."""
    parts = stem.split("-")
    if len(parts) < 3 or parts[0].upper() != "TCGA" or not parts[1]:
        raise InputError(f"{stem!r} is not a TCGA name (TCGA-<site>-<participant>-...); cannot group it by site")
    return parts[1]


def merge_features(parts: Sequence[PointFeatures]) -> PointFeatures:
    """Stack point sets of *different* images keeping their stems (e.g. train + val)."""
    stems = [s for p in parts for s in p.stems]
    if len(set(stems)) != len(stems):
        raise InputError("merge_features: the parts share image stems")
    offs = np.cumsum([0] + [len(p.stems) for p in parts])
    return PointFeatures(np.concatenate([p.feats for p in parts]), np.concatenate([p.labels for p in parts]),
                         np.concatenate([p.image + o for p, o in zip(parts, offs)]).astype(np.int32),
                         np.concatenate([p.xy for p in parts]), np.concatenate([p.scores for p in parts]),
                         stems, [m for p in parts for m in p.mpps])


def site_groups(stems: Sequence[str], group: GroupFn = tcga_site) -> dict[str, list[str]]:
    """``{site: stems}`` in order of first appearance."""
    out: dict[str, list[str]] = {}
    for s in stems:
        out.setdefault(group(s), []).append(s)
    return out


@dataclass
class FoldScore:
    """Score of one held-out site: macro-F1 and per-class F1 at its GT points."""

    site: str
    images: int
    points: int
    macro_f1: float
    class_f1: list[float]


def leave_one_site_out(pool: PointFeatures, n_classes: int, cfg: HeadTrainConfig, *,
                       aug: Sequence[PointFeatures] = (), group: GroupFn = tcga_site,
                       make_scorer: Callable[[], Scorer] | None = None,
                       log: Callable[[str], None] = lambda m: None) -> list[FoldScore]:
    """Train ``cfg`` on all sites but one, score the held-out site; one :class:`FoldScore` per site.

    Args:
        pool: GT-point features ``(N, C)`` of all images (labels ``-1`` = unknown, ignored).
        aug: extra feature passes over the *same* images (e.g. stain-jittered), same stems;
            only their training-site images are used.
        make_scorer: optional epoch selection inside training (e.g. a fixed stop epoch); the
            default keeps the last epoch (no selection on the held-out site).
    """
    groups = site_groups(pool.stems, group)
    if len(groups) < 2:
        raise InputError(f"leave-one-site-out needs at least 2 sites; got {list(groups)}")
    for a in aug:
        if sorted(a.stems) != sorted(pool.stems):
            raise InputError("augmented passes must cover the same images as the pool")
    out = []
    for site, held in groups.items():
        train_stems = [s for s in pool.stems if s not in set(held)]
        tr = concat_features([pool.subset(train_stems), *[a.subset(train_stems) for a in aug]])
        te = pool.subset(held)
        known = te.labels >= 0
        head, _ = fit_head(tr, n_classes, cfg, make_scorer() if make_scorer else None, log=log)
        pred = predict_probs(head, te.feats[known]).argmax(1)
        mf1, f1s = macro_f1(te.labels[known], pred, n_classes)
        out.append(FoldScore(site, len(held), int(known.sum()), mf1, f1s))
        log(f"  site {site}: {len(held)} images, {int(known.sum())} points, macro-F1 {mf1:.4f}")
    return out


def summarize(folds: Sequence[FoldScore]) -> dict[str, float]:
    """Mean and (population) standard deviation of the folds' macro-F1, and the worst fold."""
    v = np.array([f.macro_f1 for f in folds])
    return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min())}
