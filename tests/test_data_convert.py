"""``denuc convert``: any reader -> generic layout, read back identically; overwrite rules; CLI."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from dataset_fixtures import OCELOT_SAMPLES, make_ocelot, make_puma, puma_feature, square

from denuc.data import convert
from denuc.data.base import SPLITS, PointDataset, open_dataset
from denuc.data.convert import convert_dataset
from denuc.data.readers.generic import GenericDataset
from denuc.errors import InputError


def assert_same_dataset(a: PointDataset, b: PointDataset) -> None:
    """Same classes, colours, splits, order, per-image mpp and points."""
    assert a.classes == b.classes and a.colors == b.colors and a.mpp == b.mpp
    assert a.stems(None) == b.stems(None)
    for s in SPLITS:
        assert a.stems(s) == b.stems(s), s
    for stem in a.stems(None):
        assert a.mpp_of(stem) == b.mpp_of(stem)
        pa, pb = a.points(stem), b.points(stem)
        np.testing.assert_array_equal(pa.xy, pb.xy)
        np.testing.assert_array_equal(pa.class_ids, pb.class_ids)
        assert pa.class_names == pb.class_names and pa.image_size == pb.image_size


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_convert_ocelot(tmp_path: Path) -> None:
    src = make_ocelot(tmp_path / "ocelot")
    report = convert_dataset(src, tmp_path / "out")
    assert report.src_format == "ocelot" and report.images == 4 and report.linked + report.copied == 4
    assert report.split_sizes["train"] == 2 and report.class_counts == {"background_cell": 2, "tumor_cell": 3}
    out = open_dataset(tmp_path / "out")
    assert isinstance(out, GenericDataset)
    assert_same_dataset(open_dataset(src), out)
    assert out.mpp_of("004") == OCELOT_SAMPLES["004"][1]  # per-image mpp survives via image_mpp
    cfg = yaml.safe_load((tmp_path / "out" / "dataset.yaml").read_text())
    assert cfg["source"]["format"] == "ocelot" and cfg["classes"][1]["name"] == "tumor_cell"
    assert sorted(os.listdir(tmp_path / "out" / "images")) == ["001.jpg", "002.jpg", "003.jpg", "004.jpg"]
    # hard links share the inode with the source (this tmp folder is one file system)
    assert os.path.samefile(src / "images" / "train" / "cell" / "001.jpg", tmp_path / "out" / "images" / "001.jpg")


def test_convert_puma_with_mapping_and_splits(tmp_path: Path) -> None:
    rois = {"r1": [puma_feature("nuclei_plasma_cell", [square(1, 1, 2)]), puma_feature("nuclei_tumor",
                                                                                        [square(5, 5, 2)])],
            "r2": [puma_feature("nuclei_lymphocyte", [square(9, 9, 4)])]}
    src = make_puma(tmp_path / "puma", rois)
    splits = tmp_path / "splits.yaml"
    splits.write_text(yaml.safe_dump({"train": ["r1"], "test": ["r2"]}))
    convert_dataset(src, tmp_path / "out", mapping="challenge", splits=str(splits), mpp=0.23, copy=True)
    out = open_dataset(tmp_path / "out")
    assert_same_dataset(open_dataset(src, "puma", mapping="challenge", splits=splits, mpp=0.23), out)
    assert out.classes == ("tumor", "tils", "other") and out.mpp == 0.23
    assert out.points("r1").classes == ["tils", "tumor"] and out.stems("test") == ["r2"]
    assert not os.path.samefile(src / "01_training_dataset_tif_ROIs" / "r1.tif", out.image_path("r1"))  # --copy
    assert out.image_path("r1").read_bytes() == (src / "01_training_dataset_tif_ROIs" / "r1.tif").read_bytes()


def test_overwrite_rules_and_idempotence(tmp_path: Path) -> None:
    src = make_ocelot(tmp_path / "ocelot")
    dst = tmp_path / "out"
    convert_dataset(src, dst)
    first = _files(dst)
    with pytest.raises(InputError, match="folder is not empty; pass --overwrite"):
        convert_dataset(src, dst)
    (dst / "images" / "stale.png").write_bytes(b"x")
    (dst / "points" / "stale.csv").write_text("")
    (dst / "notes.txt").write_text("mine")
    report = convert_dataset(src, dst, overwrite=True)
    assert report.removed == 2 and (dst / "notes.txt").read_text() == "mine"
    second = _files(dst)
    second.pop("notes.txt")
    assert second == first  # same bytes: converting again changes nothing
    convert_dataset(src, dst, overwrite=True, copy=True)  # --copy replaces the earlier hard links
    assert not os.path.samefile(src / "images" / "train" / "cell" / "001.jpg", dst / "images" / "001.jpg")
    assert _files(dst) == second | {"notes.txt": b"mine"}


def test_convert_refusals(tmp_path: Path) -> None:
    src = make_ocelot(tmp_path / "ocelot")
    with pytest.raises(InputError, match="must not be the source folder"):
        convert_dataset(src, src)
    with pytest.raises(InputError, match="must not be the source folder or contain it"):
        convert_dataset(src, tmp_path)
    with pytest.raises(InputError, match="--mapping does not apply to format 'ocelot'"):
        convert_dataset(src, tmp_path / "o", mapping="paper")
    with pytest.raises(InputError, match="not a recognised dataset folder"):
        convert_dataset(tmp_path / "ocelot" / "images", tmp_path / "o2")
    (tmp_path / "file").write_text("")
    with pytest.raises(InputError, match="exists and is not a folder"):
        convert_dataset(src, tmp_path / "file")
    bad = make_ocelot(tmp_path / "bad", {"001": ("train", 0.2, "1,1,1\n500,1,2\n")})
    with pytest.raises(InputError, match="outside"):
        convert_dataset(bad, tmp_path / "o3")
    assert not (tmp_path / "o3" / "dataset.yaml").exists()  # a failed run leaves no dataset behind
    with pytest.warns(UserWarning, match="dropped"):
        convert_dataset(bad, tmp_path / "o3", overwrite=True, outside="drop")
    assert len(open_dataset(tmp_path / "o3").points("001")) == 1


def test_cli_configure_and_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    convert.configure(parser)
    src = make_ocelot(tmp_path / "ocelot")
    args = parser.parse_args(["--from", "ocelot", str(src), str(tmp_path / "out")])
    assert convert.main(args) == 0
    out = capsys.readouterr().out
    assert "converted ocelot" in out and "tumor_cell" in out
    with pytest.raises(SystemExit):
        parser.parse_args(["--from", "nope", str(src), str(tmp_path / "x")])
    # the former spelling --format still works, with a deprecation warning
    old = parser.parse_args(["--format", "ocelot", str(src), str(tmp_path / "out2")])
    assert old.source_format == "ocelot" and "--format is deprecated" in capsys.readouterr().err
    assert parser.parse_args([str(src), str(tmp_path / "out3")]).source_format is None
    assert isinstance(convert.HELP, str) and convert.HELP


@pytest.mark.real_data
def test_convert_brca_m2c_round_trip(brca_dir: Path, tmp_path: Path) -> None:
    report = convert_dataset(brca_dir, tmp_path / "brca")
    assert report.images == 120 and report.split_sizes["train"] == 80
    src, out = open_dataset(brca_dir), open_dataset(tmp_path / "brca")
    assert src.format_name == "brca-m2c" and out.format_name == "generic"
    assert_same_dataset(src, out)
    assert sum(report.class_counts.values()) == sum(len(src.points(s)) for s in src.stems(None))


def _make_brca(root: Path) -> Path:
    """A two-image folder in the published BRCA-M2C layout."""
    from PIL import Image

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i, split in enumerate(("train", "test")):
        Image.new("RGB", (20, 20)).save(root / "images" / f"im{i}.png")
        (root / "labels" / f"im{i}_gt_class_coords.txt").write_text(f"{i + 1} 3 {i + 1}\n")
        (root / f"brca_ds_{split}.txt").write_text(f"im{i}.png\n")
    (root / "brca_ds_val.txt").write_text("")
    return root


def test_convert_brca_layout_and_stems_are_copies(tmp_path: Path) -> None:
    src = _make_brca(tmp_path / "brca")
    convert_dataset(src, tmp_path / "out")
    out = open_dataset(tmp_path / "out")
    assert_same_dataset(open_dataset(src), out)
    np.testing.assert_array_equal(out.points("im1").xy, [[3, 2]])  # BRCA files are "y x id"
    for ds in (open_dataset(src), out, open_dataset(make_ocelot(tmp_path / "oc"))):
        for split in (None, "train"):
            ds.stems(split).clear()  # callers may shuffle or edit what they get
            assert ds.stems(split), (ds.format_name, split)


def test_empty_label_files_still_give_class_ids(tmp_path: Path) -> None:
    src = _make_brca(tmp_path / "brca")
    (src / "labels" / "im0_gt_class_coords.txt").write_text("")
    p = open_dataset(src).points("im0")
    assert len(p) == 0 and p.class_ids is not None and p.class_ids.dtype == np.int64
