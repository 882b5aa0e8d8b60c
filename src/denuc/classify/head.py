"""The classification head and its self-describing checkpoint.

:class:`PointHead` maps ``(N, C)`` point features to ``(N, K)`` class logits: a fixed
per-channel standardisation (train-set mean/std, stored as buffers) followed by one
``Linear(C, K)`` (``linear``) or a two-layer MLP (``mlp``).

Checkpoint (``.safetensors``, loads without unpickling): tensors ``head.*`` (and, for heads
trained with ``lora``/``full`` encoder updates, ``encoder.*``: the encoder tensors that replace
the base weights), plus one JSON metadata entry ``denuc`` (see :class:`HeadMeta`).

Classes without a single training point (``HeadMeta.untrained_classes``) cannot be learnt by
the head: their logits are fixed at ``-inf``, so they get probability 0 and are never predicted.

Calibration: the logits are divided by ``HeadMeta.temperature`` (fitted on val by
``denuc train-head``, :mod:`denuc.train.calibration`; 1 in heads written before it was
recorded), so ``softmax(head(feats))`` gives calibrated probabilities; the arg-max class is
unchanged.
"""

from __future__ import annotations

import json
import math
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
    """``(N, C)`` features -> ``(N, K)`` logits. ``hidden=0``: linear; else Linear-GELU-Linear.

    Classes marked with :meth:`set_untrained` get logit ``-inf`` (probability 0).
    """

    untrained: torch.Tensor

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
        #: logits are divided by it (calibration); not saved in the tensors (HeadMeta.temperature)
        self.temperature = 1.0
        # (K,) True = class never seen in training; not saved (rebuilt from HeadMeta.untrained_classes)
        self.register_buffer("untrained", torch.zeros(n_classes, dtype=torch.bool), persistent=False)
        self._any_untrained = False

    def set_untrained(self, class_ids: list[int]) -> None:
        """Never predict the classes ``class_ids`` (their logits become ``-inf``)."""
        self.untrained.zero_()
        self.untrained[list(class_ids)] = True
        self._any_untrained = bool(self.untrained.any())

    def set_standardization(self, feats: torch.Tensor) -> None:
        """Set the per-channel mean/std from ``(N, C)`` training features."""
        self.mean.copy_(feats.mean(0))
        self.std.copy_(feats.std(0).clamp_min(1e-6))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        logits = self.net((feats - self.mean) / self.std)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        if self._any_untrained:
            logits = logits.masked_fill(self.untrained, float("-inf"))
        return logits


