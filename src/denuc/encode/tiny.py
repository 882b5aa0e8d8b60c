"""Tiny random encoders of each family, for tests, demos and smoke runs (no download).

Each is 2 blocks deep with 32 channels per token; like the registered ViTs their default taps
are the blocks ending each quarter of the depth (here both blocks: 64 channels) and
``variant="last"`` gives the last block alone (32 channels).

``register_tiny()`` adds ``tiny-uni2h`` (ViT with 8 register tokens and SwiGLU, like UNI2-h),
``tiny-uni`` (plain ViT with a class token, like UNI) and ``tiny-hoptimus`` (ViT with 4
register tokens and H-optimus mean/std) to :data:`denuc.encode.ENCODERS`. Build them with
``build_encoder(name, weights="random")`` or save and reload them like real weights.
"""

from __future__ import annotations

from denuc.encode.specs import ENCODERS, HOPTIMUS_MEAN, HOPTIMUS_STD, IMAGENET_MEAN, IMAGENET_STD, vit_spec

_BASE = {"depth": 2, "num_heads": 2, "embed_dim": 32, "num_classes": 0, "init_values": 1e-5}

TINY_SPECS = (
    vit_spec(name="tiny-uni2h", family="timm-vit", width=32, depth=2, stride=14, num_prefix_tokens=9,
             mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=56, window=64, timm_name="vit_small_patch16_224",
             timm_kwargs={**_BASE, "img_size": 56, "patch_size": 14, "mlp_ratio": 2.66667 * 2,
                          "no_embed_class": True, "swiglu": True, "reg_tokens": 8, "dynamic_img_size": True},
             licence="random weights (tests)"),
    vit_spec(name="tiny-uni", family="timm-vit", width=32, depth=2, stride=16, num_prefix_tokens=1,
             mean=IMAGENET_MEAN, std=IMAGENET_STD, input_size=64, window=64, timm_name="vit_small_patch16_224",
             timm_kwargs={**_BASE, "img_size": 64, "dynamic_img_size": True}, licence="random weights (tests)"),
    vit_spec(name="tiny-hoptimus", family="timm-vit", width=32, depth=2, stride=14, num_prefix_tokens=5,
             mean=HOPTIMUS_MEAN, std=HOPTIMUS_STD, input_size=56, window=64, timm_name="vit_small_patch16_224",
             timm_kwargs={**_BASE, "img_size": 56, "patch_size": 14, "reg_tokens": 4, "dynamic_img_size": False},
             licence="random weights (tests)"),
)


def register_tiny() -> list[str]:
    """Register the tiny specs (idempotent); returns their names."""
    for s in TINY_SPECS:
        if s.name not in ENCODERS:
            ENCODERS.register(s.name, s)
    return [s.name for s in TINY_SPECS]
