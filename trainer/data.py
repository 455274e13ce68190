"""Training data from a pipeline/ dataset: the pair's latents, a validation split by image, and a
deterministic sampler of aligned random crops. Plain torch + pyarrow (no Ray).

Every random choice is a pure function of (seed, epoch or step, rank), so a run resumed from a checkpoint
draws exactly the batches it would have drawn had it never stopped.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from interposer.spaces import get_space
from pipeline.schema import Manifest, latents_path, read_latents, read_manifest, tiles_path
from pipeline.store import Store


@dataclass
class PairData:
    src: torch.Tensor  # (N, Cs, Hs, Ws) float16, raw latents
    dst: torch.Tensor  # (N, Cd, Hd, Wd) float16
    image_ids: list[str]


def check_pair(manifest: Manifest, data: str, src: str, dst: str) -> None:
    missing = [c for c in (src, dst) if c not in manifest.spaces]
    if missing:
        raise ValueError(f"--data {data} has no {', '.join(missing)} latents; it has {', '.join(manifest.spaces)} "
                         f"(add one with `interposer data add-space --data {data} --space {missing[0]}`)")
    if not manifest.complete:
        raise ValueError(f"--data {data} is not finished building; rerun its `interposer data build` command")


def is_validation(image_id: str, fraction: float) -> bool:
    """A fixed share of images, chosen by id: the same split on every machine, every run."""
    h = int.from_bytes(hashlib.sha256(f"val:{image_id}".encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def iter_pair(data: str, src: str, dst: str, split: str, val_fraction: float):
    """(tile row, src latent, dst latent) for each tile of `split` ("train", "val" or "all") that has latents
    in both spaces, joined on tile_key, in dataset order. The validation split is by image id."""
    store = Store(data)
    manifest = read_manifest(data)
    check_pair(manifest, data, src, dst)
    for shard in range(manifest.shards):
        a = store.read_table(latents_path(src, shard))
        b = store.read_table(latents_path(dst, shard))
        pos_a = {k: i for i, k in enumerate(a.column("tile_key").to_pylist())}
        pos_b = {k: i for i, k in enumerate(b.column("tile_key").to_pylist())}
        la, lb = read_latents(a) if a.num_rows else None, read_latents(b) if b.num_rows else None
        for tile in store.read_table(tiles_path(shard)).to_pylist():
            key = tile["tile_key"]
            if key not in pos_a or key not in pos_b:
                continue
            if split != "all" and is_validation(tile["image_id"], val_fraction) != (split == "val"):
                continue
            yield tile, la[pos_a[key]], lb[pos_b[key]]


def load_pair(data: str, src: str, dst: str, split: str, val_fraction: float) -> PairData:
    """The split's tiles that have latents in both spaces, joined on tile_key, in dataset order."""
    rows = list(iter_pair(data, src, dst, split, val_fraction))
    if not rows:
        raise ValueError(f"--data {data}: the {split} split has no tiles with both {src} and {dst} latents")
    return PairData(torch.from_numpy(np.stack([r[1] for r in rows])), torch.from_numpy(np.stack([r[2] for r in rows])),
                    [r[0]["image_id"] for r in rows])


def step_seed(seed: int, *parts: int) -> int:
    h = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class CropSampler:
    """Global batch b of aligned crops per step; rank r takes samples r, r+world, ... of it.

    The order of tiles is a permutation per epoch seeded by (seed, epoch); crop positions are seeded by
    (seed, step, rank). Its whole state is the step, so `state_dict()` is small and a resume is exact."""

    def __init__(self, data: PairData, src: str, dst: str, crop: int, batch: int, seed: int, rank: int, world: int):
        self.data, self.crop, self.batch, self.seed, self.rank, self.world = data, crop, batch, seed, rank, world
        fs, fd = get_space(src).factor, get_space(dst).factor
        self.scale = fs / fd  # dst pixels per src pixel
        self.grid = max(1, round(fd / math.gcd(fs, fd)))  # src offsets on this grid map to whole dst pixels
        self.n = len(data.src)
        self.per_epoch = max(1, self.n // batch) if self.n >= batch else 1
        self.step = 0

    def state_dict(self) -> dict:
        return dict(step=self.step, epoch=self.step // self.per_epoch, position=self.step % self.per_epoch,
                    seed=self.seed, world=self.world)

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])

    def _indices(self, step: int) -> torch.Tensor:
        epoch, pos = divmod(step, self.per_epoch)
        g = torch.Generator().manual_seed(step_seed(self.seed, epoch))
        if self.n >= self.batch:
            perm = torch.randperm(self.n, generator=g)
            chosen = perm[pos * self.batch : (pos + 1) * self.batch]
        else:  # fewer tiles than a batch: draw with replacement
            chosen = torch.randint(self.n, (self.batch,), generator=g.manual_seed(step_seed(self.seed, step)))
        return chosen[self.rank :: self.world]

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(src crops (b/world, Cs, c, c), dst crops (b/world, Cd, c*s, c*s)), float32."""
        idx = self._indices(self.step)
        g = torch.Generator().manual_seed(step_seed(self.seed, self.step, self.rank, 1))
        self.step += 1
        _, _, hs, ws = self.data.src.shape
        c, cd = self.crop, int(self.crop * self.scale)
        if c > hs or c > ws:
            raise ValueError(f"crop {c} is larger than the source latents ({hs}x{ws}); pass a smaller --crop")
        ys = torch.randint((hs - c) // self.grid + 1, (len(idx),), generator=g) * self.grid
        xs = torch.randint((ws - c) // self.grid + 1, (len(idx),), generator=g) * self.grid
        src = torch.stack([self.data.src[i, :, y : y + c, x : x + c] for i, y, x in zip(idx, ys, xs)])
        dst = torch.stack([self.data.dst[i, :, int(y * self.scale) : int(y * self.scale) + cd,
                                         int(x * self.scale) : int(x * self.scale) + cd]
                           for i, y, x in zip(idx, ys, xs)])
        return src.float(), dst.float()
