"""``denuc train-head``: train the classification head on point labels."""

from __future__ import annotations

import argparse

HELP = "train the classification head (frozen encoder features at labelled points; linear, mlp, lora or full)"


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset folder (BRCA-M2C, OCELOT, PUMA or the generic layout)")
    p.add_argument("--encoder", default="efficientnet-lite0",
                   help="encoder name (efficientnet-lite0, uni2-h, uni, virchow2, h-optimus-0/1, phikon-v2, timm:<arch>)")
    p.add_argument("--encoder-variant", default=None, metavar="NAME",
                   help="named feature taps + working mpp of the encoder, e.g. s8-s32@0.25 for efficientnet-lite0 "
                        "or last for a ViT (default: the encoder's own; docs/encoders.md lists them)")
    p.add_argument("--taps", default=None, metavar="T1,T2,...",
                   help="feature levels to concatenate, overriding the variant's: efficientnet-lite0 "
                        "s2,s4,s8,s16,s32,head; ViTs b<i> = after block i (b-1 = last) (default: the variant's)")
    p.add_argument("--weights", default=None,
                   help="encoder weights: local file/folder or hf-hub:org/name (default: the encoder's own)")
    p.add_argument("--out", required=True, help="head checkpoint to write (.safetensors)")
    p.add_argument("--detector", default=None,
                   help="detector checkpoint: select the epoch at detected val points (mean class F1)")
    p.add_argument("--select-with-detector", action="store_true",
                   help="select at detected val points with the shipped detector")
    p.add_argument("--mode", choices=("linear", "mlp", "lora", "full"), default="linear")
    p.add_argument("--mpp", type=float, default=None,
                   help="working µm/px (default: the encoder variant's; efficientnet-lite0 and the ViTs: 0.25)")
    p.add_argument("--window", type=int, default=None, help="window side in px at the working mpp (default 256)")
    p.add_argument("--stride", type=int, default=None, help="window step in px (default 3/4 of the window)")
    p.add_argument("--align", choices=("center", "corners"), default="center",
                   help="point sampling geometry: token centres (right) or the authors' align_corners=True")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay of the head")
    p.add_argument("--select", choices=("val", "last"), default="val",
                   help="keep the best epoch on val (default) or the last epoch of the fixed schedule "
                        "(val is then only reported)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--class-weights", choices=("auto", "none"), default="none")
    p.add_argument("--hidden", type=int, default=256, help="MLP width for --mode mlp")
    p.add_argument("--ft-epochs", type=int, default=3, help="encoder fine-tuning epochs (lora/full)")
    p.add_argument("--ft-lr", type=float, default=1e-4, help="encoder learning rate (lora/full)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--stain-augment", type=int, default=0, metavar="N",
                   help="add N passes of training features over stain-jittered images (cached)")
    p.add_argument("--stain-strength", type=float, default=0.1,
                   help="jitter strength s: stain scale U(1-s, 1+s), shift U(-s/5, s/5) (default 0.1)")
    p.add_argument("--feature-tta", type=int, choices=(1, 2, 4, 8), default=1,
                   help="average each point's features over this many flipped/rotated passes of the image "
                        "(stored in the head and repeated at prediction; costs that many encodings)")
    p.add_argument("--stain-norm", choices=("none", "macenko"), default="none",
                   help="re-stain every image to a fixed H&E reference before encoding (stored in the head; "
                        "stain-jittered passes skip it) (default none)")
    p.add_argument("--stain-space", choices=("od", "hed"), default="od",
                   help="jitter the optical density per RGB channel (od) or per H&E dye after colour "
                        "deconvolution (hed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default ~/.cache/denuc or $DENUC_CACHE)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps (default: cuda, then mps, then cpu)")
    p.add_argument("--offline", action="store_true", help="never touch the network (same as HF_HUB_OFFLINE=1)")


def main(args: argparse.Namespace) -> int:
    from denuc.train.head import HeadTrainConfig
    from denuc.train.head_run import train_head

    cfg = HeadTrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                          class_weights=args.class_weights, hidden=args.hidden if args.mode == "mlp" else 0,
                          seed=args.seed, select=args.select)
    ft = {"epochs": args.ft_epochs, "lr": args.ft_lr, "lora_rank": args.lora_rank}
    train_head(args.data, args.encoder, args.out, weights=args.weights, variant=args.encoder_variant, taps=args.taps,
               detector=args.detector,
               use_detector=args.select_with_detector, mode=args.mode, mpp=args.mpp, window=args.window,
               stride=args.stride, align=args.align, config=cfg, finetune=ft, stain_augment=args.stain_augment,
               stain_strength=args.stain_strength, stain_space=args.stain_space, stain_norm=args.stain_norm,
               feature_tta=args.feature_tta, cache_dir=args.cache_dir,
               device=args.device, offline=True if args.offline else None)
    return 0
