"""read_image: every supported layout comes back as (H, W, 3) uint8 RGB; bad files raise InputError naming them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from denuc.data.image import image_size, read_image, to_rgb_uint8
from denuc.errors import InputError


def _rgb(h: int = 6, w: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_rgb_png_exact(tmp_path: Path) -> None:
    a = _rgb()
    Image.fromarray(a).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (6, 7, 3)
    np.testing.assert_array_equal(out, a)
    assert image_size(tmp_path / "a.png") == (6, 7)


def test_jpeg_is_rgb(tmp_path: Path) -> None:
    a = _rgb(16, 16)
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8


def test_rgba_png_is_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., :3] = [10, 20, 30]
    rgba[0, :, 3] = 255  # opaque row keeps its colour
    rgba[1, :, 3] = 0  # transparent row becomes white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.shape == (2, 3, 3)
    assert (out[0] == [10, 20, 30]).all() and (out[1] == 255).all()


def test_gray_and_gray_alpha_png(tmp_path: Path) -> None:
    g = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(g, "L").save(tmp_path / "g.png")
    out = read_image(tmp_path / "g.png")
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], g)
    la = np.stack([g, np.full_like(g, 255)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png")[..., 1], g)


def test_palette_png(tmp_path: Path) -> None:
    a = _rgb(5, 5)
    Image.fromarray(a).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(tmp_path / "p.png")
    out = read_image(tmp_path / "p.png")
    expected = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))
    np.testing.assert_array_equal(out, expected)


def test_16bit_gray_png(tmp_path: Path) -> None:
    g16 = np.array([[0, 257, 65535], [1000, 30000, 65280]], dtype=np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out = read_image(tmp_path / "g16.png")
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], np.round(g16 / 65535 * 255).astype(np.uint8))


@pytest.mark.parametrize("bits", [10, 12, 14])
def test_low_bit_data_in_16bit_files_is_scaled_from_its_depth(tmp_path: Path, bits: int) -> None:
    """Bright-field data from a 10-14-bit camera in a 16-bit file keeps its brightness (not /257)."""
    full = (1 << bits) - 1
    rgb = np.array([[[full, full // 2, 0], [full, full, full]]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "c.tif", rgb, photometric="rgb")
    with pytest.warns(UserWarning, match=rf"c\.tif: 16-bit image whose values stay within {bits} bits"):
        out = read_image(tmp_path / "c.tif")
    np.testing.assert_array_equal(out[0, 0], [255, round(full // 2 * 255 / full), 0])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])


def test_tiff_8bit_16bit_rgba_and_float(tmp_path: Path) -> None:
    a = _rgb()
    tifffile.imwrite(tmp_path / "a.tif", a, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "a.tif"), a)

    a16 = a.astype(np.uint16) * 257
    tifffile.imwrite(tmp_path / "a16.tiff", a16, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "a16.tiff"), a)

    rgba = np.concatenate([a, np.full(a.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["assocalpha"])
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.tif"), a)

    f = a.astype(np.float32) / 255.0
    tifffile.imwrite(tmp_path / "f.tif", f, photometric="rgb")
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif"), a)


def test_to_rgb_uint8_rejects_odd_layouts() -> None:
    with pytest.raises(InputError, match="channels-first"):
        to_rgb_uint8(np.zeros((3, 20, 20), np.uint8), "arr")
    with pytest.raises(InputError, match="empty"):
        to_rgb_uint8(np.zeros((0, 5, 3), np.uint8), "arr")
    with pytest.raises(InputError, match="shape"):
        to_rgb_uint8(np.zeros((6, 4, 5), np.uint8), "arr")
    with pytest.raises(InputError, match="NaN"):
        to_rgb_uint8(np.full((2, 2), np.nan, np.float32), "arr")
    with pytest.raises(InputError, match="unsupported pixel type"):
        to_rgb_uint8(np.full((2, 2), -5, np.int32), "arr")


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    Image.fromarray(_rgb(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.png: corrupt or truncated"):
        read_image(tmp_path / "cut.png")


def test_zero_byte_missing_and_non_image_files(tmp_path: Path) -> None:
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(InputError, match=r"zero\.png: image file is empty"):
        read_image(tmp_path / "zero.png")
    (tmp_path / "notes.png").write_text("this is not an image\n")
    with pytest.raises(InputError, match=r"notes\.png: not a readable image"):
        read_image(tmp_path / "notes.png")
    (tmp_path / "bad.tif").write_text("not a tiff either\n")
    with pytest.raises(InputError, match=r"bad\.tif: cannot read TIFF"):
        read_image(tmp_path / "bad.tif")
    with pytest.raises(InputError, match=r"missing\.png: no such image file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="no such image file"):
        read_image(tmp_path)  # a folder is not an image file


@pytest.mark.parametrize("ahead", [0, 1, 3])
def test_prefetch_images_keeps_order_and_yields_errors_in_place(tmp_path: Path, ahead: int) -> None:
    from denuc.data.image import prefetch_images
    from denuc.errors import DenucError

    rng = np.random.default_rng(0)
    paths, want = [], []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        if i in (2, 5):
            p.write_bytes(b"\x89PNG truncated")
            want.append(None)
        else:
            arr = rng.integers(0, 256, (5 + i, 4, 3), dtype=np.uint8)
            Image.fromarray(arr).save(p)
            want.append(arr)
        paths.append(p)
    paths.append(tmp_path / "missing.png")
    want.append(None)
    got = list(prefetch_images(paths, ahead=ahead))
    assert [p for p, _ in got] == paths
    for (p, img), w in zip(got, want, strict=True):
        if w is None:
            assert isinstance(img, DenucError) and p.name in str(img)
        else:
            np.testing.assert_array_equal(img, w)
    first = next(iter(prefetch_images(paths, ahead=ahead)))  # stopping early is fine
    np.testing.assert_array_equal(first[1], want[0])


# ------------------------------------------------------------------ warnings: one line naming the file
def test_grayscale_and_tiny_images_warn_naming_the_file(tmp_path: Path) -> None:
    import warnings

    Image.fromarray(np.full((20, 20), 128, np.uint8), "L").save(tmp_path / "gray.png")
    with pytest.warns(UserWarning, match=r"gray\.png: grayscale image: replicated to RGB; H&E models expect colour"):
        read_image(tmp_path / "gray.png")
    Image.fromarray(_rgb(1, 1)).save(tmp_path / "dot.png")
    with pytest.warns(UserWarning, match=r"dot\.png: image is only 1 x 1 px \(under 16 px a side\)"):
        read_image(tmp_path / "dot.png")
    with pytest.warns(UserWarning, match=r"arr: grayscale image"):
        to_rgb_uint8(np.zeros((20, 20, 2), np.uint8), "arr")
    Image.fromarray(_rgb(16, 16)).save(tmp_path / "ok.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_image(tmp_path / "ok.png")  # colour, 16 px a side: silent
        to_rgb_uint8(np.zeros((3, 3), np.uint8), "quiet", warn=False)


def test_pillow_warnings_are_renamed_or_dropped(tmp_path: Path) -> None:
    import warnings

    from denuc.data.image import _pillow_warnings

    pil_file = str(Path(Image.__file__).parent / "TiffImagePlugin.py")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with _pillow_warnings(tmp_path / "a.tif"):
            warnings.warn_explicit("Possibly corrupt EXIF data.  Expecting to read 8 bytes but only got 2.",
                                   UserWarning, pil_file, 1)
            warnings.warn_explicit("Image size (9 pixels) exceeds limit", Image.DecompressionBombWarning, pil_file, 2)
            warnings.warn_explicit("Tag data larger than file. Skipping tag 700", UserWarning, pil_file, 3)
            warnings.warn_explicit("Tag data larger than file. Skipping tag 700", UserWarning, pil_file, 3)
            warnings.warn_explicit("someone else's warning", RuntimeWarning, "/elsewhere/mod.py", 4)
    msgs = [str(x.message) for x in w]
    assert msgs == [f"{tmp_path / 'a.tif'}: Tag data larger than file. Skipping tag 700 (Pillow)",
                    "someone else's warning"]
    assert w[1].category is RuntimeWarning and w[1].filename == "/elsewhere/mod.py"


def test_decompression_bomb_warning_does_not_leak(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import warnings

    import denuc.data.image as image_mod

    monkeypatch.setattr(image_mod, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1600 px: Pillow warns (under 2 x its limit)
    Image.fromarray(_rgb(40, 40)).save(tmp_path / "big.png")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match=r"big\.png: image is 40 x 40 px"):
            read_image(tmp_path / "big.png")
    assert not [x for x in w if issubclass(x.category, Image.DecompressionBombWarning)]
