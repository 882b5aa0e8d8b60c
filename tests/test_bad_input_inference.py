"""Bad input at inference (`detect`, `predict`, Detector, DeNuC): one failing image never stops a
batch, TIFF variants are read as the RGB they show, absurd mpp/threshold/device values and
unusable output folders are refused in one line before any work."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from denuc.cli import main
from denuc.core.result import Nuclei
from denuc.data.image import read_image
from denuc.detect.api import Detector
from denuc.errors import InputError, ModelError, ResolutionError


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _detect(args: list[str], ckpt: Path) -> int:
    return main(["detect", *args, "--detector", str(ckpt), "--device", "cpu"])


# ---------------------------------------------------------------- one image never stops the batch
def test_image_over_pillows_default_limit_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's decompression-bomb limit (89 Mpx by default) is raised to DeNuC's bound, so a
    large lab tile is read instead of raising DecompressionBombError (here: limit set low)."""
    a = _rgb(40, 40)
    Image.fromarray(a).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 1600 px > 2 x 500: Pillow would raise
    np.testing.assert_array_equal(read_image(tmp_path / "big.png"), a)


def test_image_above_denucs_bound_is_a_per_image_error(tmp_path: Path, tiny_ckpt: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    import denuc.data.image as image_mod

    monkeypatch.setattr(image_mod, "MAX_IMAGE_PIXELS", 1000)
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(40, 40)).save(d / "a_big.png")
    tifffile.imwrite(d / "b_big.tif", _rgb(40, 40), photometric="rgb")
    Image.fromarray(_rgb(20, 20)).save(d / "c_good.png")
    with pytest.raises(InputError, match=r"a_big\.png: image is 40 x 40 px .*pyramidal TIFF"):
        read_image(d / "a_big.png")
    with pytest.raises(InputError, match=r"b_big\.tif: image is 40 x 40 px .*pyramidal TIFF"):
        read_image(d / "b_big.tif")
    out = tmp_path / "out"
    assert _detect([str(d), "--mpp", "0.5", "--out", str(out)], tiny_ckpt) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "a_big.png" in err
    # a TIFF is read tile by tile as a slide instead: no bound on its size
    assert (out / "c_good.csv").is_file() and (out / "b_big.csv").is_file() and not (out / "a_big.csv").exists()


