import io

import numpy as np
import pytest
from PIL import Image

from interposer.pipeline.images import Skip, decode, image_tiles, place_tiles


def _png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def _gradient(w: int, h: int) -> Image.Image:
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    return Image.fromarray(np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                                           np.full((h, w, 1), 128, np.float32)], 2).astype(np.uint8))


def test_placement_is_a_spread_grid():
    p = place_tiles(5000, 3000, 1024, 6, 512)
    assert (p.resized_width, p.resized_height) == (5000, 3000)  # large images keep their resolution
    assert len(p.boxes) == 6 and p.indices == (0, 1, 3, 4, 6, 7)  # 6 of a 4x2 grid, both ends included
    assert p.boxes[0] == (0, 0, 1024, 1024) and p.boxes[-1] == (5000 - 1024, 3000 - 1024, 5000, 3000)
    for l, t, r, b in p.boxes:
        assert r - l == b - t == 1024 and 0 <= l and r <= 5000 and 0 <= t and b <= 3000
    boxes = set(p.boxes)
    assert len(boxes) == 6  # no duplicates
    assert place_tiles(5000, 3000, 1024, 6, 512) == p  # deterministic
    assert len(place_tiles(4000, 3000, 1024, 6, 512).boxes) == 6  # a 3x2 grid: all of it


def test_small_images_are_enlarged_and_tiny_ones_skipped():
    p = place_tiles(600, 900, 1024, 6, 512)
    assert (p.resized_width, p.resized_height) == (1024, 1536) and p.boxes == ((0, 256, 1024, 1280),)
    with pytest.raises(Skip) as e:
        place_tiles(1, 1, 1024, 6, 512)
    assert e.value.reason == "too_small"
    with pytest.raises(Skip):
        place_tiles(50000, 8, 64, 6, 16)


def test_tiles_are_crops_of_the_image():
    im = _gradient(300, 200)
    placement, tiles = image_tiles(_png(im), 64, 4, 32)
    assert tiles.shape == (4, 64, 64, 3) and tiles.dtype == np.uint8
    l, t, r, b = placement.boxes[-1]
    assert np.array_equal(tiles[-1], np.asarray(im)[t:b, l:r])


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(mode):
    im = _gradient(96, 80)
    gray = np.asarray(im.convert("L"))
    if mode == "I;16":
        im = Image.fromarray(gray.astype(np.uint16) * 257)  # 16-bit greyscale
    elif mode == "P":
        im = im.convert("P")
        im.info["transparency"] = 0
    else:
        im = im.convert(mode)
    data = _png(im, format="JPEG" if mode == "CMYK" else "PNG")
    out = decode(data)
    assert out.mode == "RGB" and out.size == (96, 80)
    if mode == "I;16":  # 16-bit is brought to 8-bit, not clipped
        assert np.array_equal(np.asarray(out)[..., 0], gray)


def test_transparency_is_composited_on_white():
    im = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    assert np.asarray(decode(_png(im)))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    im = _gradient(120, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = _png(im, format="JPEG", exif=exif, quality=95)
    out = decode(data)
    assert out.size == (80, 120)
    expected = np.asarray(Image.open(io.BytesIO(data)).transpose(Image.Transpose.ROTATE_270), np.int16)
    assert np.abs(np.asarray(out, np.int16) - expected).max() == 0


@pytest.mark.parametrize("data, reason", [
    (b"", "corrupt"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not_an_image"),
    (bytes(range(256)) * 8, "not_an_image"),
    (b"this is a text file, named .png", "not_an_image"),
])  # fmt: skip
def test_bad_bytes_are_skipped_with_a_reason(data, reason):
    with pytest.raises(Skip) as e:
        decode(data)
    assert e.value.reason == reason


def test_truncated_files_are_corrupt():
    for fmt in ("PNG", "JPEG"):
        data = _png(_gradient(200, 200), format=fmt)
        with pytest.raises(Skip) as e:
            decode(data[: len(data) // 2])
        assert e.value.reason == "corrupt", fmt


def test_decompression_bomb():
    data = _png(Image.new("L", (2000, 2000)))
    with pytest.raises(Skip) as e:
        decode(data, max_pixels=1_000_000)
    assert e.value.reason == "decompression_bomb"
    assert decode(data, max_pixels=4_000_000).size == (2000, 2000)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (64, 64), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = np.asarray(decode(buf.getvalue()))
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50
