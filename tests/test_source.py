"""denuc.source: slides (OpenSlide, tiffslide), plain images and arrays read as pyramids of RGB
levels with a level-0 mpp; level coordinates, white fill past the edge, thumbnails, mpp from
metadata or --mpp, refusals in one line naming the file."""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from denuc.data.image import read_image
from denuc.errors import InputError, ResolutionError
from denuc.source import (
    SLIDE_SUFFIXES,
    SOURCE_BACKENDS,
    ArraySource,
    ImageSource,
    SlideSource,
    is_slide_path,
    open_source,
)
from denuc.source.base import composite_on_white
from denuc.source.testslide import write_pyramidal_tiff, write_pyramidal_tiff_tiles

W, H = 768, 512  # divisible by every downsample, so level pixels are exact block means
DS = (1, 4, 16)


def _noise(h: int = H, w: int = W, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _smooth(h: int = H, w: int = W) -> np.ndarray:
    """A smooth H&E-like picture (JPEG keeps it within a few grey levels)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 200 + 40 * np.sin(xx / 37.0)
    g = 120 + 60 * np.cos(yy / 29.0)
    b = 170 + 50 * np.sin((xx + yy) / 53.0)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def _level(img: np.ndarray, d: int) -> np.ndarray:
    """Expected level with downsample ``d``: rounded means of d x d blocks."""
    h, w = img.shape[0] // d, img.shape[1] // d
    s = img[:h * d, :w * d].reshape(h, d, w, d, 3).astype(np.uint32).sum(axis=(1, 3))
    return ((s + d * d // 2) // (d * d)).astype(np.uint8)


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    return _noise()


@pytest.fixture(scope="module")
def lossless(tmp_path_factory: pytest.TempPathFactory, noise: np.ndarray) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("slides")
    return {fl: write_pyramidal_tiff(d / f"{fl}.tif", noise, 0.25, tile=128, downsamples=DS, compression="none",
                                     flavor=fl) for fl in ("aperio", "generic", "ome")}


# ------------------------------------------------------------------ pyramidal TIFFs, lossless
@pytest.mark.parametrize(("flavor", "backend", "mpp_source"), [
    ("aperio", "openslide", "openslide.mpp-x/mpp-y"),
    ("generic", "openslide", "TIFF XResolution/YResolution (centimeter)"),
    ("ome", "tiffslide", "OME PhysicalSizeX/Y"),
])
def test_pyramid_levels_pixels_and_mpp(lossless: dict[str, Path], noise: np.ndarray, flavor: str, backend: str,
                                       mpp_source: str) -> None:
    with open_source(lossless[flavor]) as s:
        assert isinstance(s, SlideSource)
        assert s.backend == backend and s.name == flavor and s.path == lossless[flavor]
        assert s.level_dimensions == ((W, H), (W // 4, H // 4), (W // 16, H // 16))
        assert s.level_downsamples == (1.0, 4.0, 16.0) and s.level_count == 3 and s.dimensions == (W, H)
        assert s.mpp == pytest.approx(0.25) and s.mpp_source == mpp_source
        assert s.level_mpp(2) == pytest.approx(4.0)
        np.testing.assert_array_equal(s.read(130, 70, 300, 200), noise[70:270, 130:430])
        # level coordinates are that level's pixels, not level 0's
        l1 = _level(noise, 4)
        np.testing.assert_array_equal(s.read(37, 21, 90, 60, level=1), l1[21:81, 37:127])
        np.testing.assert_array_equal(s.read(0, 0, W // 16, H // 16, level=2), _level(noise, 16))
        # a region crossing the right/bottom edge and one starting left/above the image: white outside
        e = s.read(W - 50, H - 30, 80, 70)
        np.testing.assert_array_equal(e[:30, :50], noise[H - 30:, W - 50:])
        assert (e[30:] == 255).all() and (e[:, 50:] == 255).all()
        e1 = s.read(-5, -3, 20, 10, level=1)
        np.testing.assert_array_equal(e1[3:, 5:], l1[:7, :15])
        assert (e1[:3] == 255).all() and (e1[:, :5] == 255).all()
        assert (s.read(W, 0, 10, 10) == 255).all() and s.read(0, 0, 0, 5).shape == (5, 0, 3)


def test_both_readers_give_the_same_pixels(lossless: dict[str, Path], noise: np.ndarray) -> None:
    for fl in ("aperio", "generic"):
        for b in SOURCE_BACKENDS:
            with open_source(lossless[fl], backend=b) as s:
                assert s.backend == b and s.mpp == pytest.approx(0.25)
                np.testing.assert_array_equal(s.read(200, 100, 64, 64, level=0), noise[100:164, 200:264])
                np.testing.assert_array_equal(s.read(10, 5, 30, 20, level=1), _level(noise, 4)[5:25, 10:40])


def test_svs_like_jpeg_through_both_readers(tmp_path: Path) -> None:
    img = _smooth()
    p = write_pyramidal_tiff(tmp_path / "tiny.svs", img, 0.2527, tile=128, downsamples=DS, quality=90)
    reads = {}
    for b in SOURCE_BACKENDS:
        with open_source(p, backend=b) as s:
            assert s.backend == b and s.mpp == pytest.approx(0.2527)
            assert s.level_dimensions == ((W, H), (W // 4, H // 4), (W // 16, H // 16))
            reads[b] = (s.read(100, 50, 256, 200).astype(np.int16), s.read(10, 10, 100, 80, 1).astype(np.int16))
    a, b = reads["openslide"], reads["tiffslide"]
    for k in range(2):
        assert np.abs(a[k] - b[k]).max() <= 3  # two JPEG decoders
    assert np.abs(a[0] - img[50:250, 100:356]).mean() < 3.0  # JPEG q90 of a smooth image
    assert np.abs(a[1] - _level(img, 4)[10:90, 10:110]).mean() < 3.0


def test_best_level_rule(lossless: dict[str, Path]) -> None:
    with open_source(lossless["aperio"]) as s:  # level mpp 0.25, 1.0, 4.0
        assert s.best_level(0.1) == 0  # finer than level 0
        assert s.best_level(0.25) == 0 and s.best_level(0.5) == 0 and s.best_level(0.999) == 0
        assert s.best_level(1.0) == 1 and s.best_level(0.9995) == 1  # within 0.1 %
        assert s.best_level(3.9) == 1 and s.best_level(4.0) == 2 and s.best_level(50) == 2


def test_thumbnail_size_downsample_and_pixels(lossless: dict[str, Path], noise: np.ndarray) -> None:
    with open_source(lossless["aperio"]) as s:
        t, ds = s.thumbnail(100)
        assert ds == pytest.approx(7.68) and t.shape == (66, 100, 3) and t.dtype == np.uint8
        # area average of level 1 (the coarsest level at least as fine as the thumbnail)
        want = np.asarray(Image.fromarray(_level(noise, 4)).resize((100, 66), Image.Resampling.BOX,
                                                                    box=(0, 0, 100 * 1.92, 66 * 1.92)))
        assert np.abs(t.astype(int) - want).max() <= 1
        t_full, ds_full = s.thumbnail(4096)  # never upsampled
        assert ds_full == 1.0
        np.testing.assert_array_equal(t_full, noise)


def test_thumbnail_reads_a_coarse_level_in_bands(lossless: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import denuc.source.base as base

    with open_source(lossless["generic"]) as s:
        calls: list[tuple[int, int, int]] = []
        orig = s._read_region

        def spy(x: int, y: int, w: int, h: int, level: int) -> np.ndarray:
            calls.append((level, w, h))
            return orig(x, y, w, h, level)

        monkeypatch.setattr(s, "_read_region", spy)
        t, ds = s.thumbnail(40)  # ds 19.2: level 2 (ds 16)
        assert t.shape == (26, 40, 3) and {c[0] for c in calls} == {2}
        calls.clear()
        monkeypatch.setattr(base, "_THUMB_CHUNK_PX", 4000)
        t2, _ = s.thumbnail(150)  # ds 5.12: level 1, read in bands of at most ~4000 px
        assert {c[0] for c in calls} == {1} and len(calls) > 3 and max(w * h for _, w, h in calls) <= 4000 + 2 * (W // 4)
        assert t2.shape == (100, 150, 3)


# ------------------------------------------------------------------ mpp
@pytest.mark.parametrize("flavor", ["aperio", "generic", "ome"])
def test_no_mpp_is_refused_and_mpp_override(tmp_path: Path, flavor: str) -> None:
    p = write_pyramidal_tiff(tmp_path / f"nompp_{flavor}.tif", _noise(64, 96), None, tile=32, downsamples=(1, 2),
                             compression="none", flavor=flavor)
    with pytest.raises(ResolutionError, match=rf"nompp_{flavor}\.tif: no µm per pixel in the file's metadata.*--mpp"):
        open_source(p)
    with open_source(p, mpp=0.5) as s:
        assert s.mpp == 0.5 and s.mpp_source == "--mpp"
    with pytest.raises(ResolutionError, match="outside the plausible range"):
        open_source(p, mpp=40)  # a magnification, not µm/px


def test_mpp_override_wins_over_metadata(lossless: dict[str, Path]) -> None:
    with open_source(lossless["aperio"], mpp=0.26) as s:
        assert s.mpp == 0.26 and s.mpp_source == "--mpp"


def _tiled_two_level(path: Path, resolution: tuple[float, float], unit: str) -> Path:
    img = _noise(64, 64)
    with tifffile.TiffWriter(path) as tw:
        tw.write(img, tile=(32, 32), photometric="rgb", metadata=None, resolution=resolution, resolutionunit=unit)
        tw.write(img[::2, ::2], tile=(32, 32), photometric="rgb", metadata=None, subfiletype=1)
    return path


def test_anisotropic_pixels_are_refused(tmp_path: Path) -> None:
    p = _tiled_two_level(tmp_path / "aniso.tif", (1e4 / 0.25, 1e4 / 0.3), "CENTIMETER")
    with pytest.raises(ResolutionError, match=r"aniso\.tif: pixels are not square: 0\.25 µm/px in x but 0\.3 µm/px"):
        open_source(p)
    with open_source(p, mpp=0.25) as s:  # the override is the user's call
        assert s.mpp == 0.25


def test_implausible_or_unitless_resolution_tags_are_not_trusted(tmp_path: Path) -> None:
    p = _tiled_two_level(tmp_path / "dpi.tif", (72.0, 72.0), "INCH")
    with pytest.raises(ResolutionError, match=r"dpi\.tif: no µm per pixel .*not a microscope resolution"):
        open_source(p)
    p2 = _tiled_two_level(tmp_path / "nounit.tif", (4.0, 4.0), "NONE")
    with pytest.raises(ResolutionError, match="no unit"):
        open_source(p2)
    p3 = _tiled_two_level(tmp_path / "inch.tif", (25400 / 0.5, 25400 / 0.5), "INCH")
    with open_source(p3) as s:
        assert s.mpp == pytest.approx(0.5) and s.mpp_source == "TIFF XResolution/YResolution (inch)"


# ------------------------------------------------------------------ damaged and missing files
@pytest.mark.parametrize("flavor", ["aperio", "generic", "ome"])
def test_truncated_slide_is_one_input_error(tmp_path: Path, flavor: str) -> None:
    p = write_pyramidal_tiff(tmp_path / "full.tif", _smooth(256, 384), 0.25, tile=64, downsamples=(1, 4),
                             flavor=flavor)
    data = p.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.tif: ") as e:
        open_source(cut)
    assert "\n" not in str(e.value)


def test_missing_empty_and_unknown(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope\.svs: no such file"):
        open_source(tmp_path / "nope.svs")
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(InputError, match=r"empty\.svs: slide file is empty"):
        open_source(tmp_path / "empty.svs")
    (tmp_path / "junk.svs").write_bytes(b"this is not a slide at all\n" * 10)
    with pytest.raises(InputError, match=r"junk\.svs: cannot open slide"):
        open_source(tmp_path / "junk.svs")
    with pytest.raises(InputError, match="is a folder"):
        open_source(tmp_path)
    with pytest.raises(InputError, match="unknown slide reader 'bioformats'"):
        open_source(tmp_path / "empty.svs", backend="bioformats")


# ------------------------------------------------------------------ plain images and arrays
def test_png_is_one_level_with_mpp_from_argument(tmp_path: Path) -> None:
    img = _noise(40, 60)
    Image.fromarray(img).save(tmp_path / "tile.png")
    assert not is_slide_path(tmp_path / "tile.png")
    with pytest.raises(ResolutionError, match=r"tile\.png: no µm per pixel in the file's metadata; pass --mpp"):
        open_source(tmp_path / "tile.png")
    with open_source(tmp_path / "tile.png", mpp=0.5) as s:
        assert isinstance(s, ImageSource) and s.backend == "image" and s.level_count == 1
        assert s.level_downsamples == (1.0,) and s.dimensions == (60, 40) and s.mpp_source == "--mpp"
        np.testing.assert_array_equal(s.read(0, 0, 60, 40), read_image(tmp_path / "tile.png"))
        assert s.best_level(2.0) == 0
        t, ds = s.thumbnail(30)
        assert ds == 2.0 and t.shape == (20, 30, 3)


def test_plain_tiff_mpp_from_resolution_tags(tmp_path: Path) -> None:
    img = _noise(32, 48)
    tifffile.imwrite(tmp_path / "a.tif", img, photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    with open_source(tmp_path / "a.tif") as s:
        assert s.backend == "image" and s.mpp == pytest.approx(0.5)
        assert s.mpp_source == "TIFF XResolution/YResolution (centimeter)"
        np.testing.assert_array_equal(s.read(0, 0, 48, 32), img)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(InputError, match=r"bad\.png: not a readable image"):
        open_source(tmp_path / "bad.png", mpp=0.5)


def test_array_source() -> None:
    img = _noise(30, 50)
    with pytest.raises(ResolutionError, match=r"myarr: an array carries no µm per pixel; pass mpp="):
        open_source(img, name="myarr")
    s = open_source(img, mpp=0.5, name="myarr")
    assert isinstance(s, ArraySource) and s.backend == "array" and s.path is None and s.mpp_source == "argument"
    out = s.read(40, 20, 20, 20)
    np.testing.assert_array_equal(out[:10, :10], img[20:, 40:])
    assert (out[10:] == 255).all()
    out[:] = 0  # a copy: the source is unchanged
    np.testing.assert_array_equal(s.read(0, 0, 50, 30), img)
    with pytest.warns(UserWarning, match="gray: grayscale image: replicated to RGB"):
        g = open_source(img[..., 0], mpp=0.5, name="gray")
    assert g.read(0, 0, 2, 2).shape == (2, 2, 3)
    with pytest.raises(ValueError, match="level 1 does not exist"):
        s.read(0, 0, 1, 1, level=1)
    assert s.describe()["level_dimensions"] == [[50, 30]]


def test_composite_on_white() -> None:
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, :3] = 100
    rgba[0, :, 3] = [255, 0, 128]
    out = composite_on_white(rgba)
    assert out[0, 0].tolist() == [100] * 3 and out[0, 1].tolist() == [255] * 3
    assert out[0, 2].tolist() == [round((100 * 128 + 255 * 127) / 255)] * 3
    assert composite_on_white(np.full((2, 2), 7, np.uint8)).shape == (2, 2, 3)


# ------------------------------------------------------------------ slide detection and registry
def test_is_slide_path(tmp_path: Path, lossless: dict[str, Path]) -> None:
    assert set(SLIDE_SUFFIXES) >= {".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".dcm", ".scn"}
    assert all(is_slide_path(p) for p in lossless.values())
    (tmp_path / "x.svs").write_bytes(b"")
    assert is_slide_path(tmp_path / "x.svs")  # by name
    tifffile.imwrite(tmp_path / "plain.tif", _noise(32, 32), photometric="rgb")
    tifffile.imwrite(tmp_path / "tiled1.tif", _noise(64, 64), photometric="rgb", tile=(32, 32))
    assert not is_slide_path(tmp_path / "plain.tif") and not is_slide_path(tmp_path / "tiled1.tif")
    (tmp_path / "a.ome.tif").write_bytes(b"")
    assert is_slide_path(tmp_path / "a.ome.tif")
    dcm = tmp_path / "dicom"
    dcm.mkdir()
    assert not is_slide_path(dcm)
    (dcm / "level0.dcm").write_bytes(b"")
    assert is_slide_path(dcm)
    with open_source(tmp_path / "tiled1.tif", mpp=0.5) as s:
        assert s.backend == "image"


def test_registry_order_and_forcing(lossless: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    assert list(SOURCE_BACKENDS) == ["openslide", "tiffslide"]
    monkeypatch.delitem(SOURCE_BACKENDS, "openslide")
    with open_source(lossless["aperio"]) as s:
        assert s.backend == "tiffslide" and s.mpp_source == "tiffslide.mpp-x/mpp-y"


# ------------------------------------------------------------------ threads
@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_concurrent_reads_match_serial_reads(lossless: dict[str, Path], noise: np.ndarray, backend: str) -> None:
    rng = np.random.default_rng(1)
    boxes = [(int(rng.integers(-20, W)), int(rng.integers(-20, H)), int(rng.integers(1, 90)),
              int(rng.integers(1, 90)), int(rng.integers(0, 2))) for _ in range(60)]
    with open_source(lossless["generic"], backend=backend) as s:
        serial = [s.read(*b) for b in boxes]
        threads: set[int] = set()

        def job(b: tuple[int, int, int, int, int]) -> np.ndarray:
            threads.add(threading.get_ident())
            return s.read(*b)

        with ThreadPoolExecutor(4) as pool:
            parallel = list(pool.map(job, boxes))
        for a, b in zip(serial, parallel):
            np.testing.assert_array_equal(a, b)
        if backend == "tiffslide":
            assert 1 < len(s._handles) <= 1 + len(threads)  # type: ignore[attr-defined]
    if backend == "tiffslide":
        assert s._handles == []  # type: ignore[attr-defined]


# ------------------------------------------------------------------ streaming writer
def test_streamed_writer_matches_in_memory_writer(tmp_path: Path, noise: np.ndarray) -> None:
    glass = np.array([[[243, 243, 241]]], np.uint8)
    img = noise.copy()
    img[:, 256:] = glass  # the right part is glass: tile_fn says so with one pixel
    requests: list[tuple[int, int]] = []

    def tile_fn(x: int, y: int, w: int, h: int) -> np.ndarray:
        requests.append((w, h))
        return glass if x >= 256 else img[y:y + h, x:x + w]

    a = write_pyramidal_tiff_tiles(tmp_path / "s.tif", (W, H), tile_fn, 0.25, tile=128, downsamples=DS,
                                   compression="none", flavor="generic")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_source(a) as s:
            np.testing.assert_array_equal(s.read(0, 0, W, H), img)
            np.testing.assert_array_equal(s.read(0, 0, W // 4, H // 4, 1), _level(img, 4))
            np.testing.assert_array_equal(s.read(0, 0, W // 16, H // 16, 2), _level(img, 16))
    assert max(w * h for w, h in requests) <= 2048 * 2048
    with pytest.raises(ValueError, match="tile_fn"):
        write_pyramidal_tiff_tiles(tmp_path / "bad.tif", (64, 64), lambda x, y, w, h: np.zeros((2, 2, 3), np.uint8),
                                   0.25, tile=32, downsamples=(1, 2))
    with pytest.raises(ValueError, match="downsamples"):
        write_pyramidal_tiff(tmp_path / "bad.tif", noise, 0.25, downsamples=(2, 4))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_slide_sources_pickle_and_survive_fork(lossless: dict[str, Path], noise: np.ndarray, backend: str) -> None:
    import multiprocessing as mp
    import pickle

    with open_source(lossless["generic"], backend=backend) as s:
        with pickle.loads(pickle.dumps(s)) as s2:
            assert type(s2) is type(s) and s2.describe() == s.describe()
            np.testing.assert_array_equal(s2.read(10, 20, 30, 40), noise[20:60, 10:40])
        s.read(0, 0, 8, 8)  # the parent's handle is in use before the fork
        ctx = mp.get_context("fork")
        q = ctx.Queue()

        def child() -> None:  # runs in the forked process, on the inherited source object
            q.put((s.read(100, 50, 64, 32), s._pid))  # type: ignore[attr-defined]

        proc = ctx.Process(target=child)
        proc.start()
        got, child_pid = q.get(timeout=60)
        proc.join(timeout=60)
        assert child_pid == proc.pid  # the child opened its own handle
        np.testing.assert_array_equal(got, noise[50:82, 100:164])
        np.testing.assert_array_equal(s.read(100, 50, 64, 32), noise[50:82, 100:164])


def test_large_stripped_tiff_is_read_as_a_slide(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import denuc.data.image as image_mod

    img = _noise(64, 96)
    tifffile.imwrite(tmp_path / "big.tif", img, photometric="rgb", rowsperstrip=8,
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    assert not is_slide_path(tmp_path / "big.tif")
    monkeypatch.setattr(image_mod, "MAX_IMAGE_PIXELS", 1000)  # now too big for read_image
    assert is_slide_path(tmp_path / "big.tif")
    with open_source(tmp_path / "big.tif") as s:
        assert s.backend == "tiffslide" and s.mpp == pytest.approx(0.5)  # OpenSlide wants tiles
        np.testing.assert_array_equal(s.read(5, 7, 50, 40), img[7:47, 5:55])


def test_level0_location_lands_on_the_level_pixel() -> None:
    from denuc.source.slide import _level0_for

    rng = np.random.default_rng(0)
    for ds in [1.0, 4.0, 4.007999999999999, 16.161290322580644, *rng.uniform(1, 64, 20)]:
        for v in [0, 1, 2, 7, 123, 999, *rng.integers(0, 10**6, 20)]:
            u = _level0_for(int(v), float(ds))
            assert int(u / ds) == v and (u == 0 or int((u - 1) / ds) < v)
