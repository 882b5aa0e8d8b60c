"""Frozen dense encoders (foundation models and a CNN) with one uniform API.

``build_encoder(name, weights=None, *, offline=None, token=None, device=None) -> Encoder``;
``Encoder.forward((B, 3, S, S) normalised) -> (B, C, h, w)``; map cell ``(i, j)`` is centred
at input pixel ``((j + 0.5) * stride, (i + 0.5) * stride)``.
"""

from denuc.encode.encoder import Encoder, build_encoder
from denuc.encode.specs import ENCODERS, EncoderSpec, get_spec, known_encoders

__all__ = ["ENCODERS", "Encoder", "EncoderSpec", "build_encoder", "get_spec", "known_encoders"]
