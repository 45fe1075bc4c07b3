"""Reading user images defensively and writing the resized training cache."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageRejected", "escapes", "decode_rgb", "load_rgb", "resize_shorter_side",
           "cache_image"]

# A decompression bomb is a rejected file like any other, not a crash of the whole stage.
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000


class ImageRejected(Exception):
    """An unusable input image; the message is the reason written to the rejected list."""


def _to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and float grey images ('I;16', 'I', 'F') scaled to 8-bit 'L' by their value range."""
    arr = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16"):
        lo, hi = 0.0, 65535.0
    else:
        lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(scaled + 0.5, 0, 255).astype(np.uint8), mode="L")


def _flatten_alpha(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = im.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def escapes(path: Path, root: Path) -> bool:
    """Whether ``path`` names a file outside ``root``, judged on the name alone: an absolute name
    or a ``..`` component. Symbolic links are not resolved: a folder inside the root that links
    to another disk (``Hands -> /big/disk/Hands``) is the user's own choice and stays inside."""
    try:
        rel = path.relative_to(root)
    except ValueError:
        return True
    return ".." in rel.parts


def load_rgb(path: Path, root: Path | None = None,
             background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image with its EXIF orientation applied.

    Raises :class:`ImageRejected` for a path outside ``root`` (see :func:`escapes`), a missing or
    zero-byte file, a file that is not an image or is truncated. CMYK, 16-bit, palette and
    transparent images are converted (transparency over ``background``).
    """
    if root is not None and escapes(path, root):
        raise ImageRejected("path escapes the data root")
    if not path.is_file():
        raise ImageRejected("missing file")
    if path.stat().st_size == 0:
        raise ImageRejected("zero-byte file")
    return decode_rgb(path, background)


def decode_rgb(source: Path | BinaryIO,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Decode ``source`` (a path or an open binary file, such as an upload) the way
    :func:`load_rgb` does, without its checks of the path."""
    try:
        with Image.open(source) as im:
            im.load()  # decode now: a truncated file fails here, not later in training
            im = ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as exc:
        reason = "not an image" if isinstance(exc, UnidentifiedImageError) else "unreadable image"
        # Pillow names an in-memory file by its repr (<_io.BytesIO object at 0x...>): say
        # nothing of it, the caller names the upload.
        detail = str(exc) if isinstance(source, Path) else str(exc).replace(repr(source), "")
        raise ImageRejected(f"{reason}: {' '.join(detail.split())}") from None
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        im = _to_8bit(im)
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _flatten_alpha(im, background)
    return im.convert("RGB")


def resize_shorter_side(im: Image.Image, size: int) -> Image.Image:
    """Downscale so the shorter side is ``size`` (never upscales), keeping the aspect ratio."""
    w, h = im.size
    short = min(w, h)
    if short <= size:
        return im
    scale = size / short
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(new, Image.Resampling.BICUBIC, reducing_gap=3.0)


def cache_image(src: Path, dst: Path, size: int, root: Path | None = None) -> tuple[int, int]:
    """Load ``src`` safely, resize it once for the cache and write it to ``dst`` (PNG or JPEG by
    suffix). Returns the cached size."""
    im = resize_shorter_side(load_rgb(src, root), size)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix.lower() in (".jpg", ".jpeg"):
        im.save(dst, quality=95, subsampling=0)
    else:
        im.save(dst, optimize=False)
    return im.size