@dataclass
class HeadMeta:
    """What a head needs to be used correctly, stored in its checkpoint.

    Attributes:
        classes, colors: class vocabulary (index = class id) and RGB colours.
        encoder: encoder registry name; ``weights_hash``: sha256 of its base weights file.
        weights_source: where those weights came from, portable (``hf-hub:org/name``,
            ``bundled``, ``random`` or the file's ``folder/name``, never an absolute path);
            "" in heads written before it was recorded (``Encoder.weights_ref`` of the encoder).
        dim: feature dim ``C``; ``hidden``: MLP width (0 = linear); ``mode``: how it was trained.
        mpp: working resolution (µm/px) at which windows were encoded.
        window, stride, align, input_size: window geometry of the point query.
        val_scores: validation metrics of the selected epoch; ``train``: training settings.
        encoder_hash: hash of the encoder tensors stored in the checkpoint (lora/full), else "".
        stain_norm: stain normaliser applied to images before encoding (``none``, ``macenko``).
        feature_tta: dihedral passes whose point features are averaged (1 = none).
        untrained_classes: classes that had no training point; the head never predicts them
            (logit ``-inf``, probability 0).
        temperature: the logits are divided by it before the softmax (fitted on val; 1 = none).
        calibration: how it was fitted: val points, NLL and ECE before/after, reliability bins.
        val_report: per-class precision/recall/F1 and the confusion matrix at val GT points.
        taps: the encoder's feature levels the head reads (:mod:`denuc.encode.specs`); ``[]`` in
            heads written before taps were recorded, which read the spec's ``legacy_taps``
            (:func:`head_taps`).
        encoder_variant: name of the encoder variant (taps + mpp) it was trained with, "" when
            none or not recorded (informative; ``taps`` and ``mpp`` are what is used).
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
    untrained_classes: list[str] = field(default_factory=list)
    weights_source: str = ""
    temperature: float = 1.0
    calibration: dict[str, Any] = field(default_factory=dict)
    val_report: dict[str, Any] = field(default_factory=dict)
    taps: list[str] = field(default_factory=list)
    encoder_variant: str = ""
    version: str = ""
    format: int = FORMAT_VERSION

    def describe(self) -> str:
        return (f"{self.mode} head for encoder {self.encoder} (weights {self.weights_hash[:12]}"
                + (f" from {self.weights_source}" if self.weights_source else "") + "), "
                f"classes {self.classes}, {self.mpp} µm/px"
                + (f", taps {'+'.join(self.taps)}" if self.taps else "")
                + f", window {self.window}/{self.stride}, align {self.align}"
                + (f", stain norm {self.stain_norm}" if self.stain_norm != "none" else "")
                + (f", features averaged over {self.feature_tta} passes" if self.feature_tta != 1 else "")
                + (f", never predicts {self.untrained_classes} (no training points)" if self.untrained_classes
                   else "")
                + (f", temperature {self.temperature:.3g}" if self.temperature != 1.0 else ""))


def head_taps(meta: HeadMeta) -> tuple[str, ...]:
    """The encoder taps a head reads: the recorded ones, else (a head written before taps were
    recorded) the encoder spec's ``legacy_taps``; ``()`` for an encoder without taps."""
    if meta.taps:
        return tuple(meta.taps)
    from denuc.encode.specs import get_spec

    return get_spec(meta.encoder).legacy_taps


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
    try:
        d = json.loads(raw)
    except ValueError:
        raise ModelError(f"{p}: head metadata is not valid JSON") from None
    fmt = d.get("format", 0) if isinstance(d, dict) else None
    if isinstance(fmt, str) and fmt.startswith("denuc-point-detector"):
        raise ModelError(f"{p}: this is a detector checkpoint, not a classification head; pass it as --detector "
                         "(Python: detector=...) and give a head made by `denuc train-head` as --head")
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise ModelError(f"{p}: unknown head checkpoint format {fmt!r}")
    if fmt > FORMAT_VERSION:
        raise ModelError(f"{p}: head checkpoint format {fmt} is newer than this DeNuC ({FORMAT_VERSION})")
    try:
        return HeadMeta(**d)
    except TypeError as e:
        raise ModelError(f"{p}: head metadata does not fit this DeNuC ({e}); was it written by a newer version?") from None


def load_head(path: str | os.PathLike[str]) -> tuple[PointHead, HeadMeta, dict[str, torch.Tensor]]:
    """Load ``(head, meta, encoder_tensors)`` from a checkpoint written by :func:`save_head`."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    tensors = load_file(str(path))
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ModelError(f"{path}: head tensors contain NaN or infinite values ({', '.join(bad[:3])}): the training "
                         "that wrote it diverged; retrain it (e.g. with a lower --lr)")
    head = PointHead(meta.dim, len(meta.classes), meta.hidden)
    sd = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{path}: head tensors do not match its metadata ({e})") from None
    unknown = [c for c in meta.untrained_classes if c not in meta.classes]
    if unknown:
        raise ModelError(f"{path}: untrained classes {unknown} are not among the head's classes {meta.classes}")
    head.set_untrained([meta.classes.index(c) for c in meta.untrained_classes])
    t = meta.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
        raise ModelError(f"{path}: temperature {t!r} must be a finite number > 0")
    head.temperature = float(t)
    enc = {k[8:]: v for k, v in tensors.items() if k.startswith("encoder.")}
    return head.eval(), meta, enc
