"""``denuc train-detector``: train the class-agnostic (or, with ``--classes``, class-aware)
point detector. Options come from the preset (``--preset``, default ``recipe``: see
:mod:`denuc.train.detector_config`), then an optional YAML file (``--config``, which may name
a ``preset`` too), then flags, each overriding the one before (dataset folders given on the
command line, positional or ``--datasets``, replace the YAML's ``datasets``). Every key of
:class:`denuc.train.detector.TrainConfig` is both a YAML key and a flag; YAML values must
have the option's type (``true``/``false``, numbers, strings; ``datasets`` a list, or one
folder); booleans are ``--flag`` / ``--no-flag``. The working resolution ``mpp`` is the flag
``--work-mpp`` (YAML ``mpp`` or ``work_mpp``): ``--mpp`` means an input's own resolution in
``predict``, and stays accepted here with a deprecation warning.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any

HELP = "train the point detector on one or more datasets"

EPILOG = """\
Settings come from the preset, then the YAML file (--config, which may name a preset), then
flags, each overriding the one before. The default preset, recipe, fine-tunes the shipped
EfficientNet-Lite0 detector at 0.25 µm/px with H&E stain jitter (the settings of its own last
training stage, src/denuc/assets/detector.md); --preset quick trains ShuffleNetV2 1.0x from
ImageNet weights at 0.5 µm/px for 100 epochs (the former quick start).
A dataset without a val split gives --val-fraction of its train images to val.
--work-mpp is the resolution the detector trains at; --data-mpp the resolution of the
datasets' images where their files do not say (--mpp is the former spelling of --work-mpp)."""

#: option name -> flag, where the flag is not ``--`` + the name with ``-`` for ``_`` (YAML keys
#: stay the names; the flag says which mpp it is: ``--mpp`` is an input's own resolution in ``predict``).
FLAGS = {"mpp": "--work-mpp"}
#: YAML keys accepted as another spelling of an option's name.
YAML_ALIASES = {"work_mpp": "mpp"}

_HELPS = {
    "datasets": ("dataset folders (any readable format, mixed freely; each folder once); on the command line "
                 "(here and/or positional) they replace the YAML's datasets"),
    "out": ("output folder (best/last .safetensors, state.pt, log.jsonl); a folder holding a run needs --resume "
            "or --overwrite"),
    "mpp": "training resolution in µm/px (e.g. 0.5 or 0.25); every dataset is resampled to it",
    "backbone": "shufflenetv2_0.5x|1.0x|1.5x|2.0x, resnet50, efficientnet-lite0 (--init must be of the same one)",
    "neck_width": "PAN channels (0 = the backbone's default)",
    "head_activation": "activation after the head's conv+BN layers: leaky_relu, relu, none",
    "matcher": "loss matcher: cheapest (authors) or hungarian (one-to-one)",
    "offset_weight": "weight of the squared offset error of matched proposals (summed over x, y; per match)",
    "loss_ref_mpp": ("measure lengths in the matching cost and offset loss in pixels at this mpp (e.g. 0.25, "
                     "the authors' scale, so their weights carry over to other training mpps); 0 = training px"),
    "bg_weight": "cross-entropy weight of the background class",
    "classes": ("keep the datasets' classes (joint detector-classifier) instead of one 'nucleus' class; "
                "unclassified points are trained as nuclei of unknown class"),
    "pretrained": "load the backbone's ImageNet weights where available (efficientnet-lite0)",
    "init": ("initialise from this detector checkpoint (same backbone): 'shipped' = the detector shipped with DeNuC "
             "(EfficientNet-Lite0, 0.25 µm/px), '' = none (the backbone's ImageNet weights with --pretrained)"),
    "crops_per_epoch": "random crops per image and epoch, in units of ceil(H*W / crop^2)",
    "stain_p": "probability of H&E stain jitter per training crop (0 = off)",
    "stain_strength": "stain jitter strength s: each stain scaled by U(1-s, 1+s) and shifted by U(-s/5, s/5)",
    "stain_space": "stain jitter space: hed (haematoxylin/eosin/DAB unmixing) or od (RGB optical density)",
    "val_radius_um": "matching radius of the val detection F1 in µm",
    "nms_radius_um": "point NMS radius in µm",
    "threads": "torch CPU threads (0 = torch default)",
    "workers": ("processes that prepare augmented crops in parallel (0 = in the training process; -1 = "
                "automatic: up to 4 on CUDA, 0 otherwise); results do not depend on it"),
    "resume": ("continue from OUT/state.pt (optimizer, schedule, epoch, RNG) with the same settings (only "
               "--stop-after, --device, --workers, --threads and --progress may change; a changed setting, "
               "--epochs included, is refused); without OUT/state.pt a new run starts (and says so)"),
    "overwrite": "start a new run in an OUT that holds one, deleting its checkpoints, state.pt and log.jsonl first",
    "epochs": ("epochs of the cosine schedule; the best epoch is chosen by val F1 (val mean class F1 with "
               "--classes), or by the lowest train loss when no dataset has a val split"),
    "max_train_images": "use only the first N train images per dataset (0 = all)",
    "stop_after": "stop after N epochs in this run (0 = to the end); continue later with --resume",
    "batch_size": "training crops per optimisation step",
    "lr": "peak learning rate of AdamW (cosine schedule from it to --min-lr over all epochs)",
    "min_lr": "learning rate at the end of the cosine schedule",
    "weight_decay": "AdamW weight decay (not applied to biases and norm weights)",
    "crop": "side of the square training crops in px at --work-mpp",
    "val_fraction": ("datasets without a val split: hold back this share of their train images as val (by image, "
                     "seeded; 0 = none, the best epoch is then the one with the lowest train loss)"),
    "data_mpp": ("µm per pixel of the datasets' images where their files do not say (generic layout without mpp "
                 "in dataset.yaml; PUMA's nominal 0.25); refused for formats that record it"),
    "outside": "label points outside their image: error (stop, naming the file) or drop (with a warning)",
    "score_threshold": "score threshold stored in checkpoints when no val split chooses one",
    "seed": "random seed (crops, augmentation, initialisation of new layers, held-back val)",
    "device": "cpu, cuda, cuda:N or mps (None = cuda, then mps, then cpu)",
    "progress": "show a progress bar per epoch",
}


