"""Detector API and ``denuc detect``: coordinate mapping, bad inputs, batching, CLI behaviour."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from model_fixtures import tiny_detector_checkpoint
from PIL import Image

from denuc.core.result import Nuclei
from denuc.detect import cli as detect_cli
from denuc.detect.api import Detector, default_detector_path
from denuc.detect.windows import detect_images
from denuc.errors import ResolutionError


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_detector_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_points_come_back_in_input_pixels(tiny_ckpt: Path) -> None:
    det = Detector.load(tiny_ckpt, device="cpu", threshold=0.3)
    img = _noise(300, 260)  # at 0.5 µm/px: the model's own resolution
    ref = detect_images(det.model, [img], threshold=0.3)[0]
    same = det.detect(img, 0.5)
    assert same.class_names == ("nucleus",) and (same.class_ids == 0).all()
    assert np.allclose(np.sort(same.xy, 0), np.sort(ref.xy, 0))
    # an image at 0.25 µm/px is resampled to 0.5 and the points scaled back by exactly 2
    from denuc.data.resample import resample

    big = _noise(301, 261, 7)
    ref2 = detect_images(det.model, [resample(big, 0.5)], threshold=0.3)[0]
    up = det.detect(big, 0.25)
    assert up.mpp == 0.25 and up.image_size == (301, 261) and len(up) == len(ref2.xy) > 0
    assert np.allclose(np.sort(up.xy, 0), np.sort(ref2.xy * 2, 0))


def test_missing_and_absurd_mpp_and_bad_arrays(tiny_ckpt: Path) -> None:
    det = Detector.load(tiny_ckpt, device="cpu")
    img = _noise(64, 64)
    with pytest.raises(ResolutionError, match="--mpp"):
        det.detect(img, None)
    with pytest.raises(ResolutionError, match="plausible"):
        det.detect(img, 40.0)
    from denuc.errors import InputError

    with pytest.raises(InputError):
        det.detect(np.zeros((3, 64, 64), np.uint8), 0.5)  # channels-first


def test_small_images_and_batched_many_equal_single(tiny_ckpt: Path) -> None:
    det = Detector.load(tiny_ckpt, device="cpu", threshold=0.3)
    imgs = [_noise(40, 70, 1), _noise(300, 290, 2), _noise(10, 10, 3)]
    many = det.detect_many(imgs, [0.5, 0.5, 0.5], names=["a", "b", "c"])
    for im, m, name in zip(imgs, many, "abc", strict=True):
        one = det.detect(im, 0.5)
        assert m.name == name and np.allclose(m.xy, one.xy) and np.allclose(m.scores, one.scores)
        assert m.inside(*im.shape[:2]).all()


def test_shipped_default_detector_finds_nuclei_and_nothing_on_white() -> None:
    if not default_detector_path().is_file():
        pytest.skip("no shipped detector in denuc/assets")
    det = Detector.load(device="cpu")
    assert det.mpp > 0 and det.config["config"]["class_names"] == ["nucleus"]
    sample = Path(str(default_detector_path().parent / "sample" / "brca-m2c-sample.png"))
    from denuc.data.image import read_image

    nuc = det.detect(read_image(sample), 0.5)
    assert len(nuc) > 50 and nuc.inside(*nuc.image_size).all()
    assert len(det.detect(np.full((300, 300, 3), 255, np.uint8), 0.5)) == 0


def test_cli_writes_csvs_skips_existing_and_reports_bad_images(tiny_ckpt: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_noise(100, 120, 5)).save(src / "good1.png")
    Image.fromarray(_noise(300, 280, 6)).save(src / "good2.png")
    (src / "broken.png").write_bytes(b"\x89PNG not really")
    out = tmp_path / "out"
    p = argparse.ArgumentParser()
    detect_cli.configure(p)
    args = p.parse_args([str(src), "--out", str(out), "--mpp", "0.5", "--detector", str(tiny_ckpt),
                         "--device", "cpu", "--threshold", "0.3"])
    assert detect_cli.main(args) == 1
    err = capsys.readouterr().err
    assert "broken.png" in err
    n1 = Nuclei.read_csv(out / "good1.csv")
    assert set(n1.classes) <= {"nucleus"} and n1.scores is not None
    assert sorted(f.name for f in out.iterdir()) == ["good1.csv", "good1.overlay.png", "good1.summary.json",
                                                     "good2.csv", "good2.overlay.png", "good2.summary.json",
                                                     "summary.csv"]
    (out / "good1.csv").write_text("x,y,class,score\n")  # pretend a finished earlier run
    (src / "broken.png").unlink()
    assert detect_cli.main(args) == 0
    assert (out / "good1.csv").read_text() == "x,y,class,score\n"  # skipped
    args.overwrite = True
    assert detect_cli.main(args) == 0
    assert len(Nuclei.read_csv(out / "good1.csv")) == len(n1)
    # no --mpp and none in the files: each input fails naming the file and --mpp, nothing is written
    assert detect_cli.main(p.parse_args([str(src), "--out", str(tmp_path / "nompp"), "--detector", str(tiny_ckpt)])) == 1
    err = capsys.readouterr().err
    assert "good1.png" in err and "--mpp" in err and not list((tmp_path / "nompp").iterdir())
    # --detector-window reaches the detector: the CSV equals the API's result with that window
    args.detector_window, args.out = 512, tmp_path / "out512"
    assert detect_cli.main(args) == 0
    want = Detector.load(tiny_ckpt, device="cpu", threshold=0.3, window=512).detect(_noise(300, 280, 6), 0.5)
    np.testing.assert_allclose(Nuclei.read_csv(args.out / "good2.csv").xy, want.xy)
    default = Detector.load(tiny_ckpt, device="cpu", threshold=0.3).detect(_noise(300, 280, 6), 0.5)
    assert len(default) != len(want) or not np.allclose(default.xy, want.xy)  # the option changed something


def test_window_option_sets_the_grid_and_agrees_away_from_window_edges(tiny_ckpt: Path) -> None:
    from denuc.errors import InputError

    base = Detector.load(tiny_ckpt, device="cpu", threshold=0.3)
    assert (base.window, base.stride, base.batch_size) == (256, 192, 4)  # the checkpoint's grid; 0.25 Mpx batches
    big = Detector.load(tiny_ckpt, device="cpu", threshold=0.3, window=512)
    assert (big.window, big.stride, big.batch_size) == (512, 448, 1)
    assert Detector.load(tiny_ckpt, device="cpu", window=512, batch_size=3).batch_size == 3
    for bad in (64, 100):  # not larger than the two margins; not a multiple of 32
        with pytest.raises(InputError, match="multiple of 32"):
            Detector.load(tiny_ckpt, device="cpu", window=bad)
    # the detector runs the window grid it reports (window inference itself is tested against
    # whole-image inference in test_detect_model.py)
    img = _noise(700, 600, 3)
    for d in (base, big):
        ref = detect_images(d.model, [img], threshold=0.3, window=d.window, stride=d.stride, margin=32)[0]
        got = d.detect(img, 0.5)
        assert len(got) == len(ref.xy) > 20
        np.testing.assert_array_equal(got.xy, ref.xy)
    assert len(big.detect(img, 0.5)) != len(base.detect(img, 0.5))  # another grid: a (slightly) different result
