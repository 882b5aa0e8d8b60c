"""``denuc train-head``: train the classification head on point labels.

Defaults are the shipped head's recipe (``--preset shipped``: 30 epochs, weight decay 0.1,
last epoch kept, Macenko stain normalisation, 2 extra passes of H&E stain jitter of strength
0.4); ``--preset paper`` is the DeNuC paper's linear probe (100 epochs, weight decay 5e-4,
epoch chosen on val, no stain handling). A flag given explicitly overrides the preset.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

HELP = "train the classification head (frozen encoder features at labelled points; linear, mlp, lora or full)"

#: Options whose default comes from the preset (:data:`denuc.train.head.HEAD_PRESETS`).
PRESET_OPTIONS = ("epochs", "lr", "weight_decay", "select", "stain_norm", "stain_augment", "stain_space",
                  "stain_strength")


def _preset_help(name: str) -> str:
    from denuc.train.head_presets import HEAD_PRESETS

    return f" (default: {HEAD_PRESETS['shipped'][name]!r}; --preset paper: {HEAD_PRESETS['paper'][name]!r})"


class _DeprecatedClassWeights(argparse.Action):
    """``--class-weights auto|none``: the former spelling of ``--class-balance weighted|none``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print("denuc train-head: warning: --class-weights is deprecated; use --class-balance "
              f"{'weighted' if values == 'auto' else 'none'}", file=sys.stderr)
        namespace.class_balance = "weighted" if values == "auto" else "none"


def configure(p: argparse.ArgumentParser) -> None:
    from denuc.data.base import OUTSIDE_POLICIES
    from denuc.train.head_presets import CLASS_BALANCE, HEAD_PRESETS

    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (__doc__ or "").split("\n\n", 1)[1].replace("``", "'")
    from denuc.core.cliargs import add_dataset_argument, add_deprecated_alias

    add_dataset_argument(p, "dataset folder (BRCA-M2C, OCELOT, PUMA or the generic layout; --data DATASET is its "
                            "former spelling) (required)", "--data")
    p.add_argument("--encoder", default="efficientnet-lite0",
                   help="encoder name (efficientnet-lite0, uni2-h, uni, virchow2, h-optimus-0/1, phikon-v2, timm:<arch>) "
                        "(default: %(default)s)")
    p.add_argument("--encoder-variant", default=None, metavar="NAME",
                   help="named feature taps + working mpp of the encoder, e.g. s8-s32@0.25 for efficientnet-lite0 "
                        "or last for a ViT (default: the encoder's own; docs/encoders.md lists them)")
    p.add_argument("--taps", default=None, metavar="T1,T2,...",
                   help="feature levels to concatenate, overriding the variant's: efficientnet-lite0 "
                        "s2,s4,s8,s16,s32,head; ViTs b<i> = after block i (b-1 = last) (default: the variant's)")
    p.add_argument("--weights", default=None,
                   help="encoder weights: local file/folder or hf-hub:org/name (default: the encoder's own)")
    p.add_argument("--out", required=True, help="head checkpoint to write (.safetensors) (required)")
    p.add_argument("--preset", choices=sorted(HEAD_PRESETS), default="shipped",
                   help="training recipe: shipped = the shipped head's (chosen by cross-validation across tissue "
                        "sites), paper = the DeNuC paper's linear probe; explicit flags override it "
                        "(default: %(default)s)")
    p.add_argument("--detector", default=None,
                   help="detector checkpoint: score val (and, with --select val, choose the epoch) at its detected "
                        "val points by mean class F1 (default: none, score at GT points)")
    p.add_argument("--select-with-detector", action=argparse.BooleanOptionalAction, default=False,
                   help="score val at points detected by the shipped detector (default: %(default)s)")
    p.add_argument("--mode", choices=("linear", "mlp", "lora", "full"), default="linear",
                   help="head type: linear or mlp on frozen features; lora or full also update the encoder "
                        "(default: %(default)s)")
    p.add_argument("--work-mpp", dest="mpp", type=float, default=None,
                   help="working µm/px of the encoder, at which images are encoded (default: the encoder variant's; "
                        "efficientnet-lite0 and the ViTs: 0.25); for the µm/px of the dataset's images see --data-mpp "
                        "(--mpp is its former spelling)")
    add_deprecated_alias(p, "--mpp", "--work-mpp", "mpp", type=float)
    p.add_argument("--data-mpp", type=float, default=None,
                   help="µm per pixel of the dataset's images where its files do not say (generic layout without "
                        "mpp in dataset.yaml; PUMA's nominal 0.25) (default: what the files say)")
    p.add_argument("--outside", choices=OUTSIDE_POLICIES, default="error",
                   help="label points outside their image: error (stop, naming the file) or drop them with a "
                        "warning (default: %(default)s)")
    p.add_argument("--window", type=int, default=None,
                   help="window side in px at the working mpp (default: the encoder's own, from its spec)")
    p.add_argument("--stride", type=int, default=None, help="window step in px (default: 3/4 of the window)")
    p.add_argument("--align", choices=("center", "corners"), default="center",
                   help="point sampling geometry: token centres (right) or the authors' align_corners=True "
                        "(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="head training epochs (cosine schedule)"
                   + _preset_help("epochs"))
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate of the head" + _preset_help("lr"))
    p.add_argument("--weight-decay", type=float, default=None, help="SGD weight decay of the head"
                   + _preset_help("weight_decay"))
    p.add_argument("--select", choices=("val", "last"), default=None,
                   help="keep the best epoch on val or the last epoch of the fixed schedule (val is then only "
                        "reported)" + _preset_help("select"))
    p.add_argument("--batch-size", type=int, default=256, help="points per SGD step (default: %(default)s)")
    p.add_argument("--class-balance", choices=CLASS_BALANCE, default="none",
                   help="balance the classes: none, weighted (loss weights inverse to class frequency) or sampled "
                        "(each class drawn equally often); both lowered val mean class F1 on BRCA-M2C (default: %(default)s)")
    p.add_argument("--class-weights", choices=("auto", "none"), action=_DeprecatedClassWeights,
                   help=argparse.SUPPRESS)
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=True,
                   help="fit a temperature on the val images' GT points so that class probabilities are calibrated "
                        "(stored in the head; the predicted classes do not change) (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=256, help="MLP width for --mode mlp (default: %(default)s)")
    p.add_argument("--ft-epochs", type=int, default=3, help="encoder fine-tuning epochs (lora/full) (default: %(default)s)")
    p.add_argument("--ft-lr", type=float, default=1e-4, help="encoder learning rate (lora/full) (default: %(default)s)")
    p.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA updates (lora) (default: %(default)s)")
    p.add_argument("--stain-augment", type=int, default=None, metavar="N",
                   help="add N passes of training features over stain-jittered images (cached)"
                   + _preset_help("stain_augment"))
    p.add_argument("--stain-strength", type=float, default=None,
                   help="jitter strength s: stain scale U(1-s, 1+s), shift U(-s/5, s/5)" + _preset_help("stain_strength"))
    p.add_argument("--feature-tta", type=int, choices=(1, 2, 4, 8), default=1,
                   help="average each point's features over this many flipped/rotated passes of the image "
                        "(stored in the head and repeated at prediction; costs that many encodings) "
                        "(default: %(default)s)")
    p.add_argument("--stain-norm", choices=("none", "macenko"), default=None,
                   help="re-stain every image to a fixed H&E reference before encoding (stored in the head; "
                        "stain-jittered passes skip it)" + _preset_help("stain_norm"))
    p.add_argument("--stain-space", choices=("od", "hed"), default=None,
                   help="jitter the optical density per RGB channel (od) or per H&E dye after colour "
                        "deconvolution (hed)" + _preset_help("stain_space"))
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default: ~/.cache/denuc or $DENUC_CACHE)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: cuda, then mps, then cpu)")
    p.add_argument("--offline", action=argparse.BooleanOptionalAction, default=False,
                   help="never touch the network (same as HF_HUB_OFFLINE=1) (default: %(default)s)")


