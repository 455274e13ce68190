"""VAEs: resolving a space's VAE source, loading it with the registry's diffusers class, fingerprinting
its weights, and `TileEncoder`, which encodes one image's tiles with every VAE (no Ray import here; a
`pipeline.shards.ShardWorker` holds one).

    >>> enc = TileEncoder([VAESpec("v1", "path/to/vae", None, "float32")], device="cpu")
    >>> out = enc.encode(tiles)          # tiles: (N, T, T, 3) uint8 -> {"v1": (latents, stds, ok)}

The latent is the encoder distribution's mean (raw: no scaling), or a sample seeded by the tile key.
A tile's latent never depends on which other tiles share its forward pass beyond its own image's tiles,
which are always grouped the same way; NaN/inf results are retried in fp32 and else reported.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from interposer.spaces import LatentSpace, get_space, is_builtin, register_space
from interposer.vae import decode_raw, encode_raw, load_vae, vae_class  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class VAESpec:
    space: str  # registry code
    source: str  # Hub repo id or local folder
    subfolder: str | None
    dtype: str  # "float32", "bfloat16", "float16"
    latent: str = "mean"  # "mean" or "sample"
    store_std: bool = False
    definition: dict | None = None  # LatentSpace.to_dict() of a space defined by its VAE: workers register it
    trust_remote_code: bool = False  # the user passed --trust-remote-code (a VAE with its own code may load)
    code: dict | None = None  # {code file: sha256} of such a VAE, as the driver saw it: workers load only that


def parse_space_arg(arg: str, trust_remote_code: bool = False) -> tuple[str, str | None, str | None]:
    """'xl' / 'xl=REPO' / 'xl=REPO:SUBFOLDER' / 'xl=/local/folder' / 'v1=/models/vae/file.safetensors' ->
    (code, source or None, subfolder). A NAME the registry does not know, with a VAE, defines a new space from
    that VAE (interposer.vae.space_from_vae) and registers it in this process."""
    name, _, vae = arg.partition("=")
    if not vae:
        return get_space(name).code, None, None
    if Path(vae).expanduser().exists():
        source, sub = str(Path(vae).expanduser().resolve()), None
    elif "://" in vae:  # every encoder loads its VAE where it runs: from the Hub's cache or its node's disk
        raise ValueError(f"--space {arg}: a VAE is loaded from a local folder or a Hub repo id, not from {vae}; on a "
                         "cluster give a Hub repo id (org/name[:subfolder]), or put the folder on every node at the "
                         "same path (cluster.yaml's file_mounts)")
    else:
        repo, _, sub = vae.partition(":")
        if repo.count("/") != 1 or not all(repo.split("/")):
            raise ValueError(f"--space {arg}: {vae!r} is neither a local folder nor a Hub repo id "
                             "(org/name[:subfolder])")
        source, sub = repo, sub or None
    if is_builtin(name):
        return get_space(name).code, source, sub
    # not in the registry: a space defined by its VAE (if the name is known from a manifest, the definition
    # must be the same: register_space refuses other latents under a known name, naming both)
    from interposer.vae import space_from_vae

    return register_space(space_from_vae(name.strip(), source, sub, trust_remote_code)).code, source, sub


def resolve_source(space: LatentSpace, source: str | None, subfolder: str | None) -> tuple[str, str | None]:
    """The (source, subfolder) to load: the registry's default, or the user's; a local folder holding the
    whole pipeline (e.g. vae/ inside) uses the registry's subfolder when that is where config.json is."""
    if source is None:
        return space.vae_repo, space.vae_subfolder
    local = Path(source)
    if local.is_dir() and not (local / "config.json").is_file() and space.vae_subfolder \
            and (local / space.vae_subfolder / "config.json").is_file():
        return source, space.vae_subfolder
    return source, subfolder


def source_fingerprint(vae: torch.nn.Module, source: str) -> str:
    """A single-file checkpoint's own sha256 (the file users compare); else `fingerprint(vae)`."""
    from interposer.vae import file_sha256, is_single_file

    return file_sha256(source) if is_single_file(source) else fingerprint(vae)


def fingerprint(vae: torch.nn.Module) -> str:
    """sha256 over the weights' names, dtypes, shapes and bytes (independent of where they came from)."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape(-1): a 0-dim tensor (BatchNorm's num_batches_tracked in Flux.2, Cascade) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def tile_seed(key: str) -> int:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") & ((1 << 63) - 1)


class TileEncoder:
    """Loads each space's VAE once, then encodes (N, T, T, 3) uint8 tiles with all of them.

    A `pipeline.shards.ShardWorker` (what Ray Data maps over shards) holds one; `bench/encode.py` calls it
    in a bare loop."""

    def __init__(self, specs: list[VAESpec], device: str | None = None, batch_size: int = 6):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.specs = specs
        self.vaes = {}
        for spec in specs:
            if spec.definition is not None:  # this process (a Ray worker) has not seen the space defined
                register_space(spec.definition)
            space = get_space(spec.space)
            self.vaes[spec.space] = load_vae(space, spec.source, spec.subfolder, getattr(torch, spec.dtype),
                                             self.device, spec.trust_remote_code, spec.code)
        self._fp32 = {}  # fp32 copies, made on the first NaN/inf

    def _fp32_vae(self, spec: VAESpec):
        if spec.space not in self._fp32:
            vae = self.vaes[spec.space]
            self._fp32[spec.space] = (vae if vae.dtype == torch.float32
                                      else load_vae(get_space(spec.space), spec.source, spec.subfolder,
                                                    torch.float32, self.device, spec.trust_remote_code, spec.code))
        return self._fp32[spec.space]

    def encode(self, tiles: np.ndarray, keys: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
        """tiles (N, T, T, 3) uint8 -> {space: (latents fp16 (N, C, h, w), stds fp16 or None, finite (N,) bool)}.
        Forward passes take at most `batch_size` tiles, always in the given order."""
        pixels = torch.from_numpy(np.array(tiles, copy=not tiles.flags.writeable)).permute(0, 3, 1, 2)
        pixels = pixels.float() / 127.5 - 1.0  # (N, 3, T, T) in [-1, 1]
        out = {}
        for spec in self.specs:
            space = get_space(spec.space)
            lat_parts, std_parts = [], []
            for i in range(0, len(tiles), self.batch_size):
                seeds = [tile_seed(k) for k in keys[i : i + self.batch_size]]
                batch = pixels[i : i + self.batch_size]
                mean, std = encode_raw(self.vaes[spec.space], space, batch, spec.latent, seeds)
                lat_parts.append(mean.cpu())
                std_parts.append(std.cpu() if std is not None else None)
            latents = torch.cat(lat_parts).half()  # (N, C, h, w)
            stds = torch.cat(std_parts).half() if spec.store_std and std_parts[0] is not None else None
            finite = torch.isfinite(latents).flatten(1).all(1)
            if stds is not None:
                finite &= torch.isfinite(stds).flatten(1).all(1)
            for j in torch.nonzero(~finite).flatten().tolist():  # retry each bad tile alone in fp32
                mean, std = encode_raw(self._fp32_vae(spec), space, pixels[j : j + 1], spec.latent,
                                       [tile_seed(keys[j])])
                latents[j] = mean[0].cpu().half()
                if stds is not None:
                    stds[j] = std[0].cpu().half()
                finite[j] = bool(torch.isfinite(latents[j]).all() and (stds is None or torch.isfinite(stds[j]).all()))
            out[spec.space] = (latents.numpy(), stds.numpy() if stds is not None else None, finite.numpy())
        return out