def test_decompression_bomb_error_is_an_input_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow still raises above twice a limit a caller set higher than ours; that is an InputError."""
    Image.fromarray(_rgb(8, 8)).save(tmp_path / "x.png")

    def bomb(*a: object, **k: object) -> None:
        raise Image.DecompressionBombError("Image size (999 pixels) exceeds limit")

    monkeypatch.setattr(Image, "open", bomb)
    with pytest.raises(InputError, match=r"x\.png: image too large .*tiles"):
        read_image(tmp_path / "x.png")


def test_image_that_resamples_below_one_pixel_does_not_stop_the_batch(
        tmp_path: Path, tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from denuc.data.resample import resample

    assert resample(_rgb(1, 1), 0.1).shape == (1, 1, 3)
    assert resample(_rgb(300, 4), 0.1).shape == (30, 1, 3)
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(1, 1)).save(d / "a_one.png")
    Image.fromarray(_rgb(64, 64)).save(d / "b_good.png")
    out = tmp_path / "out"
    assert _detect([str(d), "--mpp", "0.05", "--out", str(out)], tiny_ckpt) == 0
    assert (out / "a_one.csv").is_file() and (out / "b_good.csv").is_file()
    det = Detector.load(tiny_ckpt, device="cpu")
    assert len(det.detect(_rgb(3, 3), 0.05)) == 0


@pytest.mark.parametrize("exc", [RuntimeError("Input and output sizes should be greater than 0"), MemoryError()])
def test_unexpected_error_in_one_image_is_reported_and_the_rest_is_done(
        tmp_path: Path, tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], exc: BaseException) -> None:
    d = tmp_path / "in"
    d.mkdir()
    for s in ("a", "b", "c"):
        Image.fromarray(_rgb(32, 32)).save(d / f"{s}.png")
    orig = Detector.detect_works
    calls = [0]

    def flaky(self: Detector, works: list[np.ndarray], **kw: object) -> list[object]:
        calls[0] += 1
        if calls[0] == 2:  # inputs run in name order: the second is b.png
            raise exc
        return orig(self, works, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(Detector, "detect_works", flaky)
    out = tmp_path / "out"
    assert _detect([str(d), "--mpp", "0.5", "--out", str(out)], tiny_ckpt) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = next(x for x in err.splitlines() if "b.png" in x and "error" in x)
    assert type(exc).__name__ in line and line.count(str(d / "b.png")) == 1
    assert (out / "a.csv").is_file() and (out / "c.csv").is_file() and not (out / "b.csv").exists()


def test_unexpected_read_error_is_per_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import denuc.data.image as image_mod

    paths = []
    for s in ("a", "b"):
        Image.fromarray(_rgb(8, 8)).save(tmp_path / f"{s}.png")
        paths.append(tmp_path / f"{s}.png")
    orig = image_mod.read_image

    def read(p: Path) -> np.ndarray:
        if Path(p).stem == "a":
            raise MemoryError()
        return orig(p)

    monkeypatch.setattr(image_mod, "read_image", read)
    got = list(image_mod.prefetch_images(paths, ahead=1))
    assert isinstance(got[0][1], InputError) and "out of memory" in str(got[0][1])
    assert isinstance(got[1][1], np.ndarray)


def test_keyboard_interrupt_still_stops_the_run(tmp_path: Path, tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "in"
    d.mkdir()
    for s in ("a", "b"):
        Image.fromarray(_rgb(32, 32)).save(d / f"{s}.png")

    def interrupt(self: Detector, works: list[np.ndarray], **kw: object) -> list[object]:
        raise KeyboardInterrupt

    monkeypatch.setattr(Detector, "detect_works", interrupt)
    assert _detect([str(d), "--mpp", "0.5", "--out", str(tmp_path / "out")], tiny_ckpt) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not list((tmp_path / "out").glob("*.csv")) and not list((tmp_path / "out").glob(".*claim"))


def test_predict_reports_unexpected_errors_per_image_and_stops_on_ctrl_c(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tiny_ckpt: Path) -> None:
    import denuc.stream.job as job

    orig = job._run_files

    def run_files(runner, source, *a, **k):  # type: ignore[no-untyped-def]
        if source.name == "b":
            raise ValueError("something inside broke")
        if source.name == "c":
            raise KeyboardInterrupt
        return orig(runner, source, *a, **k)

    monkeypatch.setattr(job, "_run_files", run_files)
    d = tmp_path / "in"
    d.mkdir()
    for s in ("a", "b"):
        Image.fromarray(_rgb(16, 16)).save(d / f"{s}.png")
    (d / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    argv = ["detect", str(d), "--mpp", "0.5", "--out", str(out), "--detector", str(tiny_ckpt)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ValueError: something inside broke" in err
    bad_line = next(x for x in err.splitlines() if "bad.png" in x)
    assert bad_line.startswith("denuc detect: error: ") and bad_line.count("bad.png") == 1
    assert "2 of 3 input(s) failed; 1 written to" in err
    assert (out / "a.csv").is_file() and not (out / "b.csv").exists()
    Image.fromarray(_rgb(16, 16)).save(d / "c.png")
    Image.fromarray(_rgb(16, 16)).save(d / "d.png")
    assert main(argv) == 130
    assert not (out / "d.csv").exists() and not list(out.glob(".*claim"))


# ---------------------------------------------------------------- detect collects inputs like predict
def test_detect_refuses_inputs_sharing_a_stem_and_empty_folders(tmp_path: Path, tiny_ckpt: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(16, 16)).save(d / "x.png")
    tifffile.imwrite(d / "x.tif", _rgb(16, 16), photometric="rgb")
    out = tmp_path / "out"
    assert _detect([str(d), "--mpp", "0.5", "--out", str(out)], tiny_ckpt) == 2
    err = capsys.readouterr().err
    assert "rename one" in err and "Traceback" not in err
    assert not out.exists() or not list(out.iterdir())
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _detect([str(empty), "--mpp", "0.5", "--out", str(out)], tiny_ckpt) == 2
    assert "folder holds no image" in capsys.readouterr().err


# ---------------------------------------------------------------- TIFF variants
def test_tiff_cmyk_is_converted_to_rgb(tmp_path: Path) -> None:
    cmyk = np.array([[[255, 0, 0, 0], [0, 255, 0, 0], [0, 0, 255, 0], [0, 0, 0, 255], [0, 0, 0, 0]]], np.uint8)
    want = np.array([[[0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0], [255, 255, 255]]], np.uint8)
    tifffile.imwrite(tmp_path / "t.tif", cmyk, photometric="separated")
    np.testing.assert_array_equal(read_image(tmp_path / "t.tif"), want)
    tifffile.imwrite(tmp_path / "t16.tif", cmyk.astype(np.uint16) * 257, photometric="separated")
    np.testing.assert_array_equal(read_image(tmp_path / "t16.tif"), want)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "pil.tif")  # as Pillow writes it
    np.testing.assert_array_equal(read_image(tmp_path / "pil.tif"), want)


def test_tiff_palette_uses_the_colormap(tmp_path: Path) -> None:
    cmap = np.zeros((3, 256), np.uint16)
    cmap[:, 1] = [255 * 257, 0, 0]
    cmap[:, 2] = [0, 128 * 257, 255 * 257]
    idx = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    want = np.array([[[0, 0, 0], [255, 0, 0], [0, 128, 255]], [[0, 128, 255], [255, 0, 0], [0, 0, 0]]], np.uint8)
    tifffile.imwrite(tmp_path / "p.tif", idx, photometric="palette", colormap=cmap)
    np.testing.assert_array_equal(read_image(tmp_path / "p.tif"), want)
    im = Image.fromarray(idx, "P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 128, 255] + [0] * (256 * 3 - 9))
    im.save(tmp_path / "pil.tif")
    np.testing.assert_array_equal(read_image(tmp_path / "pil.tif"), want)


def test_tiff_miniswhite_is_inverted(tmp_path: Path) -> None:
    g = np.array([[0, 10, 200, 255]], np.uint8)
    tifffile.imwrite(tmp_path / "w.tif", g, photometric="miniswhite")
    np.testing.assert_array_equal(read_image(tmp_path / "w.tif")[..., 0], 255 - g)
    g16 = g.astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "w16.tif", g16, photometric="miniswhite")
    np.testing.assert_array_equal(read_image(tmp_path / "w16.tif")[..., 1], 255 - g)


def test_tiff_planar_rgb(tmp_path: Path) -> None:
    a = _rgb(5, 7)
    tifffile.imwrite(tmp_path / "pl.tif", np.moveaxis(a, 2, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "pl.tif"), a)
    a16 = a.astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "pl16.tif", np.moveaxis(a16, 2, 0), photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(tmp_path / "pl16.tif"), a)


def test_compressed_tiffs_are_read_without_imagecodecs(tmp_path: Path) -> None:
    a = _rgb(16, 16)
    for comp in ("tiff_lzw", "tiff_adobe_deflate", "packbits"):
        Image.fromarray(a).save(tmp_path / f"{comp}.tif", compression=comp)
        np.testing.assert_array_equal(read_image(tmp_path / f"{comp}.tif"), a)
    smooth = np.repeat(np.repeat(np.array([[[200, 60, 90]]], np.uint8), 32, 0), 32, 1)
    Image.fromarray(smooth).save(tmp_path / "jpeg.tif", compression="jpeg", quality=95)
    assert np.abs(read_image(tmp_path / "jpeg.tif").astype(int) - smooth).max() <= 4


def test_tiff_read_by_neither_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "junk.tif").write_bytes(b"II*\x00" + b"\xff" * 20)
    with pytest.raises(InputError, match=r"junk\.tif: cannot read TIFF"):
        read_image(tmp_path / "junk.tif")


# ---------------------------------------------------------------- mpp bound
@pytest.mark.parametrize("mpp", [5, 10, 20, 40, 4.01])
def test_magnification_as_mpp_is_refused_with_a_hint(tiny_ckpt: Path, mpp: float) -> None:
    from denuc.core.mpp import check_mpp

    with pytest.raises(ResolutionError, match=r"magnification.*40x is about 0\.25"):
        check_mpp(mpp, "--mpp")
    det = Detector.load(tiny_ckpt, device="cpu")
    with pytest.raises(ResolutionError, match="magnification"):
        det.detect(_rgb(8, 8), mpp)


def test_mpp_bounds_and_bools() -> None:
    from denuc.core.mpp import MPP_MAX, check_mpp

    assert MPP_MAX == 4.0 and check_mpp(4.0) == 4.0 and check_mpp(np.float64(0.25)) == 0.25
    with pytest.raises(ResolutionError, match="must be a number"):
        check_mpp(True)
    with pytest.raises(ResolutionError) as e:
        check_mpp(np.float64(20.0))
    assert "np.float64" not in str(e.value)


def test_mpp_20_is_refused_before_any_model_or_image_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    def no(*a: object, **k: object) -> None:
        raise AssertionError("loaded a model")

    monkeypatch.setattr(Detector, "load", classmethod(no))
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "a.png")
    assert main(["detect", str(tmp_path / "a.png"), "--mpp", "20", "--out", str(tmp_path / "o")]) == 2
    assert "40x is about 0.25" in capsys.readouterr().err


def test_working_image_over_the_pixel_budget_is_refused_before_resampling(
        tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import denuc.data.resample as rs
    from denuc.detect import api

    monkeypatch.setattr(api, "MAX_WORK_PIXELS", 10_000)

    def no(*a: object, **k: object) -> None:
        raise AssertionError("resampled")

    monkeypatch.setattr(rs, "resample", no)
    det = Detector.load(tiny_ckpt, device="cpu")
    with pytest.raises(InputError, match=r"tile: 30 x 30 px at 4 µm/px becomes 240 x 240 px"):
        det.detect(_rgb(30, 30), 4.0, name="tile")


# ---------------------------------------------------------------- threshold
@pytest.mark.parametrize("thr", [float("nan"), float("inf"), 2.0, 1.0, -1.0, -0.01, True, "high"])
def test_bad_threshold_is_refused(tiny_ckpt: Path, thr: object) -> None:
    with pytest.raises(InputError, match="0 <= threshold < 1"):
        Detector.load(tiny_ckpt, device="cpu", threshold=thr)  # type: ignore[arg-type]


def test_threshold_edges_and_cli(tmp_path: Path, tiny_ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert Detector.load(tiny_ckpt, device="cpu", threshold=0.0).threshold == 0.0
    assert Detector.load(tiny_ckpt, device="cpu", threshold=0.99).threshold == 0.99
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "a.png")
    missing = tmp_path / "no-such-detector.safetensors"  # the threshold is checked first
    assert main(["detect", str(tmp_path / "a.png"), "--mpp", "0.5", "--out", str(tmp_path / "o"),
                 "--threshold", "nan", "--detector", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "0 <= threshold < 1" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "a.csv").exists()


# ---------------------------------------------------------------- output location, files
@pytest.fixture
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a CLI loads a model (output checks must come first)."""
    from denuc.pipeline import DeNuC

    def no(*a: object, **k: object) -> None:
        raise AssertionError("loaded a model")

    monkeypatch.setattr(DeNuC, "load", classmethod(no))
    monkeypatch.setattr(Detector, "load", classmethod(no))


