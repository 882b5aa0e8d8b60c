"""How well do clusters of frozen-encoder cell embeddings recover BRCA-M2C's annotated classes?

For every BRCA-M2C ``test`` image, the shipped model's point features (what ``obsm['X_denuc']``
of ``denuc predict --format h5ad`` holds) are sampled at the annotated (GT) nuclei with
:meth:`denuc.DeNuC.embed`; the head classifies the same features. The features of all test
images are pooled and clustered (:func:`denuc.evaluate.spatial.embedding_clusters`: per-channel
standardisation, 50 principal components, k-means) for several k; the adjusted Rand index
(ARI) compares the clusters with the annotated classes and with the head's classes. The ARI of
the head's classes vs the annotated ones is the supervised reference. One neighbourhood
statistic (z-scores of annotated class pairs within 15 µm, 200 permutations) is reported per
image, averaged.

    nice python benchmarks/cells_spatial.py [--report] [--limit N]

Prints a table, writes ``benchmarks/results/cells_spatial.json`` (``--report``: also
``benchmarks/reported/``). Test split only, scored once; no choice is made on it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import run_info, write_result

from denuc.data import open_dataset
from denuc.data.paths import brca_m2c_dir
from denuc.evaluate.spatial import adjusted_rand_index, embedding_clusters, neighbourhood_enrichment
from denuc.pipeline import DeNuC


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="also copy the JSON to benchmarks/reported/")
    ap.add_argument("--limit", type=int, default=0, help="first N test images only (0 = all)")
    ap.add_argument("--ks", type=int, nargs="+", default=[3, 6, 10], help="k-means cluster counts")
    ap.add_argument("--radius-um", type=float, default=15.0, help="neighbour radius of the enrichment statistic")
    args = ap.parse_args()
    ds = open_dataset(brca_m2c_dir())
    stems = ds.stems("test")[: args.limit or None]
    model = DeNuC.load(device="cpu", runtime="torch")
    classes = list(ds.classes)
    assert tuple(model.class_names) == tuple(classes), (model.class_names, classes)
    feats, gt, head, zs = [], [], [], []
    t0 = time.perf_counter()
    for i, s in enumerate(stems):
        smp = ds.load(s)
        pts = smp.points.select(smp.points.inside(*smp.image.shape[:2]))
        pts = pts.select(pts.class_ids >= 0)
        e = model.embed(smp.image, pts, mpp=smp.mpp)
        assert e.features is not None and e.class_ids is not None and pts.class_ids is not None
        feats.append(e.features)
        gt.append(pts.class_ids)
        head.append(e.class_ids)
        if len(pts) > 10:
            z, _ = neighbourhood_enrichment(pts.xy, pts.class_ids, args.radius_um / smp.mpp, n_perm=200, seed=i)
            zk = np.full((len(classes), len(classes)), np.nan)
            zk[: z.shape[0], : z.shape[1]] = z
            zs.append(zk)
        print(f"{i + 1}/{len(stems)} {s}: {len(pts)} points", flush=True)
    seconds = time.perf_counter() - t0
    x = np.concatenate(feats)
    y = np.concatenate(gt)
    h = np.concatenate(head)
    rows = []
    for k in args.ks:
        for dtype in ("float32", "float16"):
            c = embedding_clusters(x.astype(dtype).astype(np.float32), k, seed=0)
            rows.append({"k": k, "features": dtype, "ari_vs_annotated": round(adjusted_rand_index(c, y), 4),
                         "ari_vs_head": round(adjusted_rand_index(c, h), 4)})
    head_ari = round(adjusted_rand_index(h, y), 4)
    head_acc = round(float((h == y).mean()), 4)
    zmean = np.nanmean(np.stack(zs), axis=0) if zs else np.zeros((0, 0))
    print(f"\n{len(stems)} test images, {len(y)} annotated nuclei, {x.shape[1]} feature channels "
          f"({model.encoder.name}); embedding {seconds:.0f} s")
    print(f"{'k':>3} {'features':>8} {'ARI vs annotated':>17} {'ARI vs head':>12}")
    for r in rows:
        print(f"{r['k']:>3} {r['features']:>8} {r['ari_vs_annotated']:>17.3f} {r['ari_vs_head']:>12.3f}")
    print(f"head classes vs annotated: ARI {head_ari:.3f}, accuracy {head_acc:.3f}")
    print(f"neighbourhood enrichment z ({args.radius_um:g} µm, mean over images), rows/cols {classes}:")
    print(np.array2string(zmean, precision=1))
    write_result("cells_spatial", {
        **run_info("cells_spatial.py"), "split": "test", "images": len(stems), "nuclei": int(len(y)),
        "encoder": model.encoder.name, "channels": int(x.shape[1]), "classes": classes,
        "class_counts": {c: int((y == j).sum()) for j, c in enumerate(classes)},
        "clusters": rows, "head_vs_annotated": {"ari": head_ari, "accuracy": head_acc},
        "neighbourhood_enrichment": {"radius_um": args.radius_um, "n_perm": 200, "classes": classes,
                                     "mean_z": np.round(zmean, 2).tolist()},
        "embedding_seconds": round(seconds, 1)}, args.report)


if __name__ == "__main__":
    main()
