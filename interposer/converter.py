"""convert(): latents of one space -> latents of another, with an explicit layout.

    >>> import torch
    >>> from interposer import convert
    >>> raw_v1 = convert(raw_xl, "xl", "v1")                        # VAE latents, (B, 4, H/8, W/8)
    >>> model_in = convert(pipe_latents, "xl", "v1", layout="scaled")  # diffusers/ComfyUI model inputs

layout="raw"    : the VAE encoder's output, as ComfyUI's LATENT and the interposer networks use.
layout="scaled" : what diffusion pipelines feed their model, e.g. raw * 0.13025 for SDXL, (raw - 0.1159) *
                  0.3611 for Flux.1 (unpacked, not 2x2-patch packed). Unscaled with the source space's
                  factors before the network, scaled with the target's after.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

import torch

from .model import InterposerModel
from .spaces import get_space, pair_scale
from .weights import load_interposer, register_spaces_of

Layout = Literal["raw", "scaled"]

# Pixels (B*H*W) per forward pass: bounds activation memory (~64 channels x 4 B x 5 live tensors per
# pixel, ~1.3 GB in fp32) while keeping batches large enough to be efficient.
MAX_PIXELS_PER_CHUNK = 1 << 20

_cache: dict[tuple, InterposerModel] = {}
_cache_lock = threading.Lock()
_loads = 0  # how many times convert() had to load weights (tests check reuse)


def _model(src: str, dst: str, weights, search_dirs: tuple, device: torch.device, dtype: torch.dtype):
    global _loads
    key = (src, dst, str(weights) if weights is not None else None, search_dirs, str(device), dtype)
    with _cache_lock:
        model = _cache.get(key)
        if model is None:
            model = load_interposer(src, dst, weights, search_dirs=search_dirs)
            _loads += 1
            # channels_last runs the 64-channel 3x3 convolutions ~1.3x faster on CPU (oneDNN) and on
            # tensor cores; results agree with the plain layout to float rounding.
            model = model.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
            model.requires_grad_(False)
            _cache[key] = model
    return model


def clear_cache() -> None:
    """Forget every model convert() loaded."""
    with _cache_lock:
        _cache.clear()


def _compute_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    # Half-precision convolutions on the CPU are slow and lose accuracy; compute those in fp32.
    if device.type == "cpu" and dtype == torch.float16:
        return torch.float32
    return dtype


def convert(latents: torch.Tensor, src: str, dst: str, *, layout: Layout = "raw",
            device: torch.device | str | None = None, dtype: torch.dtype | None = None,
            weights: str | Path | None = None, search_dirs=(), chunk_size: int | None = None,
            allow_nonfinite: bool = False) -> torch.Tensor:
    """Latents (B, C, H, W) or (B, C, T, H, W) of space `src` -> latents of space `dst`.

    Runs on `device` (default: where the latents are) in `dtype` (default: theirs), without autograd,
    in chunks of `chunk_size` samples (default: bounded by MAX_PIXELS_PER_CHUNK); returns the input's
    dtype and device. Video latents are converted frame by frame. Same space (or aliases): unchanged.
    NaN/inf in the input is refused (one bad value spreads over the network's whole receptive field): pass
    `allow_nonfinite=True` to convert anyway. Empty batches and latents too small for the pair's resampling are refused.
    """
    try:
        s, d = get_space(src), get_space(dst)
    except ValueError:  # a space defined by its VAE: its definition travels in the export's config.json
        if not register_spaces_of(weights):
            raise
        s, d = get_space(src), get_space(dst)
    if layout not in ("raw", "scaled"):
        raise ValueError(f"layout must be 'raw' or 'scaled', got {layout!r}")
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    if latents.dim() not in (4, 5):
        raise ValueError(f"latents must be (B, C, H, W) or (B, C, T, H, W), got shape {tuple(latents.shape)}")
    if latents.shape[1] != s.channels:
        raise ValueError(f"{s.code} latents have {s.channels} channels, but these have {latents.shape[1]} "
                         f"(shape {tuple(latents.shape)}); check the source space")
    if not latents.is_floating_point():
        raise TypeError(f"latents must be floating point, got {latents.dtype}")
    if latents.numel() == 0:
        raise ValueError(f"latents are empty (shape {tuple(latents.shape)}): nothing to convert")
    if not allow_nonfinite:
        bad = int((~torch.isfinite(latents)).sum())
        if bad:
            raise ValueError(f"latents hold {bad} NaN/inf value(s) of {latents.numel()}: their VAE or sampler "
                             "went wrong (SDXL's original VAE and Flux's make NaN in fp16); pass "
                             "allow_nonfinite=True (--allow-nonfinite) to convert them anyway")
    scale = pair_scale(s, d)
    if min(latents.shape[-2:]) * scale < 1:
        raise ValueError(f"latents of {latents.shape[-2]}x{latents.shape[-1]} are too small for {s.code} -> "
                         f"{d.code} (resampled by {scale:g}): at least {int(1 / scale + 0.999)} pixels a side")
    if s is d:
        return latents

    out_device, out_dtype = latents.device, latents.dtype
    run_device = torch.device(device) if device is not None else latents.device
    run_dtype = _compute_dtype(dtype or latents.dtype, run_device)
    model = _model(s.code, d.code, weights, tuple(map(str, search_dirs)), run_device, run_dtype)

    video = latents.dim() == 5
    x = latents
    if video:  # (B, C, T, H, W) -> (B*T, C, H, W): the network sees one frame at a time
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    if layout == "scaled":
        x = s.to_raw(x)

    n, _, h, w = x.shape
    step = chunk_size or max(1, MAX_PIXELS_PER_CHUNK // (h * w))
    outs = []
    # no_grad, not inference_mode: the result stays an ordinary tensor that user code may train on
    with torch.no_grad():
        for i in range(0, n, step):
            xi = x[i : i + step].to(run_device, run_dtype).contiguous(memory_format=torch.channels_last)
            outs.append(model(xi).to(out_device, torch.float32 if layout == "scaled" else out_dtype))
    y = torch.cat(outs).contiguous()  # (B*T, C', H', W')

    if layout == "scaled":
        y = d.to_scaled(y).to(out_dtype)
    if video:
        y = y.reshape(b, t, *y.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()
    return y
