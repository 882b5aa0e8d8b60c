"""Make whole-slide test files from real BRCA-M2C images (0.5 µm/px), upsampled 2x to a
0.25 µm/px level 0 (like a 40x scan) and pasted as tissue islands on uniform glass.

    python benchmarks/make_test_slide.py brca  [--out runs/test_slides/brca.svs] [--images 12] [--split test]
    python benchmarks/make_test_slide.py glass [--out runs/test_slides/glass.svs] [--size 100000] [--islands 5]

``brca``: the images of a split in a grid with gaps of glass between them: a small slide whose
every nucleus has a ground-truth point. ``glass``: a large (default 100,000 x 100,000 px)
mostly-glass slide with a few islands at random places, written tile by tile in bounded
memory (the full-size default takes minutes; make it once).

Both write an Aperio-style pyramidal JPEG TIFF (levels 1, 4, 16; ``MPP = 0.25`` in its
description, so OpenSlide reports ``openslide.mpp-x``), ``<out stem>_points.csv`` with the
ground-truth points of every island in level-0 px (``x,y,class``), and ``<out stem>.json``
describing what was made: size, mpp, levels, and each island's image and level-0 box
``[x0, y0, x1, y1)``. The data folder is ``$DENUC_DATA/brca-m2c`` (default
``../shared/data/brca-m2c``).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from common import write_json

from denuc.core.result import Nuclei
from denuc.data.image import read_image
from denuc.data.paths import brca_m2c_dir
from denuc.data.readers.brca_m2c import BRCA_MPP, read_yxc_file
from denuc.data.resample import resample
from denuc.source.testslide import write_pyramidal_tiff_tiles

REPO = Path(__file__).resolve().parents[1]
SLIDE_MPP = 0.25  # level 0: the 0.5 µm/px images upsampled 2x
GLASS = (242, 242, 240)


@dataclass
class Island:
    """One pasted image: level-0 top-left ``(x, y)`` and its pixels ``(h, w, 3)``."""

    name: str
    x: int
    y: int
    pixels: np.ndarray
    points: Nuclei

    @property
    def box(self) -> tuple[int, int, int, int]:
        h, w = self.pixels.shape[:2]
        return self.x, self.y, self.x + w, self.y + h


def load_island(root: Path, stem: str) -> tuple[np.ndarray, Nuclei]:
    """A BRCA-M2C image upsampled to :data:`SLIDE_MPP` and its points in that image's px."""
    img = read_image(root / "images" / f"{stem}.png")
    pts = read_yxc_file(root / "labels" / f"{stem}_gt_class_coords.txt")
    pts.mpp = BRCA_MPP
    return resample(img, BRCA_MPP / SLIDE_MPP), pts.rescale(SLIDE_MPP)


def split_stems(root: Path, split: str) -> list[str]:
    f = root / f"brca_ds_{split}.txt"
    if not f.is_file():
        sys.exit(f"no BRCA-M2C split list at {f}; set DENUC_DATA to the folder holding brca-m2c/")
    return [Path(ln.strip()).stem for ln in f.read_text().splitlines() if ln.strip()]


def tile_fn_for(islands: list[Island]):  # type: ignore[no-untyped-def]
    """``tile_fn(x, y, w, h)`` of the slide: glass (one pixel) where no island is, else the
    region with the islands pasted."""
    glass = np.array([[GLASS]], dtype=np.uint8)
    boxes = np.array([isl.box for isl in islands], dtype=np.int64).reshape(-1, 4)

    def tile_fn(x: int, y: int, w: int, h: int) -> np.ndarray:
        hit = np.flatnonzero((boxes[:, 0] < x + w) & (boxes[:, 2] > x) & (boxes[:, 1] < y + h) & (boxes[:, 3] > y))
        if not len(hit):
            return glass
        out = np.empty((h, w, 3), dtype=np.uint8)
        out[:] = GLASS
        for k in hit:
            isl = islands[k]
            x0, y0, x1, y1 = isl.box
            ax0, ay0, ax1, ay1 = max(x0, x), max(y0, y), min(x1, x + w), min(y1, y + h)
            out[ay0 - y:ay1 - y, ax0 - x:ax1 - x] = isl.pixels[ay0 - y0:ay1 - y0, ax0 - x0:ax1 - x0]
        return out

    return tile_fn