def _fields() -> list[tuple[str, Any, Any]]:
    from denuc.train.detector_config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    out = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f.name, hints[f.name], default))
    return out


def _shown(name: str, default: Any) -> str:
    """``(default: X)`` for an option's help, with the value of every preset that changes it."""
    from denuc.train.detector_config import PRESETS

    others = "; ".join(f"--preset {p}: {v[name]!r}" for p, v in PRESETS.items() if name in v)
    return f" (default: {default!r}" + (f"; {others}" if others else "") + ")"


def configure(parser: argparse.ArgumentParser) -> None:
    from denuc.train.detector_config import PRESETS

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("dataset_args", nargs="*", metavar="DATASET",
                        help="dataset folders (same as --datasets; they replace the YAML's datasets) (default: none)")
    parser.add_argument("--config", type=Path, help=("YAML file with any of the options below (keys with _, values of the option's type: "
                              "true/false, unquoted numbers, datasets a list); flags override it (dataset folders "
                              "on the command line replace its datasets) (default: none)"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help=("starting settings, overridden by --config and flags: recipe = fine-tune the shipped "
                              "EfficientNet-Lite0 detector at 0.25 µm/px with stain jitter (the recipe that carries "
                              "to new tissue); quick = ShuffleNetV2 1.0x from ImageNet weights at 0.5 µm/px, 100 "
                              "epochs, no stain jitter (the former quick start) (default: recipe)"))
    from denuc.core.cliargs import add_deprecated_alias

    for name, tp, default in _fields():
        flag = FLAGS.get(name, "--" + name.replace("_", "-"))
        if name in FLAGS:
            add_deprecated_alias(parser, "--" + name.replace("_", "-"), flag, name, type=float)
        hlp = _HELPS.get(name, "") + _shown(name, default)
        if name == "datasets":
            parser.add_argument(flag, nargs="+", default=None, help=hlp)
        elif tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=hlp)
        elif name == "outside":
            from denuc.data.base import OUTSIDE_POLICIES

            parser.add_argument(flag, choices=OUTSIDE_POLICIES, default=None, help=hlp)
        else:
            base = typing.get_args(tp)[0] if typing.get_origin(tp) in (typing.Union, type(int | None)) else tp
            parser.add_argument(flag, dest=name, type=base, default=None, metavar=name.upper(), help=hlp)


