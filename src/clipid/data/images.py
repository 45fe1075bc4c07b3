"""Reading user images defensively and writing the resized training cache.

Every decode of an image from outside (prepare's sources, a ``clipid search --image`` file, an
upload to ``clipid serve``, the MLflow Model's ``image`` column) goes through :func:`decode_rgb`
with its caller's own pixel limit, checked from the header before anything is decoded. Pillow's
global ``Image.MAX_IMAGE_PIXELS`` is never changed here: it is process-wide, and a limit one
module sets would be every other module's.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ImageRejected", "ImageTooLarge", "PREPARE_MAX_PIXELS", "REDUCING_GAP", "decode_rgb",
           "load_rgb", "open_checked", "resize_shorter_side", "cache_image", "shrink_factor",
           "return_large_images_to_the_os"]

# prepare's own limit: larger than any photo or scan a data set holds, and below twice Pillow's
# default MAX_IMAGE_PIXELS (179 MP), where Pillow itself refuses to open a file.
PREPARE_MAX_PIXELS = 150_000_000
# An image is pre-reduced (box filter) only to a size that keeps at least this many times the
# pixels per side the model's resize produces: Pillow's own "reducing_gap", for which the
# two-step result is all but indistinguishable from a resize of the full image.
REDUCING_GAP = 3
# Pillow's image blocks, over glibc's largest dynamic mmap threshold (32 MB): see below.
LARGE_BLOCK_BYTES = 64 * 2**20


def return_large_images_to_the_os() -> None:
    """Make every block of a large decoded image a memory mapping of its own, unmapped when the
    image is freed. With Pillow's default 16 MB blocks, glibc serves them from the heap of the
    decoding thread's arena and keeps them there after use: a server decoding in many threads
    grows by a large image per thread. Call it where a long-running process starts (``clipid
    serve``, the MLflow Model), not at import."""
    Image.core.set_block_size(LARGE_BLOCK_BYTES)


class ImageRejected(Exception):
    """An unusable input image; the message is the reason written to the rejected list."""


class ImageTooLarge(ImageRejected):
    """An image whose header promises more pixels than its reader allows."""


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


def load_rgb(path: Path, root: Path | None = None,
             background: tuple[int, int, int] = (255, 255, 255), *,
             max_pixels: int = PREPARE_MAX_PIXELS,
             need: int | Sequence[int] | None = None) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image with its EXIF orientation applied.

    Raises :class:`ImageRejected` for a path outside ``root``, a missing or zero-byte file, a file
    that is not an image, is truncated or has more than ``max_pixels`` pixels. CMYK, 16-bit,
    palette and transparent images are converted (transparency over ``background``); ``need``
    as in :func:`decode_rgb`.
    """
    if root is not None:
        try:
            path.resolve().relative_to(root.resolve())
        except ValueError:
            raise ImageRejected("path escapes the data root") from None
    if not path.is_file():
        raise ImageRejected("missing file")
    if path.stat().st_size == 0:
        raise ImageRejected("zero-byte file")
    return decode_rgb(path, background, max_pixels=max_pixels, need=need)


@contextlib.contextmanager
def _quiet_if_over_pillows(max_pixels: int) -> Iterator[None]:
    """Pillow warns of a "decompression bomb" over its global limit; under a larger limit of
    the caller's own (prepare's) that warning is wrong. Only then are warnings caught:
    ``catch_warnings`` swaps the process's filters, unsafe in a server's threads."""
    pillows = Image.MAX_IMAGE_PIXELS
    if pillows is None or max_pixels <= pillows:
        yield
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def open_checked(source: Path | BinaryIO, max_pixels: int) -> Image.Image:
    """``source`` opened lazily (the header read, no pixel decoded), or :class:`ImageTooLarge`
    when the header promises more than ``max_pixels`` pixels."""
    try:
        with _quiet_if_over_pillows(max_pixels):
            im = Image.open(source)
    except Image.DecompressionBombError:  # over twice Pillow's global limit: over ours too
        raise ImageTooLarge(f"the image has more than {max_pixels:,} pixels") from None
    if im.width * im.height > max_pixels:
        im.close()
        raise ImageTooLarge(f"the image has {im.width} x {im.height} pixels, more than "
                            f"{max_pixels:,}")
    return im


def shrink_factor(size: tuple[int, int], need: int | Sequence[int] | None) -> int:
    """The whole factor an image of ``size`` may be reduced by before a model resizes it to
    ``need`` (height, width) pixels: 1 unless each side stays ``REDUCING_GAP`` times the
    largest side the model takes (so a model's ordinary inputs are never touched)."""
    if not need:
        return 1
    largest = need if isinstance(need, int) else max(need)
    return max(1, min(size) // (REDUCING_GAP * largest))


def _shrink(im: Image.Image, size: tuple[int, int],
            extent: tuple[float, float, float, float]) -> Image.Image:
    """The ``extent`` of ``im`` (the whole picture: a JPEG draft pads its last block) averaged
    down to ``size`` in the file's own mode, before any conversion. Edge to edge, not a
    whole-factor ``reduce`` whose partial last box would shift the picture by a fraction of a
    pixel."""
    exif = im.getexif()
    if im.mode in ("1", "P"):  # resampling them would take the nearest pixel
        im = im.convert("L" if im.mode == "1" else "RGBA" if "transparency" in im.info else "RGB")
    small = im.resize(size, Image.Resampling.BOX, box=extent)
    small.info["exif"] = exif.tobytes()  # the orientation, applied next
    return small


def _decode(source: Path | BinaryIO, max_pixels: int, need: int | Sequence[int] | None
            ) -> Image.Image:
    """Decode as few pixels as ``need`` allows: JPEG's DCT scaling (``draft``), then a box
    filter in the file's own mode, then the EXIF orientation."""
    with open_checked(source, max_pixels) as im:
        factor = shrink_factor(im.size, need)
        if factor < 2:
            im.load()  # decode now: a truncated file fails here, not later in training
            return ImageOps.exif_transpose(im)
        size = (round(im.width / factor), round(im.height / factor))
        drafted = im.draft(im.mode, size)  # None but for JPEG: decoded at 1/2, 1/4 or 1/8
        im.load()
        extent = drafted[1] if drafted else (0, 0, im.width, im.height)
        return ImageOps.exif_transpose(_shrink(im, size, extent))


def decode_rgb(source: Path | BinaryIO, background: tuple[int, int, int] = (255, 255, 255), *,
               max_pixels: int, need: int | Sequence[int] | None = None) -> Image.Image:
    """Decode ``source`` (a path or an open binary file, such as an upload) the way
    :func:`load_rgb` does, without its checks of the path.

    ``max_pixels`` is checked from the header before decoding (:class:`ImageTooLarge`). With
    ``need``, the (height, width) a model resizes its input to, a large image is decoded and
    reduced by a whole factor first (:func:`shrink_factor`): an image that is not several times
    larger than the model's input decodes exactly as without ``need``.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        im = _decode(source, max_pixels, need)
    except Image.DecompressionBombError:  # a frame or tile past Pillow's own limit
        raise ImageTooLarge(f"the image has more than {max_pixels:,} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        reason = "not an image" if isinstance(exc, UnidentifiedImageError) else "unreadable image"
        raise ImageRejected(f"{reason}: {exc}") from None
    return _to_rgb(im, background)


def _to_rgb(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
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
    im = resize_shorter_side(load_rgb(src, root, max_pixels=PREPARE_MAX_PIXELS), size)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.suffix.lower() in (".jpg", ".jpeg"):
        im.save(dst, quality=95, subsampling=0)
    else:
        im.save(dst, optimize=False)
    return im.size
