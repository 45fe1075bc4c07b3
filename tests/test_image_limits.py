"""Each reader's own pixel limit, checked from the header before decoding; decoding no larger
than the model needs; Pillow's global limit left alone by every clipid module."""

from __future__ import annotations

import io
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipid.config import params_from_dict
from clipid.data.images import (
    PREPARE_MAX_PIXELS,
    ImageTooLarge,
    decode_rgb,
    load_rgb,
    open_checked,
    shrink_factor,
)
from clipid.stages.prepare import prepare
from clipid.workspace import Workspace

from conftest import png_header


def photo(width: int, height: int) -> Image.Image:
    """Smooth colour gradients under hard-edged discs: what resampling differences show on."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([128 + 100 * np.sin(x / width * 6), 128 + 100 * np.cos(y / height * 5),
                    128 + 60 * np.sin((x + y) / (width + height) * 9)], -1)
    im = Image.fromarray(rgb.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(40):
        cx, cy, r = rng.integers(0, width), rng.integers(0, height), rng.integers(20, width // 8)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r],
                     fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return im


def encoded(im: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    im.save(out, format=fmt, **options)
    return out.getvalue()


# ---------------------------------------------------------------------------------------------
# the limit

@pytest.mark.parametrize("width, height", [(30_000, 30_000), (7_001, 1_000)])
def test_a_header_over_the_limit_is_refused_without_decoding(width, height):
    # Decoding would fail as truncated ("unreadable image"): the refusal says "pixels" instead.
    with pytest.raises(ImageTooLarge, match="more than 7,000,000"):
        decode_rgb(io.BytesIO(png_header(width, height)), max_pixels=7_000_000)


def test_an_image_at_the_limit_is_decoded():
    data = encoded(Image.new("RGB", (70, 100), (9, 99, 199)), "PNG")
    assert decode_rgb(io.BytesIO(data), max_pixels=7_000).getpixel((5, 5)) == (9, 99, 199)
    with pytest.raises(ImageTooLarge, match="70 x 100 pixels, more than 6,999"):
        decode_rgb(io.BytesIO(data), max_pixels=6_999)


@pytest.mark.parametrize("pillow_global", [None, 10**12])
def test_the_limit_holds_whatever_pillows_global_says(monkeypatch, pillow_global):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_global)
    with pytest.raises(ImageTooLarge):
        open_checked(io.BytesIO(png_header(20_000, 20_000)), max_pixels=50_000_000)


def test_prepare_keeps_its_own_larger_limit(tmp_path):
    # Over the server's default (50 MP) and Pillow's own warning (89 MP), within prepare's:
    # only the header is read, and Pillow's warning, wrong under prepare's limit, is silenced.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with open_checked(io.BytesIO(png_header(10_000, 10_000)), PREPARE_MAX_PIXELS) as im:
            assert im.size == (10_000, 10_000)
    with pytest.raises(ImageTooLarge):
        open_checked(io.BytesIO(png_header(10_000, 10_000)), 50_000_000)
    # The stage caches images far over a server's limit: serve.max_pixels is not prepare's.
    settings = {"data": {"synthetic": {"items": 4, "views": 2, "image_size": 48}, "workers": 0},
                "serve": {"max_pixels": 100}}
    summary = prepare(params_from_dict(settings), Workspace(tmp_path))
    assert summary["rejected"] == 0 and summary["train"]["images"] > 0


def test_importing_any_clipid_module_leaves_pillows_limit_alone():
    script = """
