"""Head training on cached features: tiny synthetic end-to-end, cache reuse, checkpoints, modes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from denuc.classify.head import load_head, read_meta
from denuc.encode import build_encoder
from denuc.encode.tiny import register_tiny
from denuc.errors import InputError, ModelError
from denuc.query import PointFeaturizer
from denuc.train.features import cached_features
from denuc.train.head import (
    HeadTrainConfig,
    class_weight_tensor,
    predict_probs,
    split_train_val,
)
from denuc.train.head_run import train_head
from synthetic import make_blob_dataset

register_tiny()


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    return make_blob_dataset(tmp_path_factory.mktemp("blobs"), n_images=8)


def _counting(enc: torch.nn.Module) -> list[int]:
    calls = [0]
    enc.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_linear_head_learns_blobs_and_reuses_cache(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    enc = build_encoder("tiny-uni", weights="random")
    calls = _counting(enc)
    cfg = HeadTrainConfig(epochs=30, lr=1e-2)
    meta = train_head(blobs, enc, tmp_path / "h.safetensors", cache_dir=tmp_path / "cache", config=cfg,
                      window=64, stride=48, log=lambda m: None)
    assert calls[0] > 0
    assert meta.val_scores["macro_f1"] > 0.8  # chance is 0.5
    assert meta.encoder == "tiny-uni" and meta.weights_hash == enc.weights_hash and meta.classes == ["dark", "light"]
    first = calls[0]
    meta2 = train_head(blobs, enc, tmp_path / "h2.safetensors", cache_dir=tmp_path / "cache", config=cfg,
                       window=64, stride=48, log=lambda m: None)
    assert calls[0] == first  # second run reads the cache, never calls the encoder
    assert meta2.val_scores["macro_f1"] == meta.val_scores["macro_f1"]
    # another geometry is another cache entry
    train_head(blobs, enc, tmp_path / "h3.safetensors", cache_dir=tmp_path / "cache", config=HeadTrainConfig(epochs=1),
               window=64, stride=48, align="corners", log=lambda m: None)
    assert calls[0] > first


def test_checkpoint_round_trip(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    enc = build_encoder("tiny-uni", weights="random")
    out = tmp_path / "h.safetensors"
    train_head(blobs, enc, out, cache_dir=tmp_path / "c", config=HeadTrainConfig(epochs=3), mode="mlp",
               window=64, log=lambda m: None)
    meta = read_meta(out)
    assert (meta.mode, meta.hidden, meta.dim, meta.window, meta.align) == ("mlp", 256, 32, 64, "center")
    assert (meta.taps, meta.encoder_variant) == (["b-1"], "last")  # the taps it reads are recorded
    assert meta.version and "macro_f1" in meta.val_scores
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:  # plain safetensors + JSON metadata, nothing pickled
        assert json.loads(f.metadata()["denuc"])["encoder"] == "tiny-uni"
    head, meta2, enc_t = load_head(out)
    assert meta2 == meta and enc_t == {}
    fz = PointFeaturizer(enc, window=64)
    feats = cached_features(fz, blobs, blobs.stems("val"), cache_dir=tmp_path / "c", log=lambda m: None)["gt"]
    head.eval()
    p = predict_probs(head, feats.feats)
    assert p.shape == (len(feats), 2) and np.allclose(p.sum(1), 1, atol=1e-5)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    with pytest.raises(ModelError):
        read_meta(bad)


def test_carved_val_is_reproducible(tmp_path: Path) -> None:
    ds = make_blob_dataset(tmp_path / "noval", n_images=10, with_val=False)
    logs: list[str] = []
    a = split_train_val(ds, seed=0, log=logs.append)
    b = split_train_val(ds, seed=0, log=lambda m: None)
    assert a == b and a[2] is True and len(a[1]) == 1
    assert not set(a[0]) & set(a[1]) and "carved" in logs[0]
    seeds = {tuple(split_train_val(ds, seed=s, log=lambda m: None)[1]) for s in range(6)}
    assert len(seeds) > 1


def test_class_weights() -> None:
    w = class_weight_tensor(np.array([0, 0, 0, 1]), 2, "auto")
    assert w is not None and w[1] > w[0]
    assert class_weight_tensor(np.array([0, 1]), 2, "none") is None
    with pytest.raises(InputError):
        class_weight_tensor(np.array([0, 1]), 2, "sometimes")


def test_lora_and_full_modes(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("peft")
    # a barely trained head (one epoch at a tiny lr) that the fine-tuning epoch beats on val, so the
    # encoder update is kept and must be saved with the head
    cfg = HeadTrainConfig(epochs=1, lr=1e-4)
    for mode in ("lora", "full"):
        enc = build_encoder("tiny-uni", weights="random")
        base = {k: v.clone() for k, v in enc.body.state_dict().items()}
        out = tmp_path / f"{mode}.safetensors"
        meta = train_head(blobs, enc, out, mode=mode, cache_dir=tmp_path / "c", config=cfg, window=64,
                          finetune={"epochs": 1, "lr": 1e-3, "head_lr": 1e-2}, log=lambda m: None)
        _, meta2, tensors = load_head(out)
        assert meta2.mode == mode and meta.val_scores["finetune_epoch"] == 1
        assert tensors and meta2.encoder_hash
        assert all(not torch.equal(v, base[k]) for k, v in tensors.items())  # only the changed weights
        if mode == "lora":  # the adapters merged into the attention projections they adapt
            assert all("qkv" in k for k in tensors)
        else:
            assert any("qkv" not in k for k in tensors)
    with pytest.raises(ModelError, match="LoRA does not apply"):
        train_head(blobs, "efficientnet-lite0", tmp_path / "x.safetensors", mode="lora", log=lambda m: None)


def test_stain_augmented_passes_are_cached_and_reproducible(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from denuc.data.stain import stain_jitter
    from denuc.train.features import augmented_gt_features

    img = np.full((8, 8, 3), 128, np.uint8)
    a = stain_jitter(img, np.random.default_rng(1))
    assert a.dtype == np.uint8 and a.shape == img.shape and not np.array_equal(a, img)
    assert np.array_equal(a, stain_jitter(img, np.random.default_rng(1)))
    enc = build_encoder("tiny-uni", weights="random")
    calls = _counting(enc)
    fz = PointFeaturizer(enc, window=64)
    p1 = augmented_gt_features(fz, blobs, blobs.stems("train"), 2, cache_dir=tmp_path, log=lambda m: None)
    n = calls[0]
    p2 = augmented_gt_features(fz, blobs, blobs.stems("train"), 2, cache_dir=tmp_path, log=lambda m: None)
    assert calls[0] == n > 0 and len(p1) == 2
    assert np.array_equal(p1[1].feats, p2[1].feats) and not np.array_equal(p1[0].feats, p1[1].feats)
    meta = train_head(blobs, enc, tmp_path / "h.safetensors", cache_dir=tmp_path, stain_augment=2,
                      config=HeadTrainConfig(epochs=2), window=64, log=lambda m: None)
    assert meta.train["train_points"] == 3 * len(p1[0]) and meta.train["stain_augment"] == 2


def test_generic_dataset_without_val_and_with_unclassified_points(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The generic layout (dataset.yaml + images + CSV points) via open_dataset, no val split."""
    import shutil

    import yaml

    root = tmp_path / "generic"
    (root / "images").mkdir(parents=True)
    (root / "points").mkdir()
    for i, s in enumerate(blobs.stems()):
        shutil.copy(blobs.image_path(s), root / "images" / f"{s}.png")
        pts = blobs.points(s)
        names = [blobs.classes[c] for c in pts.class_ids]
        if i == 0:
            names[0] = ""  # a nucleus of unknown class
        rows = ["x,y,class"] + [f"{x},{y},{c}" for (x, y), c in zip(pts.xy, names)]
        (root / "points" / f"{s}.csv").write_text("\n".join(rows) + "\n")
    (root / "dataset.yaml").write_text(yaml.safe_dump({"mpp": 0.25, "classes": list(blobs.classes),
                                                      "splits": {"train": blobs.stems()}}))
    logs: list[str] = []
    meta = train_head(root, build_encoder("tiny-uni", weights="random"), tmp_path / "g.safetensors",
                      cache_dir=tmp_path / "c", config=HeadTrainConfig(epochs=3), window=64, log=logs.append)
    assert meta.train["val_carved"] and meta.train["val_stems"]
    assert any("carved" in m for m in logs) and any("without a class" in m for m in logs)