def resolved(args: argparse.Namespace) -> dict[str, Any]:
    """The preset's values with the flags given explicitly on top (keys of :data:`PRESET_OPTIONS`)."""
    from denuc.train.head_presets import HEAD_PRESETS

    base = dict(HEAD_PRESETS[args.preset])
    for k in PRESET_OPTIONS:
        v = getattr(args, k, None)
        if v is not None:
            base[k] = v
    return base


def main(args: argparse.Namespace) -> int:
    from denuc.core.cliargs import dataset_of
    from denuc.train.head import HeadTrainConfig
    from denuc.train.head_run import train_head

    data = dataset_of(args, "train-head")
    r = resolved(args)
    cfg = HeadTrainConfig(epochs=r["epochs"], lr=r["lr"], weight_decay=r["weight_decay"], batch_size=args.batch_size,
                          class_balance=args.class_balance, hidden=args.hidden if args.mode == "mlp" else 0,
                          seed=args.seed, select=r["select"])
    ft = {"epochs": args.ft_epochs, "lr": args.ft_lr, "lora_rank": args.lora_rank}
    train_head(data, args.encoder, args.out, weights=args.weights, variant=args.encoder_variant, taps=args.taps,
               detector=args.detector,
               use_detector=args.select_with_detector, mode=args.mode, mpp=args.mpp, window=args.window,
               stride=args.stride, align=args.align, config=cfg, finetune=ft, stain_augment=r["stain_augment"],
               stain_strength=r["stain_strength"], stain_space=r["stain_space"], stain_norm=r["stain_norm"],
               feature_tta=args.feature_tta, cache_dir=args.cache_dir, device=args.device,
               offline=True if args.offline else None, data_mpp=args.data_mpp, outside=args.outside,
               calibrate=args.calibrate)
    return 0