import importlib, pkgutil
from PIL import Image
before = Image.MAX_IMAGE_PIXELS
import clipid
names = [m.name for m in pkgutil.walk_packages(clipid.__path__, "clipid.")
         if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
    assert Image.MAX_IMAGE_PIXELS == before, f"{name} set it to {Image.MAX_IMAGE_PIXELS}"
print(len(names))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 30  # it walked the package


# ---------------------------------------------------------------------------------------------
# decoding as small as the model needs

def transform(size: int):
    from open_clip.transform import PreprocessCfg, image_transform_v2

    return image_transform_v2(PreprocessCfg(size=size), is_train=False)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_an_ordinary_image_decodes_exactly_as_before(fmt):
    # Under 2 x REDUCING_GAP times the model's input per side: not touched at all.
    data = encoded(photo(640, 383), fmt, quality=90)
    old = decode_rgb(io.BytesIO(data), max_pixels=10**8)
    new = decode_rgb(io.BytesIO(data), max_pixels=10**8, need=(64, 64))
    assert shrink_factor(old.size, 64) == 1
    assert new.size == old.size and np.array_equal(np.asarray(new), np.asarray(old))


@pytest.mark.parametrize("fmt, size", [("PNG", (4001, 3001)), ("JPEG", (3024, 4032)),
                                       ("PNG", (1500, 1100))])
def test_a_large_image_decodes_small_and_embeds_as_the_full_decode_does(fmt, size):
    from clipid.models.factory import create_model
    from clipid.search.query import embed_pil, input_size

    clip = create_model("clipid-vit-tiny")
    data = encoded(photo(*size), fmt, quality=95, compress_level=1)
    old = decode_rgb(io.BytesIO(data), max_pixels=10**8)
    new = decode_rgb(io.BytesIO(data), max_pixels=10**8, need=input_size(clip))
    factor = shrink_factor(size, input_size(clip))
    assert factor >= 5 and new.size == (round(size[0] / factor), round(size[1] / factor))
    # The model's resize of the two differs by a fraction of a pixel's position at hard edges
    # and a few levels on average (measured: mean <= 0.011, i.e. 3/1000 of the value range).
    diff = (clip.preprocess_val(new) - clip.preprocess_val(old)).abs()
    assert float(diff.mean()) < 0.015
    cosine = float((embed_pil(clip, new) * embed_pil(clip, old)).sum())
    assert cosine > 0.9999


@pytest.mark.parametrize("mode", ["I;16", "P", "RGBA", "CMYK", "L", "1"])
def test_every_mode_is_shrunk_before_its_conversion_to_rgb(mode):
    base = photo(1600, 1200)
    im = {"I;16": lambda: Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257),
          "P": lambda: base.quantize(64), "RGBA": lambda: base.convert("RGBA"),
          "CMYK": lambda: base.convert("CMYK"), "L": lambda: base.convert("L"),
          "1": lambda: base.convert("1")}[mode]()
    data = encoded(im, "JPEG" if mode == "CMYK" else "PNG")
    old = decode_rgb(io.BytesIO(data), max_pixels=10**8)
    new = decode_rgb(io.BytesIO(data), max_pixels=10**8, need=64)
    assert new.mode == "RGB" and new.size == (267, 200)  # 1200 // (3 * 64) = 6
    at_64 = transform(64)
    assert float((at_64(new) - at_64(old)).abs().mean()) < 0.03


def test_the_exif_orientation_survives_the_shrink(tmp_path):
    im = photo(2000, 1000)
    im.paste((0, 0, 255), (0, 0, 400, 1000))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: the blue on top
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif, quality=95)
    out = load_rgb(path, max_pixels=10**8, need=64)
    assert out.size == (round(1000 / 5), round(2000 / 5))
    top = np.asarray(out)[5, out.width // 2]
    assert top[2] > 200 and top[0] < 60


def test_search_embeds_a_file_through_the_same_limit(tmp_path):
    from clipid.errors import ClipidError
    from clipid.models.factory import create_model
    from clipid.search.query import embed_image, embed_pil

    clip = create_model("clipid-vit-tiny")
    path = tmp_path / "bomb.png"
    path.write_bytes(png_header(30_000, 30_000))
    with pytest.raises(ClipidError, match=r"--image .*bomb.png: the image has more than "
                                          r"50,000,000 pixels \(serve.max_pixels\)"):
        embed_image(clip, path, max_pixels=50_000_000)
    small = tmp_path / "photo.png"
    photo(300, 200).save(small)
    got = embed_image(clip, small, max_pixels=60_000)
    want = embed_pil(clip, decode_rgb(small, max_pixels=60_000))
    assert np.array_equal(got, want)
    with pytest.raises(ClipidError, match="300 x 200 pixels, more than 59,999"):
        embed_image(clip, small, max_pixels=59_999)