@pytest.mark.parametrize("cmd", ["detect", "predict"])
def test_out_that_is_a_file_or_under_a_file_is_one_line(tmp_path: Path, tiny_ckpt: Path, cmd: str,
                                                        no_model_loading: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "a.png")
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, msg in ((afile, "exists and is not a folder"), (afile / "sub", "cannot write there")):
        assert main([cmd, str(tmp_path / "a.png"), "--mpp", "0.5", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and msg in err and "afile" in err


def test_read_only_out_folder_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_model_loading: None,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "a.png")
    ro = tmp_path / "ro"
    ro.mkdir()
    real = Path.write_bytes

    def erofs(self: Path, data: bytes) -> int:  # a read-only file system (root ignores chmod)
        if self.parent == ro:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", erofs)
    for cmd in ("detect", "predict"):
        assert main([cmd, str(tmp_path / "a.png"), "--mpp", "0.5", "--out", str(ro)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "Read-only file system" in err and str(ro) in err


def test_failed_write_is_not_hidden_by_failing_cleanup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from denuc.core import files

    def write_fails(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device (the real error)")

    def unlink_fails(self: Path, missing_ok: bool = False) -> None:
        raise OSError(errno.EROFS, "Read-only file system (cleanup)")

    monkeypatch.setattr(Path, "write_bytes", write_fails)
    monkeypatch.setattr(Path, "unlink", unlink_fails)
    with pytest.raises(OSError, match="the real error") as e:
        files.atomic_write_bytes(tmp_path / "a.csv", b"x")
    assert e.value.__context__ is None or "cleanup" not in str(e.value.__context__)
    with pytest.raises(OSError, match="the real error"), files.atomic_target(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"x")


def test_atomic_target_gives_umask_permissions(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from denuc.core.files import atomic_target

    old = os.umask(0o022)
    try:
        with atomic_target(tmp_path / "w.safetensors") as tmp:
            save_file({"a": torch.zeros(2)}, str(tmp))  # safetensors creates 0600
        assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
    finally:
        os.umask(old)


def test_pick_device_refuses_unknown_and_unavailable_devices(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path, tiny_ckpt: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from denuc.train.detector import pick_device

    assert pick_device("cpu").type == "cpu" and pick_device(None).type in ("cpu", "cuda", "mps")
    with pytest.raises(ModelError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ModelError, match="no CUDA GPU"):
        pick_device("cuda")
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "a.png")
    assert main(["detect", str(tmp_path / "a.png"), "--mpp", "0.5", "--out", str(tmp_path / "o"),
                 "--detector", str(tiny_ckpt), "--device", "gpu0"]) == 2
    err = capsys.readouterr().err
    assert "unknown device" in err and "Traceback" not in err


# ---------------------------------------------------------------- Python API accepts any image layout
def test_detector_accepts_gray_rgba_16bit_float_arrays_and_paths(tmp_path: Path, tiny_ckpt: Path) -> None:
    det = Detector.load(tiny_ckpt, device="cpu", threshold=0.3)
    rgb = _rgb(64, 64)
    ref = det.detect(rgb, 0.5)
    assert len(ref) > 0
    variants = {
        "rgba": np.dstack([rgb, np.full((64, 64), 255, np.uint8)]),
        "16-bit": rgb.astype(np.uint16) * 257,
        "float": rgb.astype(np.float32) / 255.0,
    }
    for what, arr in variants.items():
        got = det.detect(arr, 0.5)
        np.testing.assert_allclose(got.xy, ref.xy, err_msg=what)
    gray = rgb[..., 0]
    np.testing.assert_allclose(det.detect(gray, 0.5).xy, det.detect(np.dstack([gray] * 3), 0.5).xy)
    Image.fromarray(rgb).save(tmp_path / "tile.png")
    from_path = det.detect(str(tmp_path / "tile.png"), 0.5)
    assert from_path.name == "tile"
    np.testing.assert_allclose(from_path.xy, ref.xy)
    np.testing.assert_allclose(det.detect(tmp_path / "tile.png", 0.5).xy, ref.xy)
    with pytest.raises(InputError, match="image array .* or an image file path"):
        det.detect({"not": "an image"}, 0.5)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="no such image file"):
        det.detect(str(tmp_path / "missing.png"), 0.5)


def test_denuc_call_accepts_rgba_gray_16bit_float(tmp_path: Path) -> None:
    from denuc.classify.head import HeadMeta, PointHead
    from denuc.encode import build_encoder
    from denuc.encode.tiny import register_tiny
    from denuc.pipeline import DeNuC

    register_tiny()

    class Grid:
        def detect(self, image: np.ndarray, mpp: float) -> Nuclei:
            assert image.dtype == np.uint8 and image.shape[2] == 3
            xy = np.array([[10.0, 10.0], [30.0, 20.0]])
            return Nuclei(xy, scores=np.full(2, 0.9), class_names=("nucleus",), mpp=mpp)

    enc = build_encoder("tiny-uni", weights="random")
    torch.manual_seed(0)
    head = PointHead(enc.dim, 2)
    meta = HeadMeta(classes=["a", "b"], colors=[[255, 0, 0], [0, 0, 255]], encoder=enc.name,
                    weights_hash=enc.weights_hash, dim=enc.dim, mpp=0.5, window=64, stride=48, align="center",
                    input_size=enc.input_size)
    model = DeNuC(Grid(), enc, head, meta)
    rgb = _rgb(48, 48)
    ref = model(rgb, 0.5)
    for arr in (np.dstack([rgb, np.full((48, 48), 255, np.uint8)]), rgb.astype(np.uint16) * 257,
                rgb.astype(np.float64) / 255.0):
        got = model(arr, 0.5)
        assert got.probs is not None and ref.probs is not None
        np.testing.assert_allclose(got.probs, ref.probs, atol=1e-5)
    assert len(model(rgb[..., 1], 0.5)) == 2
    with pytest.raises(InputError, match="image array"):
        model(["a", "b"], 0.5)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="unknown device"):
        DeNuC.load(detector=Grid(), encoder=enc, head=tmp_path / "h.safetensors", device="gpu0")
