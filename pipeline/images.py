"""Image bytes -> RGB tiles: decoding every mode to RGB, EXIF orientation, skip reasons, tile placement.

Pure functions (Pillow + numpy, no Ray): the same bytes always give the same tiles, which is what lets
`add-space` re-derive a dataset's tiles from their sources.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

from .options import DEFAULT_MAX_PIXELS

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is skipped, never half-grey


class Skip(Exception):
    """An image that is not used; `reason` is one of schema.SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Placement:
    width: int  # oriented image size
    height: int
    resized_width: int  # size the tiles are cut from
    resized_height: int
    boxes: tuple[tuple[int, int, int, int], ...]  # (left, top, right, bottom) in the resized image
    indices: tuple[int, ...]  # candidate index of each box (the tile_index)


def _to_rgb(im: Image.Image) -> Image.Image:
    icc = im.info.get("icc_profile")
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16-bit / 32-bit greyscale
        a = np.asarray(im, dtype=np.float64)
        a = a / 257.0 if a.max(initial=0) > 255 else a
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):  # composite on white: transparent is not black
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    if icc and im.mode in ("RGB", "CMYK", "RGBA"):
        try:  # colour-manage into sRGB when the file says what its colours mean
            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            im = ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    return im.convert("RGB") if im.mode != "RGB" else im


def decode(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> an oriented RGB image (first frame of animations), or Skip with the reason."""
    if not data:
        raise Skip("corrupt", "empty file")
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow warns above it (an error here) and refuses above twice it
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
            if im.width * im.height > max_pixels:
                raise Skip("decompression_bomb", f"{im.width}x{im.height}")
            im.seek(0)
            im.load()
        except Skip:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Skip("decompression_bomb", str(e)) from None
        except UnidentifiedImageError as e:
            raise Skip("not_an_image", str(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # not MemoryError: the machine, not the file
            raise Skip("corrupt", str(e)) from None
        try:
            im = ImageOps.exif_transpose(im)
            return _to_rgb(im)
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise Skip("corrupt", str(e)) from None


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n), always including the ends when k > 1."""
    if n <= k:
        return list(range(n))
    if k == 1:
        return [n // 2]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def _offsets(size: int, tile: int) -> list[int]:
    count = size // tile
    if count == 1:
        return [(size - tile) // 2]
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def place_tiles(width: int, height: int, tile: int, max_tiles: int, min_size: int) -> Placement:
    """Where the tiles of a width x height image go. Images whose short side is below `tile` (but at least
    `min_size`) are enlarged so it equals `tile`; larger images keep their resolution. Candidates form an
    even, non-overlapping grid; at most `max_tiles` of them are taken, spread over the grid."""
    short = min(width, height)
    if short < min_size:
        raise Skip("too_small", f"{width}x{height}, short side below {min_size}")
    scale = tile / short if short < tile else 1.0
    rw, rh = (max(tile, round(width * scale)), max(tile, round(height * scale))) if scale != 1.0 else (width, height)
    grid = [(x, y) for y in _offsets(rh, tile) for x in _offsets(rw, tile)]  # row-major
    chosen = _spread(len(grid), max_tiles)
    boxes = tuple((x, y, x + tile, y + tile) for x, y in (grid[i] for i in chosen))
    return Placement(width, height, rw, rh, boxes, tuple(chosen))


def cut_tiles(im: Image.Image, placement: Placement) -> np.ndarray:
    """(N, tile, tile, 3) uint8 tiles of an RGB image, as `placement` says."""
    if (im.width, im.height) != (placement.resized_width, placement.resized_height):
        im = im.resize((placement.resized_width, placement.resized_height), Image.Resampling.LANCZOS)
    tiles = [np.asarray(im.crop(box), dtype=np.uint8) for box in placement.boxes]
    side = placement.boxes[0][2] - placement.boxes[0][0] if placement.boxes else 0
    return np.stack(tiles) if tiles else np.zeros((0, side, side, 3), np.uint8)


def image_tiles(data: bytes, tile: int, max_tiles: int, min_size: int,
                max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Placement, np.ndarray]:
    """Bytes -> (placement, (N, tile, tile, 3) uint8 tiles); Skip when the image is not used."""
    im = decode(data, max_pixels)
    placement = place_tiles(im.width, im.height, tile, max_tiles, min_size)
    return placement, cut_tiles(im, placement)
