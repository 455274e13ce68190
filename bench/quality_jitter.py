"""Colour-jittered copies of the quality bench's colour training crops: a variant of its training data (issue
32), measured with bench/quality_loops.py's more=. Tried and not kept (README Quality, variants table).

    python bench/quality_jitter.py bench-quality/photos-jitter          # 650 crops: every colour crop, once
    interposer data build --images bench-quality/photos-jitter --space fx2=../shared/vaes/taef2 \
        --space sana=../shared/vaes/taesana --trust-remote-code --tile-size 256 --max-tiles 1 \
        --out bench-quality/data-jitter --quiet                          # ~4 min on 2 cores
    python bench/quality_loops.py sana fx2 shuffle 2e-3 600 more=bench-quality/data-jitter

Each crop of each colour training photo (bench/quality.py's scales and grid, mirrored) gets one random colour
change, seeded: gamma in [0.75, 1.33] (log-uniform), then in YIQ a hue rotation uniform over the circle and a
saturation factor in [0.6, 1.6]; clipped to [0, 255]. Continuous where the bench's channel rotations are three
fixed hues.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.quality import (MORE_PHOTOS, TRAIN_PHOTOS, TRAIN_SCALES, TRAIN_STRIDE, crop_prefix, crops,  # noqa: E402
                           photo_paths)

YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def jitter(tile: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 -> the same with gamma, hue and saturation changed at random."""
    x = (tile.astype(np.float64) / 255) ** np.exp(rng.uniform(np.log(0.75), np.log(1.33)))
    yiq = x @ YIQ.T  # (H, W, 3): luma, then the two chroma axes
    angle, saturation = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.6)
    c, s = np.cos(angle) * saturation, np.sin(angle) * saturation
    i, q = yiq[..., 1].copy(), yiq[..., 2].copy()
    yiq[..., 1], yiq[..., 2] = c * i - s * q, s * i + c * q
    return (np.clip(yiq @ np.linalg.inv(YIQ).T, 0, 1) * 255 + 0.5).astype(np.uint8)


def main() -> None:
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for the PNG crops (made; must not hold crops yet)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the colour changes (default 0)")
    args = parser.parse_args()
    out = Path(args.out)
    if out.is_dir() and any(out.glob("*.png")):
        parser.error(f"{out}: holds crops already; give an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    rng, n = np.random.default_rng(args.seed), 0
    for path in photo_paths(TRAIN_PHOTOS, MORE_PHOTOS):
        photo = Image.open(path)
        if photo.mode != "RGB":
            continue  # grey photos have no colour to change
        for i, tile in enumerate(crops(np.asarray(photo), TRAIN_SCALES, TRAIN_STRIDE, mirror=True)):
            Image.fromarray(jitter(tile, rng)).save(out / f"{crop_prefix(path)}-j0-{i:03d}.png")
            n += 1
    print(f"{n} crops in {out}")


if __name__ == "__main__":
    main()
