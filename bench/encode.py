"""Tiles/s of the full Ray Data pipeline vs a bare batched encoder loop: same VAE, same tiles, same batch.

    python bench/encode.py                       # SD-class VAE, 256 px tiles, 16 images (about 5 min on 2 cores)
    python bench/encode.py --tile-size 512 --images 8

The VAE is an SD-class AutoencoderKL (the real architecture, random weights) saved to a folder and loaded
by path, as in `--space v1=FOLDER`. The bare loop encodes the very tiles the pipeline cuts, with the same
TileEncoder, batch size and torch threads, timing only the encoding; the pipeline figure is its own
wall time end to end (listing, hashing, VAE checks, actor start-up included), and its steady rate from
the first encoded image back to the end. Rounds alternate bare loop and pipeline (the bare loop first, so
both see a warm disk cache) and each figure is its best round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from interposer.pipeline.standins import SD_VAE  # noqa: E402
from interposer.pipeline.build import BuildConfig, build, start_ray  # noqa: E402
from interposer.pipeline.encoder import TileEncoder, VAESpec  # noqa: E402
from interposer.pipeline.rows import cut_one  # noqa: E402



def make_images(folder: Path, count: int, side: int) -> None:
    """`count` distinct photographs: scikit-image's samples, resized and mirrored into unique files."""
    import skimage
    from PIL import Image, ImageOps

    data = Path(skimage.__file__).parent / "data"
    photos = [Image.open(data / n).convert("RGB") for n in
              ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")]
    for i in range(count):
        im = photos[i % len(photos)]
        scale = side * (1 + (i // len(photos)) * 0.1) / min(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
        if (i // len(photos)) % 2:
            im = ImageOps.mirror(im)
        im.save(folder / f"img{i:03d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16, help="distinct images (default 16)")
    parser.add_argument("--tile-size", type=int, default=256, help="tile side in pixels (default 256)")
    parser.add_argument("--max-tiles", type=int, default=3, help="tiles per image (default 3)")
    parser.add_argument("--batch-size", type=int, default=3, help="tiles per forward pass (default 3)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of bare loop then pipeline (default 2)")
    args = parser.parse_args()
    import ray
    from diffusers import AutoencoderKL

    work = Path(tempfile.mkdtemp(prefix="bench-encode-"))
    try:
        torch.manual_seed(0)
        vae_dir = work / "vae"
        AutoencoderKL(**SD_VAE).save_pretrained(vae_dir)
        images = work / "images"
        images.mkdir()
        make_images(images, args.images, int(args.tile_size * 1.6))

        # the bare loop first: the very tiles the pipeline will cut, encoded in one process
        import hashlib

        per_image = []
        for path in sorted(images.iterdir()):
            image_id = hashlib.sha256(path.read_bytes()).hexdigest()
            cut = cut_one(str(path), image_id, args.tile_size, args.max_tiles, 64)
            indices = json.loads(cut["indices"])
            per_image.append((np.frombuffer(cut["pixels"], np.uint8).reshape(len(indices), args.tile_size,
                                                                                args.tile_size, 3),
                              [f"{image_id}-{i:02d}" for i in indices]))
        cpus = os.cpu_count() or 1
        torch.set_num_threads(cpus)
        encoder = TileEncoder([VAESpec("v1", str(vae_dir), None, "float32")], device="cpu",
                              batch_size=args.batch_size)
        encoder.encode(*per_image[0])  # warm-up
        tiles = sum(len(k) for _, k in per_image)

        # Rounds alternate the bare loop and the pipeline, so a slow minute of this shared machine hits both;
        # Ray runs only during the pipeline's turn. Each figure is its best round (noise only slows a run).
        bare, wall, steady = [], [], []
        for r in range(args.repeats):
            start = time.perf_counter()
            for pixels, keys in per_image:
                encoder.encode(pixels, keys)
            bare.append(tiles / (time.perf_counter() - start))

            start_ray()  # as `interposer data build` / `interposer train` start it
            cfg = BuildConfig(images=[str(images)], spaces=[f"v1={vae_dir}"], out=str(work / f"data{r}"),
                              tile_size=args.tile_size, max_tiles=args.max_tiles, min_size=64, shard_size=4,
                              batch_size=args.batch_size, quiet=True)
            start = time.perf_counter()
            manifest = build(cfg)
            wall.append(tiles / (time.perf_counter() - start))
            ray.shutdown()
            assert manifest.counts["tiles"] == tiles, (manifest.counts["tiles"], tiles)
            run = manifest.run_stats  # the encode stage's own timing
            steady.append(run["steady_tiles"] / run["steady_seconds"] if run["steady_seconds"] > 0 else float("nan"))
            print(f"round {r + 1}/{args.repeats}: bare {bare[-1]:.3f} tiles/s, pipeline steady {steady[-1]:.3f} "
                  f"({steady[-1] / bare[-1]:.3f}), end to end {wall[-1]:.3f} ({wall[-1] / bare[-1]:.3f})", flush=True)

        b, w, st = max(bare), max(wall), max(steady)
        steady_ratios = [s / b_ for s, b_ in zip(steady, bare)]
        wall_ratios = [w_ / b_ for w_, b_ in zip(wall, bare)]
        print(f"machine     {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
              f"ray {ray.__version__}")
        print(f"workload    {tiles} tiles of {args.tile_size} px from {args.images} images, SD-class VAE, "
              f"batch {args.batch_size}, fp32 CPU; best of {args.repeats} rounds")
        print(f"bare loop   {b:8.3f} tiles/s   (TileEncoder in one process, {cpus} threads)")
        print(f"pipeline    {w:8.3f} tiles/s   (interposer data build, end to end incl. listing, "
              f"hashing, VAE checks and actor start-up)")
        print(f"  steady    {st:8.3f} tiles/s   (from the first image back: start-up excluded)")
        print(f"ratio       {statistics.median(wall_ratios):8.3f} end to end, {statistics.median(steady_ratios):.3f} "
              f"steady (goal >= 0.90; median of the rounds' own ratios: "
              f"{', '.join(f'{r:.3f}' for r in steady_ratios)} steady)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