def test_feature_cache_key_separates_precisions_and_geometry(blobs) -> None:  # type: ignore[no-untyped-def]
    from denuc.train.features import cache_key

    ds = blobs
    enc = build_encoder("tiny-uni", weights="random")
    stems = ds.stems("train")
    fp32 = cache_key(PointFeaturizer(enc, precision="fp32"), ds, stems, "gt")
    assert fp32 == cache_key(PointFeaturizer(enc, precision="auto"), ds, stems, "gt")  # auto = fp32 on a CPU
    assert fp32[1]["precision"] == "float32"
    bf16 = cache_key(PointFeaturizer(enc, precision="bf16"), ds, stems, "gt")
    assert bf16[1]["precision"] == "bfloat16" and bf16[0] != fp32[0]
    assert cache_key(PointFeaturizer(enc, precision="fp32", stride=32), ds, stems, "gt")[0] != fp32[0]
    assert cache_key(PointFeaturizer(enc, precision="fp32"), ds, stems[:1], "gt")[0] != fp32[0]


def test_feature_cache_key_separates_encoder_variants(blobs) -> None:  # type: ignore[no-untyped-def]
    """Lite0 with other taps (same name, weights and even dim) must not share cached features;
    the taps are always in the key, so a change of the default taps cannot reuse old entries."""
    from denuc.encode.encoder import EfficientNetLiteEncoder
    from denuc.encode.weights import WeightsSource
    from denuc.train.features import cache_key

    b = build_encoder("efficientnet-lite0", weights="random", device="cpu", taps="s8,s16,s32")
    w = WeightsSource(None, b.weights_hash, b.weights_source)
    reordered = EfficientNetLiteEncoder(b.spec, b.body, w, taps=("s32", "s16", "s8"))
    assert reordered.dim == b.dim and b.variant() == {"taps": ["s8", "s16", "s32"]}
    stems = blobs.stems("train")
    default, other = (cache_key(PointFeaturizer(e, precision="fp32"), blobs, stems, "gt") for e in (b, reordered))
    assert default[1]["taps"] == ["s8", "s16", "s32"] and other[1]["taps"] == ["s32", "s16", "s8"]
    assert default[0] != other[0]
    # a variant at another working mpp differs by its mpp (part of the geometry) as well
    half = build_encoder("efficientnet-lite0", weights="random", variant="s8-s32@0.5")
    k_half = cache_key(PointFeaturizer(half, precision="fp32"), blobs, stems, "gt")
    assert k_half[1]["mpp"] == 0.5 and k_half[0] != cache_key(
        PointFeaturizer(b, mpp=0.25, precision="fp32"), blobs, stems, "gt")[0]
    # the same model fed another input normalisation gives other features
    own = EfficientNetLiteEncoder(b.spec.with_(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)), b.body, w)
    assert cache_key(PointFeaturizer(own, precision="fp32"), blobs, stems, "gt")[0] != default[0]


