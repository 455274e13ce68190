"""Loading a latent space's VAE with the registry's diffusers class (diffusers is imported only here,
and only when called: `interposer` itself never needs it).

    >>> vae = load_vae(get_space("xl"), "madebyollin/sdxl-vae-fp16-fix", None)   # or a local folder
    >>> z, std = encode_raw(vae, get_space("xl"), pixels)     # (B, 3, T, T) in [-1, 1] -> raw latents

Video VAEs (Wan) take (B, 3, T, H, W) and give (B, C, T, h, w): an image is one frame.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import warnings
from pathlib import Path

import torch

from .spaces import LatentSpace, is_builtin


def vae_class(space: LatentSpace):
    return getattr(importlib.import_module(space.vae_module), space.vae_class)


def load_vae(space: LatentSpace, source: str, subfolder: str | None, dtype: torch.dtype = torch.float32,
             device: str | torch.device = "cpu"):
    """The space's diffusers VAE class `from_pretrained(source, subfolder=...)`, eval mode, no grad."""
    cls = vae_class(space)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    where = f"{source}" + (f" (subfolder {subfolder})" if subfolder else "")
    local = Path(source).expanduser() / (subfolder or "") / "config.json"
    if local.is_file():  # another class's weights would load as random ones, with warnings only: refuse
        named = _vae_config(source, subfolder).get("_class_name")
        if isinstance(named, str) and named != space.vae_class:
            raise ValueError(f"the {space.code} space is made by {space.vae_class}, but the VAE at {where} is an "
                             f"{named}; to use it, define a new space from it: --space NEWNAME={source}")
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
    else:  # no distribution: PaellaVQModel / VQModel (before quantisation), AutoencoderTiny; AutoencoderDC
        mean, std = (out.latents if hasattr(out, "latents") else out.latent).float(), None
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


PROBE_SIDE = 256  # pixels of the probe image a space defined by its VAE is measured with


def _vae_config(source: str, subfolder: str | None) -> dict:
    """The VAE's config.json, from a local folder or a Hub repo id (the Hub cache; HF_HUB_OFFLINE honoured)."""
    import json

    where = f"{source}{':' + subfolder if subfolder else ''}"
    local = Path(source).expanduser()
    try:
        if local.is_dir():
            path = local / (subfolder or "") / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(source, "config.json", subfolder=subfolder))
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:  # missing file, Hub errors (OSError subclasses), bad JSON
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read the VAE's config.json at {where}: {first}") from e


@torch.inference_mode()
def space_from_vae(name: str, source: str, subfolder: str | None = None) -> LatentSpace:
    """A latent space defined by its VAE: the diffusers class from config.json's `_class_name`; channels,
    spatial factor and image-or-video measured by encoding one probe image (and checked against the
    config); the scaled layout from `scaling_factor`/`shift_factor`, or per-channel `latents_mean` /
    `latents_std` where the config has them (scaled = (raw - mean) * scaling_factor / std).

    >>> space = space_from_vae("dcx", "mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers")
    >>> register_space(space)          # then get_space("dcx") works in this process
    """
    import diffusers

    if is_builtin(name):
        raise ValueError(f"{name!r} is a registry space; give a space defined by its VAE another name")
    if not name or not all(c.isalnum() or c in "-_." for c in name) or not name[0].isalpha():
        raise ValueError(f"space name {name!r}: use letters, digits, '-', '_' or '.', starting with a letter")
    where = f"{source}{':' + subfolder if subfolder else ''}"
    config = _vae_config(source, subfolder)
    class_name = config.get("_class_name")
    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise ValueError(f"--space {name}={where}: config.json names {class_name!r}, not a diffusers model class")
    if not callable(getattr(cls, "encode", None)) or not callable(getattr(cls, "decode", None)):
        raise ValueError(f"--space {name}={where}: {class_name} cannot encode and decode images (no encode/decode)")
    probe_space = LatentSpace(name, class_name, 1, 1, class_name, source, subfolder)
    vae = load_vae(probe_space, source, subfolder)
    pixels = torch.rand(1, 3, PROBE_SIDE, PROBE_SIDE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latent, video = None, False
    for video in (False, True):  # image VAEs take (B, 3, H, W); video VAEs (B, 3, T, H, W)
        try:
            latent, _ = encode_raw(vae, dataclasses.replace(probe_space, video=video), pixels)
            break
        except (RuntimeError, ValueError, TypeError) as e:
            error = e
    if latent is None:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"--space {name}={where}: {class_name} could not encode a {PROBE_SIDE}px image ({first})")
    channels, side = latent.shape[1], latent.shape[-1]
    if latent.dim() != 4 or latent.shape[-2] != side or PROBE_SIDE % side:
        raise ValueError(f"--space {name}={where}: a {PROBE_SIDE}px image gave latents of shape "
                         f"{tuple(latent.shape)}: not a whole spatial factor")
    for key in ("latent_channels", "z_dim"):
        if isinstance(config.get(key), int) and config[key] != channels:
            raise ValueError(f"--space {name}={where}: config.json says {key} {config[key]}, the VAE gives "
                             f"{channels} channels")
    scale = float(config.get("scaling_factor") or 1.0)
    mean, std = config.get("latents_mean"), config.get("latents_std")
    stats = isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == channels
    layout = dict(scaling="per_channel", mean=tuple(map(float, mean)), std=tuple(float(v) / scale for v in std)) \
        if stats else dict(scale=scale, shift=float(config.get("shift_factor") or 0.0))
    return LatentSpace(name, f"{class_name} VAE", channels, PROBE_SIDE // side, class_name, source, subfolder,
                       video=video, notes=f"defined by its VAE ({where})", **layout)
