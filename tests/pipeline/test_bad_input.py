"""A corpus of what real image folders hold, made by the test, through `data build`: each file is either
used or skipped with a named reason; the build never crashes and drops nothing silently."""

import io
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageCms

from interposer.pipeline.build import BuildConfig, build


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w * h * 3).reshape(h, w, 3)
    return Image.fromarray((base + rng.integers(0, 30, (h, w, 3))).clip(0, 255).astype(np.uint8))


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    expected = {}

    def put(name: str, data: bytes, outcome: str):
        (d / name).write_bytes(data)
        expected[name] = outcome

    png, jpg = _save(_photo(96, 80, 1), "PNG"), _save(_photo(96, 80, 2), "JPEG", quality=90)
    put("truncated.png", png[: len(png) // 2], "corrupt")
    put("truncated.jpg", jpg[: len(jpg) // 2], "corrupt")
    put("empty.jpg", b"", "corrupt")
    put("random.jpg", np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not_an_image")
    put("text.png", b"just some text, named .png\n", "not_an_image")
    put("cmyk.jpg", _save(_photo(96, 80, 3).convert("CMYK"), "JPEG"), "ok")
    deep = Image.fromarray(np.asarray(_photo(96, 80, 4).convert("L"), np.uint16) * 257)
    put("deep16.png", _save(deep, "PNG"), "ok")
    pal = _photo(96, 80, 5).convert("P")
    put("palette-alpha.png", _save(pal, "PNG", transparency=0), "ok")
    put("la.png", _save(_photo(96, 80, 6).convert("LA"), "PNG"), "ok")
    put("dot.png", _save(Image.new("RGB", (1, 1)), "PNG"), "too_small")
    put("sliver.png", _save(Image.new("L", (50000, 8)), "PNG"), "too_small")
    put("bomb.png", _save(Image.new("L", (3000, 3000)), "PNG"), "decompression_bomb")  # over --max-pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    put("rotated.jpg", _save(_photo(120, 80, 7), "JPEG", exif=exif, quality=95), "ok")
    frames = [_photo(96, 80, 8), _photo(96, 80, 9)]
    put("animated.gif", _save(frames[0], "GIF", save_all=True, append_images=frames[1:]), "ok")
    put("animated.webp", _save(frames[0], "WEBP", save_all=True, append_images=frames[1:]), "ok")
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    put("icc.jpg", _save(_photo(96, 80, 10), "JPEG", icc_profile=srgb), "ok")
    put("twin-a.png", png, "ok")
    (d / "twin-b.png").write_bytes(png)  # same bytes, another name: one image
    os.symlink(d / "missing.jpg", d / "dangling.jpg")  # listed, cannot be read (stands in for no permission)
    expected["dangling.jpg"] = "unreadable"
    os.symlink(d, d / "loop")  # a symlink loop: not followed
    with open(os.path.join(os.fsencode(d), b"caf\xe9.png"), "wb") as f:  # not UTF-8
        f.write(png)
    return d, expected


def test_every_bad_input_is_used_or_skipped_with_its_reason(ray_session, corpus, vaes, tmp_path):
    folder, expected = corpus
    out = tmp_path / "data"
    manifest = build(BuildConfig(images=[str(folder)], spaces=[f"v1={vaes['v1']}"], out=str(out), tile_size=64,
                                 max_tiles=2, min_size=32, max_pixels=4_000_000, shard_size=4, quiet=True))
    images = {os.path.basename(r["uri"]): r for r in pq.read_table(out / "images").to_pylist()}
    index = {os.path.basename(r["uri"]): r for r in pq.read_table(out / "index").to_pylist()}
    for name, outcome in expected.items():
        status = images[name]["status"] if name in images else index[name]["status"]
        assert status == outcome, (name, status)
    assert index["twin-b.png"]["status"] == "duplicate" and "twin-b.png" not in images  # encoded once
    assert [r["status"] for r in index.values()].count("bad_file_name") == 1
    assert (images["rotated.jpg"]["width"], images["rotated.jpg"]["height"]) == (80, 120)  # EXIF applied
    c = manifest.counts
    assert c["skipped"] == {"bad_file_name": 1, "corrupt": 3, "decompression_bomb": 1, "not_an_image": 2,
                            "too_small": 2, "unreadable": 1}
    assert c["images_ok"] == sum(1 for v in expected.values() if v == "ok") and c["duplicates"] == 1
    assert c["tiles"] == pq.read_table(out / "latents" / "v1").num_rows > 0
