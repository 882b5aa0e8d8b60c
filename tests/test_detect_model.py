"""Point detector: anchors, matchers, loss, learning a toy task, window inference, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from synthetic import blob_images

from denuc.detect.checkpoint import load_detector, read_meta, save_detector
from denuc.detect.matcher import MATCHERS, match_cost
from denuc.detect.model import DetectorConfig, build_detector, cell_anchors, normalise
from denuc.detect.windows import detect_images
from denuc.errors import ModelError


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    """Tiny models run fastest single-threaded (and the CPU is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(**kw: object) -> DetectorConfig:
    return DetectorConfig(backbone="tiny", **kw)  # type: ignore[arg-type]


def test_anchors_are_cell_centres_and_zero_offset_points_sit_on_them() -> None:
    a = cell_anchors(2, 3)
    assert a.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12]]
    torch.manual_seed(0)
    model = build_detector(tiny_config()).eval()  # offset conv is zero-initialised
    logits, points = model.raw(torch.zeros(1, 3, 40, 72))  # padded to 64 x 96 internally
    assert logits.shape == (1, 8 * 12, 2)
    assert torch.allclose(points[0], cell_anchors(8, 12))


def test_matchers() -> None:
    pts = torch.tensor([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    gt = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    probs = torch.full((3, 2), 0.5)
    cost = match_cost(pts, probs, gt)
    r, c = MATCHERS.get("cheapest")(cost)
    assert r.tolist() == [0, 0] and c.tolist() == [0, 1]  # both GTs take the same proposal
    r, c = MATCHERS.get("hungarian")(cost)
    assert sorted(c.tolist()) == [0, 1] and len(set(r.tolist())) == 2  # one-to-one
    # a confident proposal farther away beats a close unconfident one (cost 0.1 * d - p)
    probs2 = torch.tensor([[0.0], [0.95], [0.0]])
    r, _ = MATCHERS.get("cheapest")(match_cost(pts, probs2, gt[:1]))
    assert r.tolist() == [1]
    for name in ("cheapest", "hungarian"):
        r, c = MATCHERS.get(name)(torch.zeros(5, 0))
        assert len(r) == len(c) == 0


@pytest.mark.parametrize("matcher", ["cheapest", "hungarian"])
def test_loss_finite_without_any_gt_and_gradients_flow(matcher: str) -> None:
    torch.manual_seed(0)
    model = build_detector(tiny_config(matcher=matcher)).train()
    x = torch.randn(2, 3, 64, 64)
    empty = [{"points": torch.zeros(0, 2), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    losses = model(x, empty)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_offset"].item() == 0.0
    losses["loss"].backward()
    one = [{"points": torch.tensor([[20.0, 30.0]]), "labels": torch.tensor([0])}, empty[0]]
    assert torch.isfinite(model(x, one)["loss"])


def test_multiclass_head_outputs_labels() -> None:
    model = build_detector(tiny_config(num_classes=3, class_names=("a", "b", "c"), score_threshold=0.0)).eval()
    out = model(torch.randn(1, 3, 64, 64))
    assert out[0]["labels"].max() < 3 and len(out[0]["points"]) == len(out[0]["scores"])
    t = [{"points": torch.tensor([[20.0, 30.0]]), "labels": torch.tensor([2])}]
    assert torch.isfinite(model.train()(torch.randn(1, 3, 64, 64), t)["loss"])


def test_tiny_detector_learns_blobs() -> None:
    torch.manual_seed(0)
    imgs, pts = blob_images(24, 64, 6, seed=1)
    model = build_detector(tiny_config(nms_radius_px=4.0, offset_weight=0.05))  # faster offset learning
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = normalise(imgs, model.config.mean, model.config.std)
    targets = [{"points": torch.as_tensor(p, dtype=torch.float32), "labels": torch.zeros(len(p), dtype=torch.long)}
               for p in pts]
    first = None
    for step in range(150):
        i = (step * 8) % 24
        loss = model.train()(x[i:i + 8], targets[i:i + 8])["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
    test_imgs, test_pts = blob_images(4, 64, 6, seed=2)
    out = model.eval()(normalise(test_imgs, model.config.mean, model.config.std))
    hits = n = 0
    for o, p in zip(out, test_pts, strict=True):
        d = torch.cdist(torch.as_tensor(p, dtype=torch.float32), o["points"]) if len(o["points"]) else None
        hits += 0 if d is None else int((d.min(1).values < 2.0).sum())
        n += len(p)
        assert len(o["points"]) <= 2 * len(p)
    assert hits / n >= 0.8


def test_window_inference_equals_whole_image_away_from_window_edges() -> None:
    torch.manual_seed(3)
    model = build_detector(tiny_config(score_threshold=0.45)).eval()
    for m in model.modules():  # random but non-trivial BN statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    torch.nn.init.normal_(model.head.offset.weight, std=0.05)
    img, _ = blob_images(1, 448, 60, seed=4)
    x = normalise(img, model.config.mean, model.config.std)
    thr = float(np.quantile(model.candidates(x, threshold=-1.0)[0]["scores"].numpy(), 0.7))
    model.config.score_threshold = thr  # about 30 % of the cells pass
    whole = model(x)[0]
    win = detect_images(model, [img[0]], threshold=thr)[0]

    def interior(xy: np.ndarray) -> np.ndarray:  # > 70 px from the inner window edges at 192 and 256
        far = (xy < 122) | (xy > 326)
        return far[:, 0] & far[:, 1]

    w_xy = whole["points"].numpy().astype(np.float64)
    w_sc = whole["scores"].numpy()
    keep_w, keep_v = interior(w_xy), interior(win.xy)
    assert 20 <= keep_w.sum() < 0.6 * 4 * (122 / 8) ** 2
    assert keep_w.sum() == keep_v.sum()
    dist, idx = cKDTree(win.xy[keep_v]).query(w_xy[keep_w])
    assert dist.max() < 1e-3 and len(set(idx.tolist())) == len(idx)
    np.testing.assert_allclose(w_sc[keep_w], win.scores[keep_v][idx], atol=1e-4)


def test_small_and_odd_sized_images_in_one_batch() -> None:
    model = build_detector(tiny_config(score_threshold=0.0)).eval()
    imgs = [np.full((50, 70, 3), 128, np.uint8), np.full((300, 257, 3), 128, np.uint8)]
    dets = detect_images(model, imgs, batch_size=4)
    for im, d in zip(imgs, dets, strict=True):
        assert len(d.xy) > 0
        assert (d.xy[:, 0] < im.shape[1]).all() and (d.xy[:, 1] < im.shape[0]).all() and (d.xy >= 0).all()


def test_checkpoint_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = build_detector(tiny_config(num_classes=2, class_names=("x", "y"), score_threshold=0.3)).eval()
    path = tmp_path / "m.safetensors"
    save_detector(path, model, {"mpp": 0.5, "nms_radius_um": 3.0})
    meta = read_meta(path)
    assert meta["mpp"] == 0.5 and meta["config"]["class_names"] == ["x", "y"]
    assert meta["config"]["score_threshold"] == 0.3 and "version" in meta
    loaded, _ = load_detector(path)
    x = torch.randn(1, 3, 64, 64)
    for a, b in zip(model.raw(x), loaded.raw(x), strict=True):
        assert torch.equal(a, b)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError):
        load_detector(bad)


def test_length_scale_scales_the_offset_loss_quadratically() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    t = [{"points": torch.tensor([[12.0 + 1.0, 20.0 + 0.5]]), "labels": torch.tensor([0])}]  # near anchor (12, 20)
    losses = []
    for ls in (1.0, 2.0):
        torch.manual_seed(1)
        model = build_detector(tiny_config(length_scale=ls)).train()
        losses.append(model(x, t)["loss_offset"].item())
    assert losses[0] == pytest.approx(5e-3 * 1.25, rel=1e-4)
    assert losses[1] == pytest.approx(4 * losses[0], rel=1e-4)


@pytest.mark.parametrize("name", ["shufflenetv2_0.5x", "shufflenetv2_1.0x", "shufflenetv2_1.5x",
                                  "shufflenetv2_2.0x", "resnet50"])
def test_backbones_give_strides_8_16_32_and_leaky_relu(name: str) -> None:
    from denuc.detect.backbones import BACKBONES

    bb = BACKBONES.get(name)().eval()
    with torch.no_grad():
        feats = bb(torch.zeros(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [8, 4, 2]
    assert tuple(f.shape[1] for f in feats) == tuple(bb.out_channels)
    if name.startswith("shufflenet"):
        acts = [m for m in bb.modules() if isinstance(m, (torch.nn.ReLU, torch.nn.LeakyReLU))]
        assert acts and all(isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.1 for m in acts)


def test_shufflenet_loads_torchvision_format_weights(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import torchvision

    from denuc.detect.backbones import BACKBONES

    ref = torchvision.models.shufflenet_v2_x0_5(weights=None)
    torch.nn.init.normal_(ref.conv1[0].weight)
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    bb = BACKBONES.get("shufflenetv2_0.5x")(pretrained_path=str(tmp_path / "tv.pth"))
    assert torch.equal(bb.conv1[0].weight, ref.conv1[0].weight)
    assert torch.equal(bb.stage4[0].branch1[0].weight, ref.stage4[0].branch1[0].weight)


@pytest.mark.parametrize("num_classes", [1, 3])
def test_candidates_numpy_equals_candidates(num_classes: int) -> None:
    torch.manual_seed(5)
    cfg = tiny_config(num_classes=num_classes, class_names=tuple(f"c{i}" for i in range(num_classes)))
    model = build_detector(cfg).eval()
    torch.nn.init.normal_(model.head.offset.weight, std=0.5)  # some points land outside the window
    imgs, _ = blob_images(3, 64, 6, seed=6)
    x = normalise(imgs, model.config.mean, model.config.std)
    with torch.no_grad():
        ref = model.candidates(x, threshold=0.3)
    got = model.candidates_numpy(x, threshold=0.3)
    assert len(got) == len(ref) == 3
    for g, r in zip(got, ref, strict=True):
        assert len(r["scores"]) > 0
        for k in ("points", "scores", "labels", "probs"):
            np.testing.assert_array_equal(g[k], r[k].numpy(), err_msg=k)
