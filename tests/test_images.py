import numpy as np
import pytest
from PIL import Image

from clipid.data.images import ImageRejected, cache_image, load_rgb, resize_shorter_side


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 10, 20))  # blue strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif, quality=100)
    out = load_rgb(path)
    assert out.size == (20, 40)
    top = np.asarray(out)[2, 10]
    assert top[2] > 200 and top[0] < 60  # the blue strip is now at the top


def test_cmyk_is_converted(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)
    out = load_rgb(path)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60


def test_16bit_grey_is_scaled_not_clipped(tmp_path):
    arr = np.full((8, 8), 32768, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    out = load_rgb(path)
    assert out.mode == "RGB"
    assert 120 <= out.getpixel((0, 0))[0] <= 135  # half of the 16-bit range -> ~128, not 255


def test_palette_with_transparency_goes_over_white(tmp_path):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0] * 256)
    path = tmp_path / "pal.png"
    im.save(path, transparency=0)
    assert load_rgb(path).getpixel((1, 1)) == (255, 255, 255)


def test_rgba_is_composited(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert load_rgb(path, background=(10, 20, 30)).getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("make, reason", [
    (lambda p: None, "missing file"),
    (lambda p: p.write_bytes(b""), "zero-byte file"),
    (lambda p: p.write_text("not an image at all"), "not an image"),
])
def test_bad_files_are_rejected_with_reason(tmp_path, make, reason):
    path = tmp_path / "bad.jpg"
    make(path)
    with pytest.raises(ImageRejected, match=reason):
        load_rgb(path)


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "t.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageRejected, match="unreadable image"):
        load_rgb(path)


def test_path_outside_root_is_rejected(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    outside = tmp_path / "secret.png"
    Image.new("RGB", (4, 4)).save(outside)
    with pytest.raises(ImageRejected, match="escapes the data root"):
        load_rgb(root / ".." / "secret.png", root=root)


def test_resize_keeps_aspect_and_never_upscales():
    assert resize_shorter_side(Image.new("RGB", (200, 100)), 50).size == (100, 50)
    assert resize_shorter_side(Image.new("RGB", (30, 20)), 50).size == (30, 20)


def test_cache_image_writes_resized_rgb(tmp_path):
    src = tmp_path / "a.png"
    Image.new("RGBA", (120, 60), (1, 2, 3, 255)).save(src)
    size = cache_image(src, tmp_path / "out" / "a.png", 30)
    assert size == (60, 30)
    cached = Image.open(tmp_path / "out" / "a.png")
    assert cached.mode == "RGB" and cached.size == (60, 30)
