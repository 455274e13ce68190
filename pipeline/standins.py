"""Stand-in VAEs: the registry's real diffusers classes at tiny widths, seeded, saved to a folder.

There are no real VAE weights where this project is tested (nothing is downloaded), so tests and the demo
make these and load them with `from_pretrained(folder)`, the exact code path a Hub repo id takes. They keep
each space's true channel count and downsampling factor; their latents mean nothing.

    >>> make_standin_vae("xl", "cache/vae-xl", seed=1)     # then: --space xl=cache/vae-xl
"""

from __future__ import annotations

from pathlib import Path

import torch

from interposer.spaces import get_space

from .encoder import vae_class


# The real SD-class AutoencoderKL architecture (stabilityai/sd-vae-ft-mse's config.json), for benchmarks
# that need a VAE of true cost; with random weights.
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), sample_size=512, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip


def standin_config(code: str, width: int = 8) -> dict:
    """A tiny config of the space's VAE class with its real latent channels and factor."""
    space = get_space(code)
    if space.vae_class == "AutoencoderKL":
        return dict(block_out_channels=(width,) * 4, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=space.channels,
                    norm_num_groups=min(4, width), layers_per_block=1)
    if space.vae_class == "AutoencoderKLFlux2":
        return dict(block_out_channels=(width,) * 4, latent_channels=space.channels, norm_num_groups=min(4, width),
                    layers_per_block=1)
    if space.vae_class == "AutoencoderKLWan":
        return dict(base_dim=width, z_dim=space.channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    if space.vae_class == "PaellaVQModel":
        return dict(levels=2, bottleneck_blocks=1, embed_dim=2 * width, latent_channels=space.channels,
                    num_vq_embeddings=64)
    raise ValueError(f"no stand-in config for {space.vae_class}")


def make_standin_vae(code: str, folder: str | Path, seed: int = 0, width: int = 8) -> Path:
    """Build, seed and save a stand-in VAE for space `code` into `folder` (skipped if already there)."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    space = get_space(code)
    torch.manual_seed(seed)
    vae = vae_class(space)(**standin_config(code, width))
    with torch.no_grad():  # diffusers' default init gives near-constant latents at this size: spread them
        for p in vae.parameters():
            if p.dim() > 1:
                p.normal_(0.0, (1.0 / p[0].numel()) ** 0.5)
    vae.save_pretrained(folder)
    return folder


def write_synthetic_dataset(folder: str | Path, images: int, tiles_per_image: int = 6, shard_size: int = 64,
                            spaces: dict[str, tuple[int, int, int]] | None = None, seed: int = 0,
                            fill=None) -> Path:
    """A complete dataset in the pipeline's format with made-up latents and no VAE or image behind it: for
    trainer tests and benchmarks at sizes no encoder run here could reach. `spaces` maps a registry code to
    its latent shape (C, h, w) (default xl and v1 at 4x64x64); `fill(code, keys, shape)` gives the
    (n, C, h, w) latents of a shard's tiles (default: standard normal, seeded by (seed, code, shard))."""
    import hashlib
    import math

    import numpy as np
    import pyarrow as pa

    from .schema import (LATENT_ROWS_PER_GROUP, MANIFEST, TILES_SCHEMA, Manifest, SpaceEntry, images_path,
                         images_table, latent_table, latents_path, shard_of, tile_key, tiles_path)
    from .store import Store

    spaces = spaces or {"xl": (4, 64, 64), "v1": (4, 64, 64)}
    store = Store(folder)
    shards = max(1, math.ceil(images / shard_size))
    ids = sorted(hashlib.sha256(f"synthetic-{seed}-{i}".encode()).hexdigest() for i in range(images))
    by_shard: list[list[str]] = [[] for _ in range(shards)]
    for image_id in ids:
        by_shard[shard_of(image_id, shards)].append(image_id)

    def random_fill(code, keys, shape, shard):
        rng = np.random.default_rng([seed, shard, *code.encode()])
        return rng.standard_normal((len(keys), *shape), dtype=np.float32).astype(np.float16)

    first = next(iter(spaces))
    tile = get_space(first).factor * spaces[first][1]  # pixels of a tile side
    for shard, members in enumerate(by_shard):
        keys = [tile_key(i, t) for i in members for t in range(tiles_per_image)]
        for code, shape in spaces.items():
            values = fill(code, keys, shape) if fill else random_fill(code, keys, shape, shard)
            store.write_table(latents_path(code, shard), latent_table(keys, values, None, shape),
                              LATENT_ROWS_PER_GROUP)
        store.write_table(tiles_path(shard), pa.Table.from_pylist(
            [dict(tile_key=k, image_id=k[:64], uri=f"synthetic/{k[:64]}", tile_index=int(k[65:]),
                  box=[0, 0, tile, tile]) for k in keys], schema=TILES_SCHEMA))
        summary = dict(images=len(members), images_ok=len(members), tiles=len(keys), skipped={})
        store.write_table(images_path(shard), images_table(
            [dict(image_id=i, uri=f"synthetic/{i}", width=tile, height=tile * tiles_per_image, resized_width=tile,
                  resized_height=tile * tiles_per_image, tiles=tiles_per_image, nonfinite=0, status="ok")
             for i in members], summary))
    entries = {code: SpaceEntry(vae=f"synthetic:{code}", subfolder=None, vae_class=get_space(code).vae_class,
                                dtype="float32", fingerprint=f"sha256:synthetic-{code}-{seed}",
                                channels=shape[0], factor=get_space(code).factor, latent_shape=list(shape),
                                tiles=images * tiles_per_image)
               for code, shape in spaces.items()}
    tiles = images * tiles_per_image
    manifest = Manifest(tile_size=tile, max_tiles=tiles_per_image, min_size=1, max_pixels=1 << 28,
                        shard_size=shard_size, sources=[f"synthetic-{seed}-{images}"], spaces=entries,
                        shards=shards, indexed=True, complete=True,
                        counts=dict(listed=images, unique_images=images, images_ok=images, tiles=tiles, skipped={}))
    store.write_bytes(MANIFEST, manifest.to_json().encode())
    return Path(folder)
