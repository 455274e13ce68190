"""`data inspect`: a dataset's manifest summary and per-space, per-channel latent statistics, streamed one
shard file at a time (memory: one shard's latents)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from .schema import read_latents, read_manifest
from .store import Store


def inspect_dataset(data: str) -> dict:
    """Manifest summary plus per-space, per-channel latent mean and std."""
    store = Store(data)
    manifest = read_manifest(data)
    stats = {}
    for code, entry in manifest.spaces.items():
        c = entry.channels
        n, total, total_sq = 0, np.zeros(c), np.zeros(c)
        for name in store.list(f"latents/{code}"):
            lat = read_latents(store.read_table(f"latents/{code}/{name}")).astype(np.float64)  # (N, C, h, w)
            n += lat.shape[0] * lat.shape[2] * lat.shape[3]
            total += lat.sum(axis=(0, 2, 3))
            total_sq += (lat ** 2).sum(axis=(0, 2, 3))
        mean = total / max(n, 1)
        std = np.sqrt(np.maximum(total_sq / max(n, 1) - mean ** 2, 0))
        stats[code] = dict(tiles=entry.tiles, mean=mean.round(4).tolist(), std=std.round(4).tolist())
    return dict(path=store.uri, complete=manifest.complete, tile_size=manifest.tile_size, shards=manifest.shards,
                counts=manifest.counts, spaces={k: asdict(v) for k, v in manifest.spaces.items()}, stats=stats,
                fingerprint=manifest.fingerprint())
