"""``denuc embed``: cell embeddings (the head's point features) at given points -> ``<stem>.h5ad``."""

from __future__ import annotations

import argparse
from typing import Any

HELP = ("point features (cell embeddings) of the classification model at given nuclei (CSV x,y or QuPath GeoJSON "
        "points) -> <stem>.h5ad with the head's classes, the points' own classes (obs 'label') and obsm['X_denuc']")


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image file (PNG/JPEG/TIFF) or slide file the points belong to")
    p.add_argument("--points", required=True, metavar="FILE",
                   help="the nuclei: a CSV with x,y[,class] columns (level-0 px; what `denuc predict` writes) or a "
                        "QuPath GeoJSON of points / detections / cells (polygons give their centroids)")
    p.add_argument("--out", required=True, help="output folder (created if missing); writes <image stem>.h5ad")
    p.add_argument("--mpp", type=float, default=None,
                   help="µm per pixel of level 0 (default: from the file; plain PNG/JPEG need it)")
    p.add_argument("--embeddings", default="float16", choices=("float16", "float32"),
                   help="stored dtype of obsm['X_denuc'] (default: %(default)s)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="a model folder written by `denuc finetune` (default: the shipped models)")
    p.add_argument("--encoder", default=None, help="encoder name (default: the head's encoder)")
    p.add_argument("--weights", default=None,
                   help="encoder weights: file, folder or hf-hub:org/name (default: the encoder's own)")
    p.add_argument("--head", default=None, help="head checkpoint (default: the shipped BRCA-M2C head)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda, then mps, then cpu)")
    p.add_argument("--runtime", default="auto", choices=("auto", "torch", "onnx", "onnx-int8"),
                   help="what runs the encoder: torch (the reference), onnx (float32), onnx-int8 (8-bit) or auto "
                        "(onnx-int8 for a CNN encoder on the CPU, onnx for others, torch on a GPU) (default: %(default)s)")
    p.add_argument("--offline", action="store_true", help="never touch the network (default: off)")


def main(args: argparse.Namespace) -> int:
    from denuc.core.files import check_out_dir
    from denuc.core.mpp import check_mpp
    from denuc.pipeline import DeNuC
    from denuc.query.embed import embed_points, read_points, write_embeddings

    if args.mpp is not None:
        check_mpp(args.mpp, "--mpp")
    pts = read_points(args.points)  # bad point files fail before the models load
    out = check_out_dir(args.out)

    class NoDetector:  # embed never detects
        def detect(self, image: Any, mpp: float) -> Any:  # pragma: no cover
            raise AssertionError("embed does not detect")

    model = DeNuC.load(detector=NoDetector(), encoder=args.encoder, head=args.head, device=args.device,
                       weights=args.weights, offline=True if args.offline else None, model=args.model,
                       runtime=args.runtime)
    nuc = embed_points(model, args.image, pts, args.mpp)
    path = write_embeddings(nuc, out, embeddings=args.embeddings, models=model.models(),
                            facts={"input": str(args.image), "points_file": str(args.points),
                                   "encoder_mpp": model.featurizer.mpp})
    print(f"{args.image}: {len(nuc)} points embedded ({nuc.features.shape[1] if nuc.features is not None else 0} "
          f"channels) -> {path}")
    return 0
