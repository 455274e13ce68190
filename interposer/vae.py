"""Loading a latent space's VAE with the registry's diffusers class (diffusers is imported only here,
and only when called: `interposer` itself never needs it).

    >>> vae = load_vae(get_space("xl"), "madebyollin/sdxl-vae-fp16-fix", None)   # or a local folder
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
