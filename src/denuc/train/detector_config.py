"""Options of ``denuc train-detector`` as a plain dataclass (no torch import, so the CLI's
``--help`` stays fast)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    """Every option of ``denuc train-detector`` (YAML keys = these names)."""

    datasets: list[str] = field(default_factory=list)
    out: str = "runs/detector"
    mpp: float = 0.5
    backbone: str = "shufflenetv2_1.0x"
    neck_width: int = 0
    head_activation: str = "leaky_relu"
    matcher: str = "cheapest"
    offset_weight: float = 5e-3
    bg_weight: float = 0.5
    loss_ref_mpp: float = 0.0  # >0: matching/offset lengths in px at this mpp (0.25 = the authors' scale)
    classes: bool = False
    pretrained: bool = True
    init: str = ""  # start from the weights of this detector checkpoint (same architecture)
    epochs: int = 100
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 1e-4
    crop: int = 256
    crops_per_epoch: float = 1.0  # x ceil(H*W / crop²) crops per image and epoch
    stain_p: float = 0.0  # probability of H&E stain jitter per crop (0 = off)
    stain_strength: float = 0.4  # stain jitter strength s: scale U(1-s, 1+s), shift U(-s/5, s/5)
    stain_space: str = "hed"  # hed (dyes) or od (RGB optical density channels)
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


#: Options that do not change what a run computes: they may differ between a run and its
#: ``resume``. Every other option is stored in ``state.pt`` and must stay the same.
RUN_INDEPENDENT = ("out", "device", "threads", "workers", "resume", "overwrite", "stop_after", "progress")