def _loader() -> Any:
    """PyYAML's SafeLoader, reading unquoted ``1e-3`` as a number (YAML 1.2) rather than a string."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))
    return Loader


#: string options whose empty YAML value (``init:``) means "none" (their default, "")
EMPTY_MEANS_NONE = ("init",)


def _yaml_value(name: str, tp: Any, v: Any, source: str) -> Any:
    """YAML value ``v`` of option ``name`` checked against its type ``tp``; :class:`InputError`
    naming the key otherwise (no guessing: a quoted ``'false'`` or ``'0.5'`` is refused)."""
    from denuc.errors import InputError

    def bad(want: str) -> InputError:
        return InputError(f"{source}: {name} must be {want}; got {v!r} ({type(v).__name__})")

    optional = typing.get_origin(tp) in (typing.Union, type(int | None)) and type(None) in typing.get_args(tp)
    if v is None:
        if optional:
            return None
        if name in EMPTY_MEANS_NONE:  # `init:` left empty means no checkpoint, as "" does
            return ""
        raise bad("given a value (it is empty)")
    base = next(a for a in typing.get_args(tp) if a is not type(None)) if optional else tp
    if typing.get_origin(base) is list:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise bad("a list of folder paths (or one path)")
        return list(v)
    if base is bool:
        if not isinstance(v, bool):
            raise bad("true or false (unquoted)")
        return v
    if base is int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise bad("a whole number (unquoted)")
        return v
    if base is float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise bad("a number (unquoted)")
        return float(v)
    if base is str:
        if not isinstance(v, str):
            raise bad("a string")
        return v
    return v


def resolve_config(args: argparse.Namespace) -> Any:
    """:class:`TrainConfig` from YAML (if any, each value type-checked) then flags. Dataset
    folders on the command line (``--datasets`` and positional ones, together) replace the
    YAML's ``datasets``, like every other flag."""
    import yaml

    from denuc.errors import InputError
    from denuc.train.detector_config import TrainConfig

    values: dict[str, Any] = {}
    preset = getattr(args, "preset", None)
    if getattr(args, "config", None):
        try:
            loaded = yaml.load(Path(args.config).read_text(), Loader=_loader())  # a SafeLoader
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"{args.config}: cannot read the YAML config ({e})") from None
        loaded = {} if loaded is None else loaded
        if not isinstance(loaded, dict):
            raise InputError(f"{args.config}: the YAML config must be a mapping of option: value; "
                             f"got a {type(loaded).__name__}")
        for alias, name in YAML_ALIASES.items():
            if alias in loaded:
                if name in loaded:
                    raise InputError(f"{args.config}: give {name} or {alias}, not both")
                loaded[name] = loaded.pop(alias)
        types = {n: tp for n, tp, _ in _fields()}
        unknown = sorted(str(k) for k in set(loaded) - set(types) - {"preset"})
        if unknown:
            raise InputError(f"{args.config}: unknown option(s) {unknown}; known: {sorted([*types, 'preset'])}")
        if "preset" in loaded:
            if not isinstance(loaded["preset"], str):
                raise InputError(f"{args.config}: preset must be a name; got {loaded['preset']!r}")
            preset = preset or loaded.pop("preset")  # the flag wins
            loaded.pop("preset", None)
        values.update({k: _yaml_value(k, types[k], v, str(args.config)) for k, v in loaded.items()})
    for name, _, _ in _fields():
        v = getattr(args, name, None)
        if v is not None and name != "datasets":
            values[name] = v
    cli_datasets = list(getattr(args, "datasets", None) or []) + list(getattr(args, "dataset_args", None) or [])
    if cli_datasets:
        values["datasets"] = cli_datasets
    return TrainConfig.from_preset(preset or "recipe", **values)


def main(args: argparse.Namespace) -> int:
    from denuc.train.detector import train

    cfg = resolve_config(args)
    s = train(cfg)
    if s["selected_by"] == "train loss":
        what = f"lowest train loss {-s['best_score']:.4f}; no val split"
    else:
        what = f"{s['selected_by']} {s['best_score']:.4f}"
    print(f"best epoch {s['best_epoch']} ({what}); checkpoint {s['best']}")
    return 0