def test_gt_and_detected_points_share_one_encoding_when_maps_stream(blobs) -> None:  # type: ignore[no-untyped-def]
    """With room for one batch of maps only, GT and detected points of an image are still
    answered from one encoding pass (same windows as with an unbounded cache), same features."""
    from denuc.core.result import Nuclei

    enc = build_encoder("tiny-uni", weights="random")
    stems = blobs.stems("train")[:2]

    def detect(image: np.ndarray, mpp: float) -> Nuclei:  # points spread over the whole image
        h, w = image.shape[:2]
        g = np.stack(np.meshgrid(np.linspace(1, w - 1, 7), np.linspace(1, h - 1, 7)), -1).reshape(-1, 2)
        return Nuclei(g, np.ones(len(g), np.float32), mpp=mpp)

    runs = []
    for cache_mb in (None, 0.0):
        fz = PointFeaturizer(enc, window=64, batch_size=2, cache_mb=cache_mb)
        out = cached_features(fz, blobs, stems, detect=detect, use_cache=False, log=lambda m: None)
        runs.append((fz.n_encoded, out))
    (n_full, full), (n_small, small) = runs
    assert n_small == n_full
    for k in ("gt", "det"):
        np.testing.assert_array_equal(small[k].feats, full[k].feats)


def test_unknown_variant_or_taps_are_refused_before_any_work(blobs, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "h.safetensors"
    with pytest.raises(ModelError, match="tiny-uni has no variant 'nope'; known: last, quarters, last4"):
        train_head(blobs, "tiny-uni", out, weights="random", variant="nope", cache_dir=tmp_path / "c", log=lambda m: None)
    with pytest.raises(ModelError, match="ViT taps are b<i>"):
        train_head(blobs, "tiny-uni", out, weights="random", taps="s8", cache_dir=tmp_path / "c", log=lambda m: None)
    with pytest.raises(InputError, match="a built encoder keeps its own"):
        train_head(blobs, build_encoder("tiny-uni", weights="random"), out, taps="b0", log=lambda m: None)
    assert not out.exists() and not (tmp_path / "c").exists()