def brca_layout(root: Path, stems: list[str], columns: int, gap: int) -> tuple[list[Island], tuple[int, int]]:
    """Islands in a grid, ``gap`` px of glass around and between them."""
    islands: list[Island] = []
    cells = [load_island(root, s) for s in stems]
    cell = max(max(img.shape[:2]) for img, _ in cells)
    for k, (stem, (img, pts)) in enumerate(zip(stems, cells)):
        r, c = divmod(k, columns)
        x, y = gap + c * (cell + gap), gap + r * (cell + gap)
        islands.append(Island(stem, x, y, img, pts.shift(x, y)))
    rows = -(-len(stems) // columns)
    return islands, (gap + min(columns, len(stems)) * (cell + gap), gap + rows * (cell + gap))


def glass_layout(root: Path, stems: list[str], size: int, seed: int) -> list[Island]:
    """Islands at random non-overlapping places (at least 1000 px apart) inside the slide."""
    rng = np.random.default_rng(seed)
    islands: list[Island] = []
    for stem in stems:
        img, pts = load_island(root, stem)
        h, w = img.shape[:2]
        for _ in range(1000):
            x, y = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            if all(x + w + 1000 <= i.box[0] or i.box[2] + 1000 <= x or y + h + 1000 <= i.box[1] or
                   i.box[3] + 1000 <= y for i in islands):
                break
        else:
            sys.exit(f"could not place {len(stems)} islands on a {size} px slide; use fewer --islands")
        islands.append(Island(stem, x, y, img, pts.shift(x, y)))
    return islands


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("kind", choices=["brca", "glass"], help="grid of a split's images, or a large glass slide")
    ap.add_argument("--out", type=Path, help="slide file (default runs/test_slides/<kind>.svs)")
    ap.add_argument("--data", type=Path, default=None, help="BRCA-M2C folder (default $DENUC_DATA/brca-m2c)")
    ap.add_argument("--split", default="test", help="BRCA-M2C split the images come from")
    ap.add_argument("--images", type=int, default=12, help="brca: number of images in the grid")
    ap.add_argument("--columns", type=int, default=4, help="brca: images per grid row")
    ap.add_argument("--gap-um", type=float, default=250.0, help="brca: glass between images, µm")
    ap.add_argument("--size", type=int, default=100_000, help="glass: slide side, level-0 px")
    ap.add_argument("--islands", type=int, default=5, help="glass: number of pasted images")
    ap.add_argument("--seed", type=int, default=0, help="glass: seed of the island positions")
    ap.add_argument("--tile", type=int, default=256, help="TIFF tile side, px")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    args = ap.parse_args(argv)

    root = args.data or brca_m2c_dir()
    stems = split_stems(root, args.split)
    out = (args.out or REPO / "runs" / "test_slides" / f"{args.kind}.svs").resolve()
    t0 = time.perf_counter()
    if args.kind == "brca":
        islands, size = brca_layout(root, stems[: args.images], args.columns, round(args.gap_um / SLIDE_MPP))
    else:
        islands = glass_layout(root, stems[: args.islands], args.size, args.seed)
        size = (args.size, args.size)
    downsamples = (1, 4, 16)
    write_pyramidal_tiff_tiles(out, size, tile_fn_for(islands), SLIDE_MPP, tile=args.tile, downsamples=downsamples,
                               quality=args.quality, flavor="aperio")
    points = Nuclei.concat([isl.points for isl in islands])
    points.name = out.stem
    csv = points.to_csv(out.with_name(f"{out.stem}_points.csv"))
    seconds = time.perf_counter() - t0
    info = {
        "kind": args.kind, "path": str(out), "points_csv": str(csv), "mpp": SLIDE_MPP, "size": list(size),
        "downsamples": list(downsamples), "tile": args.tile, "jpeg_quality": args.quality,
        "file_bytes": out.stat().st_size, "seconds": round(seconds, 1), "n_points": len(points),
        "islands": [{"image": isl.name, "box": list(isl.box), "n_points": len(isl.points)} for isl in islands],
    }
    write_json(out.with_name(f"{out.stem}.json"), info)
    print(f"{args.kind}: {size[0]} x {size[1]} px at {SLIDE_MPP} µm/px, {len(islands)} island(s), "
          f"{len(points)} points, {out.stat().st_size / 1e6:.1f} MB in {seconds:.1f} s -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
