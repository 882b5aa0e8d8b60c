"""``denuc convert``: write any readable point dataset in DeNuC's generic layout.

::

    denuc convert [--from brca-m2c|ocelot|puma|generic] [--mapping paper|challenge]
                  [--splits FILE] [--mpp MPP] [--outside error|drop] [--copy] [--overwrite] SRC DST

DST gets ``images/`` (hard links to the source images where the file system allows, else
copies; ``--copy`` always copies), ``points/<stem>.csv`` (``x,y,class``) and
``dataset.yaml`` (mpp, classes with colours, splits, per-image mpp where it differs, and
where the data came from). Every file is written atomically and dataset.yaml last, so an
interrupted run never leaves a folder that opens as a finished dataset. A non-empty DST is
refused unless ``--overwrite``; then the result is the same as converting into an empty
folder (stale files in DST's ``images/`` and ``points/`` are removed, other files are left).
"""

from __future__ import annotations

import argparse
import inspect
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from denuc.errors import InputError

HELP = "convert a point dataset (BRCA-M2C, OCELOT, PUMA, ...) into DeNuC's generic layout"

#: Reader options the command line can pass (``--mapping`` etc.) -> reader keyword.
_READER_OPTIONS = {"mapping": "--mapping", "splits": "--splits", "mpp": "--mpp"}


@dataclass
class ConvertReport:
    """What :func:`convert_dataset` wrote."""

    src_format: str
    dst: Path
    images: int = 0
    linked: int = 0
    copied: int = 0
    removed: int = 0
    split_sizes: dict[str, int] = field(default_factory=dict)
    class_counts: dict[str, int] = field(default_factory=dict)

    def table(self) -> str:
        rows = [f"converted {self.src_format} -> {self.dst} ({self.images} images: {self.linked} hard-linked, "
                f"{self.copied} copied{f', {self.removed} stale files removed' if self.removed else ''})"]
        rows += [f"  {k:<16} {v:>8} images" for k, v in self.split_sizes.items()]
        rows += [f"  {k:<16} {v:>8} nuclei" for k, v in self.class_counts.items()]
        return "\n".join(rows)


def detect_format(path: Path) -> str:
    """Name of the first registered reader that recognises ``path``."""
    import denuc.data.readers  # noqa: F401
    from denuc.data.base import DATASETS

    for name in DATASETS:
        if DATASETS.get(name).detect(path):
            return name
    raise InputError(f"{path}: not a recognised dataset folder (formats: {', '.join(DATASETS.names())}); "
                     "pass --from FORMAT")


def _check_options(fmt: str, options: dict[str, Any]) -> None:
    from denuc.data.base import DATASETS

    accepted = inspect.signature(DATASETS.get(fmt).cls.__init__).parameters
    for key in options:
        if key not in accepted:
            raise InputError(f"{_READER_OPTIONS.get(key, key)} does not apply to format {fmt!r}")


def _prepare_dst(dst: Path, overwrite: bool) -> None:
    from denuc.data.readers.generic import DATASET_YAML

    if dst.exists() and not dst.is_dir():
        raise InputError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise InputError(f"{dst}: folder is not empty; pass --overwrite to replace the dataset in it")
        (dst / DATASET_YAML).unlink(missing_ok=True)  # the old dataset is invalid from here on
    dst.mkdir(parents=True, exist_ok=True)


def _remove_stale(folder: Path, keep: set[str]) -> int:
    n = 0
    if folder.is_dir():
        for f in folder.iterdir():
            if f.is_file() and f.name not in keep:
                f.unlink()
                n += 1
    return n


def _write_png(src: Path, dst: Path) -> None:
    import io

    from PIL import Image

    from denuc.core.files import atomic_write_bytes
    from denuc.data.image import read_image

    buf = io.BytesIO()
    Image.fromarray(read_image(src)).save(buf, format="PNG")
    atomic_write_bytes(dst, buf.getvalue())


