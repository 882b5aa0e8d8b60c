"""``denuc train-detector``: train the class-agnostic (or, with ``--classes``, class-aware)
point detector. Options come from an optional YAML file (``--config``), then flags, which
override it. Every key of :class:`denuc.train.detector.TrainConfig` is both.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

HELP = "train the point detector on one or more datasets"

_HELPS = {
    "datasets": "dataset folders (any readable format, mixed freely)",
    "out": "output folder (best/last .safetensors, state.pt, log.jsonl)",
    "mpp": "training resolution in µm/px (e.g. 0.5 or 0.25); every dataset is resampled to it",
    "backbone": "shufflenetv2_0.5x|1.0x|1.5x|2.0x, resnet50, efficientnet-lite0",
    "neck_width": "PAN channels (0 = the backbone's default)",
    "head_activation": "activation after the head's conv+BN layers: leaky_relu, relu, none",
    "matcher": "loss matcher: cheapest (authors) or hungarian (one-to-one)",
    "offset_weight": "weight of the squared offset error of matched proposals (summed over x, y; per match)",
    "loss_ref_mpp": ("measure lengths in the matching cost and offset loss in pixels at this mpp (e.g. 0.25, "
                     "the authors' scale, so their weights carry over to other training mpps); 0 = training px"),
    "bg_weight": "cross-entropy weight of the background class",
    "classes": "keep the datasets' classes (joint detector-classifier) instead of one 'nucleus' class",
    "pretrained": "load the backbone's ImageNet weights where available (efficientnet-lite0)",
    "init": "initialise from a detector checkpoint of the same architecture (e.g. to fine-tune at another mpp)",
    "crops_per_epoch": "random crops per image and epoch, in units of ceil(H*W / crop^2)",
    "stain_p": "probability of H&E stain jitter per training crop (0 = off)",
    "stain_strength": "stain jitter strength s: each stain scaled by U(1-s, 1+s) and shifted by U(-s/5, s/5)",
    "stain_space": "stain jitter space: hed (haematoxylin/eosin/DAB unmixing) or od (RGB optical density)",
    "val_radius_um": "matching radius of the val detection F1 in µm",
    "nms_radius_um": "point NMS radius in µm",
    "threads": "torch CPU threads (0 = torch default)",
    "workers": ("processes that prepare augmented crops in parallel (0 = in the training process; -1 = "
                "automatic: up to 4 on CUDA, 0 otherwise); results do not depend on it"),
    "resume": "continue from OUT/state.pt (optimizer, schedule, epoch, RNG)",
    "max_train_images": "use only the first N train images per dataset (0 = all)",
    "stop_after": "stop after N epochs in this run (0 = to the end); continue later with --resume",
}


def _fields() -> list[tuple[str, Any, Any]]:
    from denuc.train.detector_config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f.name, hints[f.name], default))
    return out


def _parse_bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset_args", nargs="*", metavar="DATASET", help="dataset folders (same as --datasets)")
    parser.add_argument("--config", type=Path, help="YAML file with any of the options below; flags override it")
    for name, tp, default in _fields():
        flag = "--" + name.replace("_", "-")
        hlp = _HELPS.get(name, "") + f" (default {default!r})"
        if name == "datasets":
            parser.add_argument(flag, nargs="+", default=None, help=hlp)
        elif tp is bool:
            parser.add_argument(flag, nargs="?", const=True, type=_parse_bool, default=None, help=hlp)
        else:
            base = typing.get_args(tp)[0] if typing.get_origin(tp) in (typing.Union, type(int | None)) else tp
            parser.add_argument(flag, type=base, default=None, help=hlp)


def resolve_config(args: argparse.Namespace) -> Any:
    """:class:`TrainConfig` from YAML (if any) then flags."""
    import yaml

    from denuc.errors import InputError
    from denuc.train.detector_config import TrainConfig

    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"{args.config}: cannot read the YAML config ({e})") from None
        names = {n for n, _, _ in _fields()}
        unknown = sorted(set(loaded) - names)
        if unknown:
            raise InputError(f"{args.config}: unknown option(s) {unknown}; known: {sorted(names)}")
        values.update(loaded)
    for name, _, _ in _fields():
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    if getattr(args, "dataset_args", None):
        values["datasets"] = list(values.get("datasets") or []) + list(args.dataset_args)
    return TrainConfig(**values)


def main(args: argparse.Namespace) -> int:
    from denuc.train.detector import train

    cfg = resolve_config(args)
    summary = train(cfg)
    print(f"best epoch {summary['best_epoch']} (val F1 {summary['best_score']:.4f}); checkpoint {summary['best']}")
    return 0
