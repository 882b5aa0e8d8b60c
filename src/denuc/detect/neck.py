"""PAN neck and point head of the DeNuC detector.

PAN: 1x1 lateral convs (with bias, no norm/activation) bring the stride 8/16/32 maps to
``width`` channels; a top-down pass adds bilinearly upsampled coarser maps, then a
bottom-up pass adds bilinearly downsampled finer maps.

Head: the three PAN levels are resized to stride 8 and averaged, then two 3x3 conv+BN
layers (optionally followed by an activation; the authors' code has none), then 1x1 convs
to ``num_classes + 1`` logits (index 0 = background) and a 2-d offset (dx, dy) in pixels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Head activations selectable by name ("none" = the authors' code).
HEAD_ACTIVATIONS = {"none": nn.Identity, "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),
                    "relu": lambda: nn.ReLU(inplace=True)}


def _resize(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PAN(nn.Module):
    """``forward([c3, c4, c5]) -> [p3, p4, p5]`` each with ``width`` channels, same sizes."""

    def __init__(self, in_channels: tuple[int, ...], width: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1, bias=True) for c in in_channels)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        lat = [conv(f) for conv, f in zip(self.lateral, feats, strict=True)]
        for i in range(len(lat) - 1, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + _resize(lat[i], lat[i - 1].shape[-2:])
        out = list(lat)
        for i in range(len(out) - 1):  # bottom-up
            out[i + 1] = out[i + 1] + _resize(out[i], out[i + 1].shape[-2:])
        return out


class PointHead(nn.Module):
    """``forward([p3, p4, p5]) -> (logits (B, C+1, h, w), offsets (B, 2, h, w))`` at stride 8."""

    def __init__(self, width: int, num_classes: int = 1, activation: str = "leaky_relu") -> None:
        super().__init__()
        act = HEAD_ACTIVATIONS[activation]
        self.convs = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), act(),
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), act(),
        )
        self.cls = nn.Conv2d(width, num_classes + 1, 1)
        self.offset = nn.Conv2d(width, 2, 1)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def forward(self, feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        size = feats[0].shape[-2:]
        x = torch.stack([feats[0]] + [_resize(f, size) for f in feats[1:]]).mean(0)
        x = self.convs(x)
        return self.cls(x), self.offset(x)
