"""``denuc finetune DATA... --out DIR``: fine-tune the detector and train the head on your own
labelled points, in one command, and write a ready model folder.

Stages: fine-tune the shipped detector at its working mpp with train-detector's recipe; keep
it or the starting one, whichever is better on val, with the threshold chosen on val; train
the head at the ground-truth points with the shipped head's recipe and with the paper's, and
keep the one with the higher mean class F1 at the detected val points (--head-preset auto);
fit its temperature on val; run the finished model on val for the report. Val is
each dataset's val split, or a held-back share of its train images. Rerun the same command
after an interruption: finished stages are skipped, the detector resumes from its last epoch.

DIR gets model.yaml, detector.safetensors, head.safetensors (use them with
`denuc predict --model DIR` or `DeNuC.load(DIR)`), report/ (report.md, report.json, plots)
and train/ (the detector's training log, each head recipe's head and the run state).
"""

from __future__ import annotations

import argparse

HELP = "fine-tune the detector and train the head on your labelled points -> a ready model folder"


def configure(p: argparse.ArgumentParser) -> None:
    from denuc.data.base import OUTSIDE_POLICIES
    from denuc.train.finetune import FinetuneSettings
    from denuc.train.head_presets import AUTO_CANDIDATES, CLASS_BALANCE, FINETUNE_HEAD_CHOICES

    d = FinetuneSettings()
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = (__doc__ or "").split("\n\n", 1)[1]
    p.add_argument("datasets", nargs="+", metavar="DATA",
                   help="dataset folders in any readable layout (generic, BRCA-M2C, OCELOT, PUMA), used together "
                        "(required)")
    p.add_argument("--out", required=True, help="model folder to write (new or empty, or a finetune run to "
                                                "continue) (required)")
    g = p.add_argument_group("detector stage (defaults: train-detector's recipe)")
    g.add_argument("--init", default=d.init,
                   help="detector to start from: 'shipped' or a detector checkpoint; its backbone and working mpp "
                        "are kept (default: %(default)s)")
    g.add_argument("--epochs", type=int, default=d.epochs,
                   help="detector epochs; each takes 2-5 min per 80 images of ~465 px at 0.5 µm/px on a 2-core "
                        "CPU (4.8 min measured on a shared one) (default: %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="detector peak learning rate (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="detector crops per step (default: %(default)s)")
    g.add_argument("--crops-per-epoch", type=float, default=d.crops_per_epoch,
                   help="random crops per image and epoch, in units of ceil(H*W / 256^2) at the working mpp "
                        "(default: %(default)s)")
    g.add_argument("--stain-p", type=float, default=d.stain_p,
                   help="probability of H&E stain jitter per crop (default: %(default)s)")
    g.add_argument("--stain-strength", type=float, default=d.stain_strength,
                   help="stain jitter strength (default: %(default)s)")
    h = p.add_argument_group("head stage (default: both head recipes, the better on val kept)")
    h.add_argument("--encoder", default=None,
                   help="encoder of the head (default: the shipped head's encoder)")
    h.add_argument("--weights", default=None,
                   help="encoder weights: local file/folder or hf-hub:org/name (default: the encoder's own)")
    h.add_argument("--head-preset", choices=FINETUNE_HEAD_CHOICES, default=d.head_preset,
                   help=f"head recipe: auto (train {' and '.join(AUTO_CANDIDATES)}, keep the one with the higher "
                        "mean class F1 at the detected val points), shipped (the shipped head's: 30 epochs, weight "
                        "decay 0.1, Macenko stain normalisation, H&E stain jitter) or paper (the paper's linear "
                        "probe: 100 epochs, best epoch on val, no stain handling) (default: %(default)s)")
    h.add_argument("--head-epochs", type=int, default=None, help="head epochs (default: the preset's, 30 for shipped, 100 for paper)")
    h.add_argument("--head-select", choices=("val", "last"), default=None,
                   help="keep the head's best epoch on val or its last (default: the preset's, last for shipped)")
    h.add_argument("--class-balance", choices=CLASS_BALANCE, default=d.class_balance,
                   help="class balancing of the head: none, weighted or sampled (default: %(default)s)")
    a = p.add_argument_group("data")
    a.add_argument("--data-mpp", type=float, default=None,
                   help="µm per pixel of the images where a dataset's files do not say (generic layout without mpp "
                        "in dataset.yaml; PUMA's nominal 0.25) (default: what the files say)")
    a.add_argument("--outside", choices=OUTSIDE_POLICIES, default=d.outside,
                   help="label points outside their image: error (stop, naming the file) or drop them with a "
                        "warning (default: %(default)s)")
    a.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the training images held back as val for a dataset without a val split (by "
                        "image, seeded) (default: %(default)s)")
    a.add_argument("--mpp-check", action=argparse.BooleanOptionalAction, default=d.mpp_check,
                   help="refuse a dataset whose labelled nuclei lie implausibly close or far apart for its mpp "
                        "(median nearest neighbour outside 3-50 µm: a wrong mpp) (default: %(default)s)")
    a.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    r = p.add_argument_group("run (these do not change the result)")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    r.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (0 = torch default) "
                                                                  "(default: %(default)s)")
    r.add_argument("--workers", type=int, default=d.workers,
                   help="processes preparing detector crops (-1 = automatic: up to 4 on CUDA, none on CPU) "
                        "(default: %(default)s)")
    r.add_argument("--cache-dir", default=None, help="feature cache folder (default: ~/.cache/denuc or $DENUC_CACHE)")
    r.add_argument("--offline", action=argparse.BooleanOptionalAction, default=d.offline,
                   help="never touch the network (default: %(default)s)")
    r.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
                   help="progress bars during detector epochs (default: %(default)s)")
    r.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=d.overwrite,
                   help="delete a finetune run already in --out and start again; when only head-stage options "
                        "changed (--head-preset, --head-epochs, --head-select, --class-balance, --encoder, "
                        "--weights), keep its finished detector stages and train the head again "
                        "(default: %(default)s)")
    r.add_argument("--stop-after", type=int, default=d.stop_after,
                   help="stop after N detector epochs in this run (0 = to the end); rerun to continue "
                        "(default: %(default)s)")


def main(args: argparse.Namespace) -> int:
    from denuc.train.finetune import FinetuneSettings, finetune

    s = FinetuneSettings(
        datasets=list(args.datasets), out=args.out, init=args.init, epochs=args.epochs, lr=args.lr,
        batch_size=args.batch_size, crops_per_epoch=args.crops_per_epoch, stain_p=args.stain_p,
        stain_strength=args.stain_strength, encoder=args.encoder, weights=args.weights, head_preset=args.head_preset,
        head_epochs=args.head_epochs, head_select=args.head_select, class_balance=args.class_balance,
        data_mpp=args.data_mpp, outside=args.outside, val_fraction=args.val_fraction, mpp_check=args.mpp_check,
        seed=args.seed, device=args.device, threads=args.threads, workers=args.workers, cache_dir=args.cache_dir,
        offline=args.offline, progress=args.progress, overwrite=args.overwrite, stop_after=args.stop_after)
    res = finetune(s)
    if not res["finished"]:
        print(f"stopped early; rerun the same command to continue the run in {res['out']}")
    return 0
