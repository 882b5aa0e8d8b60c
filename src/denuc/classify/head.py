"""The classification head and its self-describing checkpoint.

:class:`PointHead` maps ``(N, C)`` point features to ``(N, K)`` class logits: a fixed
per-channel standardisation (train-set mean/std, stored as buffers) followed by one
``Linear(C, K)`` (``linear``) or a two-layer MLP (``mlp``).

Checkpoint (``.safetensors``, loads without unpickling): tensors ``head.*`` (and, for heads
trained with ``lora``/``full`` encoder updates, ``encoder.*``: the encoder tensors that replace
the base weights), plus one JSON metadata entry ``denuc`` (see :class:`HeadMeta`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from denuc.core.files import atomic_target
from denuc.errors import ModelError

HEAD_MODES = ("linear", "mlp", "lora", "full")
FORMAT_VERSION = 1


class PointHead(nn.Module):
    """``(N, C)`` features -> ``(N, K)`` logits. ``hidden=0``: linear; else Linear-GELU-Linear."""

    def __init__(self, dim: int, n_classes: int, hidden: int = 0, dropout: float = 0.0) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if hidden:
            self.net: nn.Module = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
                                                nn.Linear(hidden, n_classes))
        else:
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, n_classes))
        self.hidden = hidden

    def set_standardization(self, feats: torch.Tensor) -> None:
        """Set the per-channel mean/std from ``(N, C)`` training features."""
        self.mean.copy_(feats.mean(0))
        self.std.copy_(feats.std(0).clamp_min(1e-6))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net((feats - self.mean) / self.std)


@dataclass
class HeadMeta:
    """What a head needs to be used correctly, stored in its checkpoint.

    Attributes:
        classes, colors: class vocabulary (index = class id) and RGB colours.
        encoder: encoder registry name; ``weights_hash``: sha256 of its base weights.
        dim: feature dim ``C``; ``hidden``: MLP width (0 = linear); ``mode``: how it was trained.
        mpp: working resolution (µm/px) at which windows were encoded.
        window, stride, align, input_size: window geometry of the point query.
        val_scores: validation metrics of the selected epoch; ``train``: training settings.
        encoder_hash: hash of the encoder tensors stored in the checkpoint (lora/full), else "".
        stain_norm: stain normaliser applied to images before encoding (``none``, ``macenko``).
        feature_tta: dihedral passes whose point features are averaged (1 = none).
    """

    classes: list[str]
    colors: list[list[int]]
    encoder: str
    weights_hash: str
    dim: int
    mpp: float
    window: int
    stride: int
    align: str
    input_size: int
    hidden: int = 0
    mode: str = "linear"
    val_scores: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    encoder_hash: str = ""
    stain_norm: str = "none"
    feature_tta: int = 1
    version: str = ""
    format: int = FORMAT_VERSION

    def describe(self) -> str:
        return (f"{self.mode} head for encoder {self.encoder} (weights {self.weights_hash[:12]}), "
                f"classes {self.classes}, {self.mpp} µm/px, window {self.window}/{self.stride}, align {self.align}"
                + (f", stain norm {self.stain_norm}" if self.stain_norm != "none" else "")
                + (f", features averaged over {self.feature_tta} passes" if self.feature_tta != 1 else ""))


def save_head(path: str | os.PathLike[str], head: PointHead, meta: HeadMeta,
              encoder_tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the checkpoint atomically. ``encoder_tensors``: encoder weights to override (lora/full)."""
    from safetensors.torch import save_file

    from denuc import __version__

    meta.version = __version__
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    for k, v in (encoder_tensors or {}).items():
        tensors[f"encoder.{k}"] = v.detach().cpu().contiguous()
    p = Path(path)
    with atomic_target(p) as tmp:
        save_file(tensors, str(tmp), metadata={"denuc": json.dumps(asdict(meta))})
    return p


def read_meta(path: str | os.PathLike[str]) -> HeadMeta:
    """Only the metadata of a head checkpoint (cheap)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ModelError(f"{p}: head checkpoint does not exist")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = (f.metadata() or {}).get("denuc")
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise ModelError(f"{p}: not a safetensors head checkpoint ({e})") from None
    if raw is None:
        raise ModelError(f"{p}: safetensors file without DeNuC head metadata (not made by `denuc train-head`?)")
    d = json.loads(raw)
    if d.get("format", 0) > FORMAT_VERSION:
        raise ModelError(f"{p}: head checkpoint format {d['format']} is newer than this DeNuC ({FORMAT_VERSION})")
    return HeadMeta(**d)


def load_head(path: str | os.PathLike[str]) -> tuple[PointHead, HeadMeta, dict[str, torch.Tensor]]:
    """Load ``(head, meta, encoder_tensors)`` from a checkpoint written by :func:`save_head`."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    tensors = load_file(str(path))
    head = PointHead(meta.dim, len(meta.classes), meta.hidden)
    sd = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{path}: head tensors do not match its metadata ({e})") from None
    enc = {k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")}
    return head.eval(), meta, enc