def convert_dataset(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    format: str | None = None,
    overwrite: bool = False,
    copy: bool = False,
    outside: str = "error",
    **reader_options: Any,
) -> ConvertReport:
    """Convert the dataset at ``src`` into the generic layout at ``dst``.

    Args:
        format: the source reader (``None`` = auto-detect).
        overwrite: allow a non-empty ``dst`` (see the module docstring).
        copy: copy images instead of hard-linking them.
        outside: policy for label points outside their image (``"error"`` or ``"drop"``).
        reader_options: passed to the reader, e.g. ``mapping="challenge"`` or
            ``splits=path`` for PUMA; an option the reader does not take raises InputError.

    Returns:
        A :class:`ConvertReport`. Opening ``dst`` afterwards gives the same stems, splits,
        classes, per-image mpp and points as ``src``.
    """
    from denuc.core.files import atomic_copy
    from denuc.core.result import Nuclei
    from denuc.data.base import SPLITS, open_dataset
    from denuc.data.image import image_size
    from denuc.data.readers.generic import (
        GENERIC_IMAGE_SUFFIXES,
        IMAGES_DIR,
        POINTS_DIR,
        write_dataset_yaml,
        write_points_csv,
    )

    s, d = Path(src).resolve(), Path(dst).resolve()
    if not s.is_dir():
        raise InputError(f"{s}: source dataset folder does not exist")
    if s == d or d in s.parents:
        raise InputError(f"{d}: the destination must not be the source folder or contain it")
    fmt = format or detect_format(s)
    options = {k: v for k, v in reader_options.items() if v is not None}
    _check_options(fmt, options)
    ds = open_dataset(s, fmt, outside=outside, **options)
    _prepare_dst(d, overwrite)

    report = ConvertReport(fmt, d)
    counts = dict.fromkeys(ds.classes, 0)
    kept_images: set[str] = set()
    kept_points: set[str] = set()
    image_mpp: dict[str, float] = {}
    for stem in ds.stems(None):
        src_img = ds.image_path(stem)
        pts = ds.points(stem, image_size(src_img))
        suffix = src_img.suffix.lower()
        if suffix in GENERIC_IMAGE_SUFFIXES:
            how = atomic_copy(src_img, d / IMAGES_DIR / f"{stem}{suffix}", link=not copy)
        else:  # a format the generic layout does not list: re-encode losslessly as PNG
            suffix, how = ".png", "copied"
            _write_png(src_img, d / IMAGES_DIR / f"{stem}.png")
        report.linked += how in ("linked", "kept")
        report.copied += how == "copied"
        kept_images.add(f"{stem}{suffix}")
        write_points_csv(Nuclei(pts.xy, None, pts.class_ids, pts.class_names), d / POINTS_DIR / f"{stem}.csv")
        kept_points.add(f"{stem}.csv")
        if pts.class_ids is not None:
            for i in pts.class_ids[pts.class_ids >= 0].tolist():
                counts[ds.classes[i]] += 1
        if ds.mpp_of(stem) != ds.mpp:
            image_mpp[stem] = ds.mpp_of(stem)
        report.images += 1
    report.removed = _remove_stale(d / IMAGES_DIR, kept_images) + _remove_stale(d / POINTS_DIR, kept_points)
    splits = {sp: ds.stems(sp) for sp in SPLITS}
    source: dict[str, Any] = {"format": fmt, "path": str(s)}
    source.update({k: str(v) for k, v in options.items()})
    write_dataset_yaml(d, ds.mpp, ds.classes, ds.colors, splits, image_mpp, info={"source": source})
    report.split_sizes = {sp: len(v) for sp, v in splits.items()}
    unsplit = report.images - sum(report.split_sizes.values())
    if unsplit:
        report.split_sizes["(no split)"] = unsplit
    report.class_counts = counts
    return report


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``denuc convert``."""
    import denuc.data.readers  # noqa: F401
    from denuc.data.base import DATASETS, OUTSIDE_POLICIES
    from denuc.data.readers.puma import PUMA_MAPPINGS

    parser.add_argument("src", metavar="SRC", help="source dataset folder")
    parser.add_argument("dst", metavar="DST", help="output folder (generic layout); must be empty unless --overwrite")
    parser.add_argument("--from", dest="source_format", choices=DATASETS.names(), default=None,
                        help="format of the source dataset (default: detected from the folder)")
    from denuc.core.cliargs import add_deprecated_alias

    add_deprecated_alias(parser, "--format", "--from", "source_format", choices=DATASETS.names())
    parser.add_argument("--mapping", choices=PUMA_MAPPINGS.names(), default=None,
                        help="PUMA class mapping: paper = tumor/lymphocyte/other (plasma cells -> other), "
                             "challenge = tumor/tils/other (plasma cells -> tils); default paper")
    parser.add_argument("--splits", default=None, metavar="FILE",
                        help="PUMA: YAML/JSON {train: [stems], val: [...], test: [...]} (default: SRC/splits.yaml "
                             "if present, else no splits)")
    parser.add_argument("--mpp", type=float, default=None,
                        help="PUMA: µm per pixel of the ROIs (default 0.25)")
    parser.add_argument("--outside", choices=OUTSIDE_POLICIES, default="error",
                        help="label points outside their image: error (default) or drop with a warning")
    parser.add_argument("--copy", action="store_true", help="copy images instead of hard-linking them")
    parser.add_argument("--overwrite", action="store_true", help="replace the dataset in a non-empty DST")


def main(args: argparse.Namespace) -> int:
    """Run ``denuc convert``; prints a summary table."""
    report = convert_dataset(
        args.src, args.dst, format=args.source_format, overwrite=args.overwrite, copy=args.copy, outside=args.outside,
        mapping=args.mapping, splits=args.splits, mpp=args.mpp,
    )
    print(report.table(), file=sys.stdout)
    return 0
