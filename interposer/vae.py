"""Loading a latent space's VAE with the registry's diffusers class (diffusers is imported only here,
and only when called: `interposer` itself never needs it).

    >>> vae = load_vae(get_space("xl"), "madebyollin/sdxl-vae-fp16-fix", None)   # or a local folder
    >>> z, std = encode_raw(vae, get_space("xl"), pixels)     # (B, 3, T, T) in [-1, 1] -> raw latents

Video VAEs (Wan) take (B, 3, T, H, W) and give (B, C, T, h, w): an image is one frame.
"""

from __future__ import annotations

import importlib
import os
import warnings
from pathlib import Path

import torch

from .spaces import LatentSpace


def vae_class(space: LatentSpace):
    return getattr(importlib.import_module(space.vae_module), space.vae_class)


def load_vae(space: LatentSpace, source: str, subfolder: str | None, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu"):
    """The space's diffusers VAE class `from_pretrained(source, subfolder=...)`, eval mode, no grad."""
    cls = vae_class(space)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    where = f"{source}" + (f" (subfolder {subfolder})" if subfolder else "")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # diffusers' own deprecation chatter
            vae = cls.from_pretrained(source, torch_dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        if not Path(source).exists() and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
            raise ValueError(f"the {space.code} VAE {where} is not in the Hugging Face cache and HF_HUB_OFFLINE is "
                             f"set: download it first, or pass --space {space.code}=/local/folder") from e
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot load the {space.code} VAE ({space.vae_class}) from {where}: {first}") from e
    return vae.to(device).eval().requires_grad_(False)


@torch.inference_mode()
def encode_raw(vae, space: LatentSpace, pixels: torch.Tensor, latent: str = "mean",
               seeds: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """pixels (B, 3, T, T) in [-1, 1] -> raw latents (B, C, T/f, T/f) and stds (or None), float32."""
    x = pixels.to(vae.device, vae.dtype)
    if space.video:
        x = x.unsqueeze(2)  # (B, 3, 1, T, T)
    out = vae.encode(x)
    if hasattr(out, "latent_dist"):
        dist = out.latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        if latent == "sample":
            noise = torch.stack([torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(s))
                                 for s in seeds]).to(mean.device)
            mean = mean + std * noise
    else:  # PaellaVQModel (Stable Cascade stage A): continuous latents before quantisation, no distribution
        mean, std = out.latents.float(), None
    if space.video:
        mean = mean.squeeze(2)
        std = std.squeeze(2) if std is not None else None
    return mean, std


@torch.inference_mode()
def decode_raw(vae, space: LatentSpace, latents: torch.Tensor) -> torch.Tensor:
    """raw latents (B, C, h, w) -> images (B, 3, h*f, w*f) in [-1, 1], float32."""
    z = latents.to(vae.device, vae.dtype)
    if space.video:
        return vae.decode(z.unsqueeze(2)).sample.squeeze(2).float()
    return vae.decode(z).sample.float()
