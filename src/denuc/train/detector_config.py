"""Options of ``denuc train-detector`` as a plain dataclass (no torch import, so the CLI's
``--help`` stays fast), and the named presets.

The defaults are the single-stage fine-tuning recipe that carries to new tissue (preset
``recipe``): EfficientNet-Lite0 at 0.25 µm/px, initialised from the shipped detector, 10
epochs at lr 3e-4 with half an epoch's crops and H&E stain jitter (p 0.8, strength 0.5).
Those are the settings of the last stage of the shipped detector's own training
(``src/denuc/assets/detector.md``), the stage that started, like a user's fine-tuning, from a
converged detector at the working mpp: the earlier stages changed the resolution (0.5 ->
0.25 µm/px) or the augmentation, and the shipped detector has already been through them.
``quick`` is the former quick start (ShuffleNetV2 1.0x from ImageNet weights at 0.5 µm/px,
100 epochs, no stain jitter).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

#: ``init`` value meaning the detector shipped with DeNuC (``denuc/assets/detector.safetensors``).
SHIPPED = "shipped"


@dataclass
class TrainConfig:
    """Every option of ``denuc train-detector`` (YAML keys = these names)."""

    datasets: list[str] = field(default_factory=list)
    out: str = "runs/detector"
    mpp: float = 0.25
    backbone: str = "efficientnet-lite0"
    neck_width: int = 0
    head_activation: str = "leaky_relu"
    matcher: str = "cheapest"
    offset_weight: float = 5e-3
    bg_weight: float = 0.5
    loss_ref_mpp: float = 0.0  # >0: matching/offset lengths in px at this mpp (0.25 = the authors' scale)
    classes: bool = False
    pretrained: bool = True
    init: str = SHIPPED  # start from this detector checkpoint (same architecture); "shipped" = DeNuC's; "" = none
    epochs: int = 10
    batch_size: int = 16
    lr: float = 3e-4
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    crop: int = 256
    crops_per_epoch: float = 0.5  # x ceil(H*W / crop²) crops per image and epoch
    stain_p: float = 0.8  # probability of H&E stain jitter per crop (0 = off)
    stain_strength: float = 0.5  # stain jitter strength s: scale U(1-s, 1+s), shift U(-s/5, s/5)
    stain_space: str = "hed"  # hed (dyes) or od (RGB optical density channels)
    val_fraction: float = 0.1  # datasets without a val split: hold back this share of train images as val
    data_mpp: float | None = None  # µm/px of datasets whose files do not say (generic without mpp; PUMA)
    outside: str = "error"  # label points outside their image: error or drop (with a warning)
    val_radius_um: float = 3.0
    nms_radius_um: float = 3.0
    score_threshold: float = 0.5
    seed: int = 0
    device: str | None = None
    threads: int = 0
    workers: int = -1  # processes preparing augmented crops (0 = in the training process; -1 = 4 on CUDA, else 0)
    resume: bool = False  # continue OUT/state.pt; with no state.pt there, start a new run (and say so)
    overwrite: bool = False  # a new run may replace the run already in OUT (its files are deleted first)
    max_train_images: int = 0  # 0 = all (for quick experiments)
    stop_after: int = 0  # stop after this many epochs in this run (0 = run to the end); continue with resume
    progress: bool = True

    @classmethod
    def from_preset(cls, preset: str = "recipe", **overrides: Any) -> TrainConfig:
        """The settings of ``preset`` (see :data:`PRESETS`), then ``overrides``."""
        from denuc.errors import InputError

        if preset not in PRESETS:
            raise InputError(f"unknown train-detector preset {preset!r}; known: {sorted(PRESETS)}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(overrides) - known)
        if bad:
            raise InputError(f"unknown train-detector option(s) {bad}")
        return cls(**{**PRESETS[preset], **overrides})


#: Named settings (name -> the options it changes from :class:`TrainConfig`'s defaults).
PRESETS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "quick": {"mpp": 0.5, "backbone": "shufflenetv2_1.0x", "init": "", "epochs": 100, "lr": 1e-3,
              "crops_per_epoch": 1.0, "stain_p": 0.0, "stain_strength": 0.4, "val_fraction": 0.0},
}

#: Options that do not change what a run computes: they may differ between a run and its
#: ``resume``. Every other option is stored in ``state.pt`` and must stay the same.
RUN_INDEPENDENT = ("out", "device", "threads", "workers", "resume", "overwrite", "stop_after", "progress")
