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
