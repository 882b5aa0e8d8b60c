"""Leave-one-site-out CV, HED stain jitter and the train-head options added with them."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest

from denuc.errors import InputError
from denuc.train.features import PointFeatures
from denuc.train.head import HeadTrainConfig, fit_head, macro_f1, predict_probs
from denuc.train.site_cv import (
    leave_one_site_out,
    merge_features,
    site_groups,
    summarize,
    tcga_site,
)


def _features(stems: list[str], n: int, shift: dict[str, float], seed: int = 0) -> PointFeatures:
    """Two classes separated along channel 0; each image's site adds ``shift[site]`` to channel 1."""
    rng = np.random.default_rng(seed)
    feats, labels, image = [], [], []
    for i, s in enumerate(stems):
        y = rng.integers(0, 2, n)
        x = rng.normal(0, 0.3, (n, 4))
        x[:, 0] += 2 * y - 1
        x[:, 1] += shift[tcga_site(s)]
        feats.append(x)
        labels.append(y)
        image.append(np.full(n, i, np.int32))
    k = len(stems) * n
    return PointFeatures(np.concatenate(feats).astype(np.float16), np.concatenate(labels).astype(np.int64),
                         np.concatenate(image), np.zeros((k, 2)), np.ones(k, np.float32), list(stems),
                         [0.5] * len(stems))


STEMS = [f"TCGA-{site}-X{i}-01Z" for site in ("A7", "A8", "AC") for i in range(3)]


def test_tcga_site_and_groups() -> None:
    assert tcga_site("TCGA-A7-A0D9-01Z-00-DX2_18001_13001") == "A7"
    with pytest.raises(InputError, match="not a TCGA name"):
        tcga_site("image_001")
    g = site_groups(STEMS)
    assert list(g) == ["A7", "A8", "AC"] and all(len(v) == 3 for v in g.values())


def test_leave_one_site_out_trains_without_the_held_out_site() -> None:
    pool = _features(STEMS, 40, {"A7": 0.0, "A8": 0.5, "AC": -0.5})
    aug = _features(STEMS, 40, {"A7": 0.2, "A8": 0.7, "AC": -0.3}, seed=1)
    folds = leave_one_site_out(pool, 2, HeadTrainConfig(epochs=20, lr=0.05, batch_size=32), aug=[aug])
    assert [f.site for f in folds] == ["A7", "A8", "AC"]
    assert all(f.images == 3 and f.points == 120 for f in folds)
    assert all(f.macro_f1 > 0.9 for f in folds)  # separable along channel 0; chance is 0.5
    s = summarize(folds)
    assert s["min"] <= s["mean"] and s["std"] >= 0
    # the held-out site's labels cannot leak. Site AC's labels are flipped, and AC's points also
    # carry their class on channel 2 (noise elsewhere): a fit that saw AC can learn the flip there
    # (the leaky control below scores high), a fit on A7 + A8 alone predicts the unflipped class.
    scr = PointFeatures(pool.feats.copy(), pool.labels.copy(), pool.image, pool.xy, pool.scores, pool.stems,
                        pool.mpps)
    ac = np.isin(scr.image, [i for i, s in enumerate(STEMS) if tcga_site(s) == "AC"])
    scr.feats[ac, 2] += (2 * scr.labels[ac] - 1) * 3
    scr.labels[ac] = 1 - scr.labels[ac]
    cfg = HeadTrainConfig(epochs=20, lr=0.05, batch_size=32)
    f2 = leave_one_site_out(scr, 2, cfg)
    assert f2[2].macro_f1 < 0.1
    assert min(f2[0].macro_f1, f2[1].macro_f1) > 0.6  # the other folds still learn (AC's flip is a minority)
    leaky, _ = fit_head(scr, 2, cfg)  # the control: trained on all three sites, AC included
    assert macro_f1(scr.labels[ac], predict_probs(leaky, scr.feats[ac]).argmax(1), 2)[0] > 0.9
    with pytest.raises(InputError, match="same images"):
        leave_one_site_out(pool, 2, HeadTrainConfig(epochs=1), aug=[pool.subset(STEMS[:3])])
    with pytest.raises(InputError, match="at least 2 sites"):
        leave_one_site_out(pool.subset(STEMS[:3]), 2, HeadTrainConfig(epochs=1))


def test_merge_features_keeps_stems_and_rejects_overlap() -> None:
    a, b = _features(STEMS[:4], 5, {"A7": 0, "A8": 0}), _features(STEMS[4:], 5, {"A8": 0, "AC": 0})
    m = merge_features([a, b])
    assert m.stems == STEMS and len(m) == 45 and m.image.max() == 8
    assert np.array_equal(m.subset(STEMS[4:]).feats, b.feats)
    with pytest.raises(InputError, match="share image stems"):
        merge_features([a, a])


def test_train_head_cli_options_reach_the_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from denuc.classify.head import read_meta
    from denuc.encode.tiny import register_tiny
    from denuc.train import head_cli
    from synthetic import make_blob_dataset

    register_tiny()
    ds = make_blob_dataset(tmp_path / "blobs", n_images=6)
    monkeypatch.setattr("denuc.train.head_run.open_training_dataset", lambda path, **kw: ds)  # in-memory synthetic dataset
    p = argparse.ArgumentParser()
    head_cli.configure(p)
    out = tmp_path / "h.safetensors"
    args = p.parse_args([str(ds.root), "--encoder", "tiny-uni", "--weights", "random", "--out", str(out),
                         "--epochs", "3", "--select", "last", "--weight-decay", "0.01", "--stain-augment", "1",
                         "--stain-space", "hed", "--stain-strength", "0.2", "--window", "64",
                         "--stain-norm", "macenko", "--cache-dir", str(tmp_path / "c"),
                         "--encoder-variant", "last4", "--taps", "b0"])
    assert head_cli.main(args) == 0
    meta = read_meta(out)
    assert meta.train["select"] == "last" and meta.train["weight_decay"] == 0.01
    assert meta.train["stain_space"] == "hed" and meta.train["stain_strength"] == 0.2
    assert meta.stain_norm == "macenko"
    assert meta.taps == ["b0"] and meta.dim == 32  # --taps overrides the variant's taps
    assert meta.val_scores["epoch"] == 3 and "macro_f1" in meta.val_scores
