"""Latent files: .safetensors, ComfyUI .latent and .npy, read and written (atomically) as raw tensors.

.safetensors : the tensor under "samples", or the file's only tensor.
.latent      : ComfyUI SaveLatent's format, "latent_tensor" holding raw latents. Files without the
               "latent_format_version_0" marker predate it and hold SD1 latents scaled by 0.18215; they are
               unscaled on read, as ComfyUI's LoadLatent does.
.npy         : a plain array (no pickles).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .files import atomic_write

SUFFIXES = (".safetensors", ".latent", ".npy")
_COMFY_KEY, _COMFY_MARK = "latent_tensor", "latent_format_version_0"
_OLD_COMFY_SCALE = 0.18215


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown latent file type {suffix or '(none)'!r}; use one of {', '.join(SUFFIXES)}")
    return suffix


def read_latent(path: str | Path) -> torch.Tensor:
    """The latent tensor stored in `path` (CPU)."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{path}: not readable")
    if suffix == ".npy":
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise ValueError(f"{path}: not a readable .npy array ({e})") from e
        return torch.from_numpy(np.ascontiguousarray(array))

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
    if suffix == ".latent":
        if _COMFY_KEY not in tensors:
            raise ValueError(f"{path}: a ComfyUI .latent file needs a {_COMFY_KEY!r} tensor; it has {sorted(tensors)}")
        latent = tensors[_COMFY_KEY]
        return latent if _COMFY_MARK in tensors else latent / _OLD_COMFY_SCALE
    if "samples" in tensors:
        return tensors["samples"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise ValueError(f"{path}: holds {sorted(tensors)}; put the latents under 'samples' or keep one tensor")


def write_latent(path: str | Path, latent: torch.Tensor) -> Path:
    """Write `latent` to `path` in the format its suffix names; never leaves a partial file."""
    path = Path(path)
    suffix = _suffix(path)
    latent = latent.detach().cpu().contiguous()
    if suffix == ".npy":
        import numpy as np

        array = (latent.float() if latent.dtype == torch.bfloat16 else latent).numpy()  # numpy has no bfloat16

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
    else:
        from safetensors.torch import save_file

        tensors = {_COMFY_KEY: latent, _COMFY_MARK: torch.tensor([])} if suffix == ".latent" else {"samples": latent}

        def write(tmp: str) -> None:
            save_file(tensors, tmp)

    return atomic_write(path, write)
