"""Self-describing detector checkpoints: safetensors weights + JSON metadata.

The metadata (``safetensors`` header key ``"denuc"``, a JSON string) holds the
:class:`~denuc.detect.model.DetectorConfig` (architecture, classes, normalisation, score
threshold, NMS radius in px) plus ``mpp`` (µm/px the model works at), ``nms_radius_um``,
``window``/``stride``/``margin`` (px at ``mpp``), datasets, val F1, epochs and package
version. Loading never unpickles Python objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from denuc.core.files import atomic_target
from denuc.detect.model import DetectorConfig, PointDetector
from denuc.errors import ModelError

META_KEY = "denuc"
FORMAT = "denuc-point-detector/1"


def save_detector(path: str | os.PathLike[str], model: PointDetector, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights and ``meta`` (JSON-serialisable) atomically to ``path``."""
    from safetensors.torch import save_file

    from denuc import __version__

    info = {"format": FORMAT, "version": __version__, **meta, "config": model.config.to_dict()}
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_target(path) as tmp:
        save_file(sd, str(tmp), metadata={META_KEY: json.dumps(info)})


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata dict of a detector checkpoint (no weights loaded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception as e:  # noqa: BLE001 - safetensors raises several types
        raise ModelError(f"{path}: not a readable safetensors detector checkpoint ({e})") from None
    if raw is None:
        raise ModelError(f"{path}: safetensors file without DeNuC detector metadata")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise ModelError(f"{path}: detector metadata is not valid JSON") from None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    if fmt != FORMAT:
        if isinstance(meta, dict) and isinstance(fmt, int) and "encoder" in meta and "classes" in meta:
            raise ModelError(f"{path}: this is a classification head checkpoint, not a detector (it was made by "
                             "`denuc train-head`); use it as `denuc predict --head` (Python: DeNuC.load(head=...))")
        raise ModelError(f"{path}: unknown checkpoint format {fmt!r}")
    return meta


def load_detector(path: str | os.PathLike[str], device: torch.device | str = "cpu") -> tuple[PointDetector, dict]:
    """Rebuild the model of a checkpoint (eval mode, on ``device``) and return it with its metadata."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ModelError(f"{path}: detector checkpoint not found")
    meta = read_meta(path)
    config = DetectorConfig.from_dict(meta["config"])
    model = PointDetector(config, pretrained=False)
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except RuntimeError as e:
        raise ModelError(f"{path}: weights do not fit the stored architecture ({e})") from None
    return model.to(device).eval(), meta
