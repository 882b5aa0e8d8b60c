"""Reading images into the one array layout DeNuC uses: ``(H, W, 3)`` uint8 RGB.

RGBA is composited on white (slide background), grayscale is replicated to three channels,
16-bit and float images are scaled to 8 bit. Unreadable, truncated or empty files raise
:class:`~denuc.errors.InputError` naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from denuc.errors import DenucError, InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def to_rgb_uint8(arr: np.ndarray, source: str = "array") -> np.ndarray:
    """Normalise any 2-D/3-D image array to ``(H, W, 3)`` uint8 RGB.

    * ``(H, W)`` grayscale -> replicated; ``(H, W, 1)`` likewise.
    * ``(H, W, 4)`` RGBA -> alpha-composited on white.
    * uint16 -> divided by 257; float in [0, 1] -> x255; bool -> 0/255.
    """
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[2] not in (1, 2, 3, 4):
        raise InputError(f"{source}: image looks channels-first {a.shape}; DeNuC wants (H, W, C)")
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 2, 3, 4):
        raise InputError(f"{source}: expected an (H, W), (H, W, 3) or (H, W, 4) image; got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise InputError(f"{source}: image is empty ({a.shape[0]}x{a.shape[1]} px)")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif a.dtype == np.uint16:
        a = (a.astype(np.uint32) // 257).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)):
            raise InputError(f"{source}: float image contains NaN or inf")
        hi = float(a.max()) if a.size else 0.0
        scale = 255.0 if hi <= 1.0 else 1.0
        a = np.clip(a * scale + 0.5, 0, 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer) and a.size and a.min() >= 0 and a.max() <= 255:
            a = a.astype(np.uint8)
        else:
            raise InputError(f"{source}: unsupported pixel type {a.dtype}")
    c = a.shape[2]
    if c == 1:
        a = np.repeat(a, 3, axis=2)
    elif c == 2:  # gray + alpha
        g, al = a[:, :, :1].astype(np.float32), a[:, :, 1:2].astype(np.float32) / 255.0
        a = np.repeat(np.clip(g * al + 255.0 * (1 - al) + 0.5, 0, 255).astype(np.uint8), 3, axis=2)
    elif c == 4:
        rgb, al = a[:, :, :3].astype(np.float32), a[:, :, 3:4].astype(np.float32) / 255.0
        a = np.clip(rgb * al + 255.0 * (1 - al) + 0.5, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB.

    PNG/JPEG/BMP go through Pillow; TIFF through tifffile when installed (16-bit and
    multi-channel safe), else Pillow. Raises :class:`InputError` naming the file when it
    is missing, truncated, corrupt or of an unsupported layout.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such image file")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: image file is empty (0 bytes)")
    arr: np.ndarray | None = None
    if p.suffix.lower() in (".tif", ".tiff"):
        try:
            import tifffile

            arr = tifffile.imread(p)
        except ImportError:
            arr = None
        except Exception as e:
            raise InputError(f"{p}: cannot read TIFF ({e})") from None
    if arr is None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(p) as im:
                im.load()  # forces decoding: truncated files fail here
                if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im).astype(np.uint16 if im.mode.startswith("I;16") else np.int64)
                    if arr.dtype == np.int64:
                        arr = np.clip(arr, 0, 65535).astype(np.uint16)
                elif im.mode in ("P", "CMYK", "YCbCr", "LAB", "HSV", "1"):
                    arr = np.asarray(im.convert("RGBA" if "transparency" in im.info else "RGB"))
                elif im.mode == "F":
                    arr = np.asarray(im)
                else:
                    arr = np.asarray(im)
        except UnidentifiedImageError:
            raise InputError(f"{p}: not a readable image (unknown or corrupt format)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise InputError(f"{p}: corrupt or truncated image ({e})") from None
    return to_rgb_uint8(arr, source=str(p))


def image_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """``(height, width)`` of an image file without decoding all pixels where possible."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        with Image.open(p) as im:
            w, h = im.size
            return h, w
    except (FileNotFoundError, UnidentifiedImageError, OSError):
        h, w = read_image(p).shape[:2]
        return h, w


def prefetch_images(paths: Sequence[str | os.PathLike[str]], ahead: int = 2
                    ) -> Iterator[tuple[Path, np.ndarray | DenucError]]:
    """``(path, image)`` for each path in order, read by ``ahead`` background threads while the
    caller works on earlier images (decoders release the GIL, so reading overlaps compute).

    A file that cannot be read yields ``(path, error)`` (a :class:`DenucError`) instead of
    stopping the iteration; other exceptions propagate. ``ahead=0`` reads in the caller's thread.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def load(p: Path) -> np.ndarray | DenucError:
        try:
            return read_image(p)
        except DenucError as e:
            return e

    files = [Path(p) for p in paths]
    if ahead <= 0:
        for p in files:
            yield p, load(p)
        return
    with ThreadPoolExecutor(max_workers=ahead, thread_name_prefix="denuc-read") as pool:
        pending: deque = deque()
        it = iter(files)
        for p in it:
            pending.append((p, pool.submit(load, p)))
            if len(pending) > ahead:
                break
        while pending:
            p, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(load, nxt)))
            yield p, fut.result()
