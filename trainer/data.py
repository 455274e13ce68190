"""Training data from a pipeline/ dataset: each rank streams its own share of the pair's shards, with memory
set by the shard size, not by the dataset. Plain numpy + pyarrow (no Ray); from pipeline/ only its data
contract, `pipeline.schema`.

    reader = PairReader("data/xl-v1", "xl", "v1", val_fraction=0.02)
    stream = CropStream(reader, crop=32, batch=64, seed=0, rank=0, world=2)
    src, dst = stream.next(step)          # (64, 4, 32, 32), (64, 4, 32, 32) float32 aligned crops

How a rank walks the data: the shards are cut into `units` (a shard, or a 1/k slice of one when there are
fewer shards than ranks). Epoch e permutes the units by (seed, e); rank r takes units r, r+world, ... of that
order and, within a unit, its train tiles in an order permuted by (seed, e, shard). Its batches are the next
`batch / world` tiles of that stream, crossing unit and epoch ends; crop positions are drawn by (seed, step,
rank). Shards are ranges of image-id hashes, so each is a random sample of the images: a batch drawn from a
shuffled shard is a batch of random images. The position in the stream (epoch, unit, tile) is the whole
state: a checkpoint stores it per rank and a resumed run draws exactly the batches it would have drawn. The
next unit is read on a background thread while this one is used: at most two units are in memory.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from interposer.spaces import get_space
from interposer.pipeline.schema import DatasetFiles, Manifest, latents_path, read_latents, read_manifest, tiles_path


def check_pair(manifest: Manifest, data: str, src: str, dst: str) -> None:
    check_spaces(manifest, data, (src, dst))


def check_spaces(manifest: Manifest, data: str, spaces) -> None:
    """The dataset holds latents of every one of `spaces` and is finished building."""
    missing = [c for c in spaces if c not in manifest.spaces]
    if missing:
        raise ValueError(f"--data {data} has no {', '.join(missing)} latents; it has {', '.join(manifest.spaces)} "
                         f"(add one with `interposer data add-space --data {data} --space {missing[0]}`)")
    if not manifest.complete:
        raise ValueError(f"--data {data} is not finished building; rerun its `interposer data build` command")


def is_validation(image_id: str, fraction: float) -> bool:
    """A fixed share of images, chosen by id: the same split on every machine, every run."""
    h = int.from_bytes(hashlib.sha256(f"val:{image_id}".encode()).digest()[:8], "little")
    return h / 2**64 < fraction


def step_seed(seed: int, *parts: int) -> int:
    h = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass
class ShardTiles:
    """Tiles of one shard that have latents in both spaces, in the shard's order."""

    rows: pa.Table  # the tiles/ rows (tile_key, image_id, uri, tile_index, box)
    src: np.ndarray  # (n, Cs, hs, ws) float16, raw latents
    dst: np.ndarray  # (n, Cd, hd, wd) float16

    def __len__(self) -> int:
        return len(self.src)


class TileReader:
    """Reads the aligned latents of several spaces of a dataset shard by shard, only the row groups it needs."""

    def __init__(self, data: str, spaces, val_fraction: float):
        self.data, self.spaces, self.val_fraction = data, tuple(spaces), val_fraction
        self.manifest = read_manifest(data)
        check_spaces(self.manifest, data, self.spaces)
        self.files = DatasetFiles(data)
        self.shards = self.manifest.shards

    def _latents(self, f: pq.ParquetFile, at: dict[str, int], keys: list[str], space: str) -> np.ndarray:
        """(len(keys), C, h, w) float16: the latents of `keys` (rows `at[key]` of latent file `f`), reading
        only the row groups that hold them."""
        if not keys:
            return np.zeros((0, *self.manifest.spaces[space].latent_shape), np.float16)
        starts = np.cumsum([0] + [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]).tolist()
        group_of = [(r, bisect.bisect_right(starts, r) - 1) for r in (at[k] for k in keys)]
        groups = sorted({g for _, g in group_of})
        base, offset = {}, 0  # first row of each read group within the table read
        for g in groups:
            base[g], offset = offset, offset + starts[g + 1] - starts[g]
        local = [base[g] + r - starts[g] for r, g in group_of]
        out = read_latents(f.read_row_groups(groups, columns=["latent"]))
        return out if local == list(range(len(out))) else out[local]

    def read(self, shard: int, split: str, limit: int | None = None) -> tuple[pa.Table, list[np.ndarray]]:
        """(the tiles/ rows, each space's (n, C, h, w) float16 latents) of the shard's tiles of `split` ("train",
        "val" or "all") that have latents in every space (at most `limit`)."""
        tiles = self.files.read_table(tiles_path(shard))
        files = [self.files.parquet_file(latents_path(c, shard)) for c in self.spaces]
        at = [{k: i for i, k in enumerate(f.read(columns=["tile_key"]).column(0).to_pylist())} for f in files]
        keep = []
        for i, (key, image_id) in enumerate(zip(tiles.column("tile_key").to_pylist(),
                                                tiles.column("image_id").to_pylist())):
            if all(key in a for a in at) and (
                    split == "all" or is_validation(image_id, self.val_fraction) == (split == "val")):
                keep.append(i)
                if limit is not None and len(keep) >= limit:
                    break
        rows = tiles.take(pa.array(keep, pa.int64()))
        keys = rows.column("tile_key").to_pylist()
        return rows, [self._latents(f, a, keys, c) for f, a, c in zip(files, at, self.spaces)]

    def take_all(self, split: str, limit: int) -> list[np.ndarray]:
        """Each space's latents of the first `limit` tiles of a split, shard by shard in dataset order."""
        parts, left = [], limit
        for shard in range(self.shards):
            if left <= 0:
                break
            _, latents = self.read(shard, split, left)
            if len(latents[0]):
                parts.append(latents)
                left -= len(latents[0])
        if not parts:
            raise ValueError(f"--data {self.data}: no {split} tiles with latents of all of {', '.join(self.spaces)}")
        return [np.concatenate(p) for p in zip(*parts)]


class PairReader(TileReader):
    """Reads the aligned src/dst latents of a dataset shard by shard, only the row groups it needs."""

    def __init__(self, data: str, src: str, dst: str, val_fraction: float):
        super().__init__(data, (src, dst), val_fraction)
        self.src, self.dst = src, dst

    def shard(self, shard: int, split: str, limit: int | None = None) -> ShardTiles:
        """The shard's tiles of `split` ("train", "val" or "all") with latents in both spaces (at most `limit`)."""
        rows, (src, dst) = self.read(shard, split, limit)
        return ShardTiles(rows, src, dst)

    def iter_split(self, split: str, limit: int | None = None) -> Iterator[ShardTiles]:
        """The split's tiles shard by shard in dataset order, at most `limit` in all; reads stop there."""
        left = limit
        for shard in range(self.shards):
            if left is not None and left <= 0:
                return
            part = self.shard(shard, split, left)
            if len(part):
                yield part
                left = None if left is None else left - len(part)

    def take(self, split: str, limit: int | None = None) -> ShardTiles:
        """The first `limit` tiles of a split, joined into one ShardTiles (validation, evaluation)."""
        parts = list(self.iter_split(split, limit))
        if not parts:
            if split == "val" and not self.val_fraction:
                raise ValueError(f"--data {self.data}: no validation tiles (validation share 0: the run held out no "
                                 "image); pass --split all to evaluate on its training images (figures will be "
                                 "optimistic), or evaluate on another dataset")
            raise ValueError(f"--data {self.data}: no {split} tiles with both {self.src} and {self.dst} latents "
                             f"(validation is {self.val_fraction:.0%} of images by id)")
        return ShardTiles(pa.concat_tables([p.rows for p in parts]), np.concatenate([p.src for p in parts]),
                          np.concatenate([p.dst for p in parts]))


class TileStream:
    """Rank `rank`'s endless stream of the train split's tiles, each space's latents aligned (see the module doc);
    CropStream and UniversalStream cut their crops from it."""

    def __init__(self, reader: TileReader, batch: int, seed: int, rank: int, world: int, prefetch: bool = True):
        if batch % world:
            raise ValueError(f"batch {batch} must divide evenly over {world} workers")
        self.reader, self.local_batch = reader, batch // world
        self.seed, self.rank, self.world = seed, rank, world
        shards = max(1, reader.shards)
        self.parts = max(1, math.ceil(world / shards))  # slices per shard: every rank gets a unit each epoch
        self.units = shards * self.parts
        self.epoch, self.pos, self.offset = 0, 0, 0  # the cursor: the next tile is tile `offset` of unit `pos`
        self._orders: dict[int, list[int]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="crop-stream") if prefetch else None
        self._current: tuple[tuple[int, int], list] | None = None  # ((epoch, pos), each space's latents)
        self._next: tuple[tuple[int, int], Future] | None = None

    # --- position ---
    def state_dict(self) -> dict:
        return dict(epoch=self.epoch, pos=self.pos, offset=self.offset, units=self.units, rank=self.rank,
                    world=self.world, seed=self.seed)

    def load_state_dict(self, state: dict) -> None:
        if (state["units"], state["world"], state["rank"]) != (self.units, self.world, self.rank):
            raise ValueError(f"the checkpoint's data position is for rank {state['rank']} of {state['world']} over "
                             f"{state['units']} units, not rank {self.rank} of {self.world} over {self.units}")
        self.epoch, self.pos, self.offset = int(state["epoch"]), int(state["pos"]), int(state["offset"])
        self._current = self._next = None

    def _order(self, epoch: int) -> list[int]:
        """This rank's units in `epoch`."""
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(step_seed(self.seed, "units", epoch))
            self._orders[epoch] = torch.randperm(self.units, generator=g)[self.rank :: self.world].tolist()
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}  # this epoch and its neighbour
        return self._orders[epoch]

    def _after(self, epoch: int, pos: int) -> tuple[int, int]:
        return (epoch, pos + 1) if pos + 1 < len(self._order(epoch)) else (epoch + 1, 0)

    # --- reading ---
    def _read(self, epoch: int, unit: int) -> list[np.ndarray]:
        """Each space's latents of a unit's train tiles, in this epoch's order."""
        shard, part = divmod(unit, self.parts)
        _, latents = self.reader.read(shard, "train")
        g = torch.Generator().manual_seed(step_seed(self.seed, "tiles", epoch, shard))
        order = torch.randperm(len(latents[0]), generator=g)[part :: self.parts].numpy()
        return [x[order] for x in latents]

    def _unit(self, epoch: int, pos: int) -> list[np.ndarray]:
        """The unit at (epoch, pos), read now or taken from the prefetch; starts reading the one after it."""
        key = (epoch, pos)
        if self._current is not None and self._current[0] == key:
            return self._current[1]
        if self._next is not None and self._next[0] == key:
            got = self._next[1].result()
        else:
            got = self._read(epoch, self._order(epoch)[pos])
        self._current, self._next = (key, got), None  # the previous unit is released here
        if self._pool is not None:
            e, p = self._after(epoch, pos)
            self._next = ((e, p), self._pool.submit(self._read, e, self._order(e)[p]))
        return got

    def tiles(self, n: int) -> list[np.ndarray]:
        """Each space's latents of the next n tiles of this rank's stream; advances the cursor."""
        got, empty = [[] for _ in self.reader.spaces], 0
        while n:
            unit = self._unit(self.epoch, self.pos)
            take = len(unit[0][self.offset : self.offset + n])
            if take:
                for parts, x in zip(got, unit):
                    parts.append(x[self.offset : self.offset + take])
                self.offset += take
                n -= take
                empty = 0
            if self.offset >= len(unit[0]):
                self.epoch, self.pos = self._after(self.epoch, self.pos)
                self.offset = 0
                empty = empty + 1 if not take else 0
                if empty > 4 * self.units + 100:
                    raise ValueError(f"--data {self.reader.data}: rank {self.rank} finds no training tiles in "
                                     f"{empty} units in a row; the train split is empty")
        return [np.concatenate(parts) for parts in got]

    def close(self) -> None:
        self._current = self._next = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class CropStream(TileStream):
    """Rank `rank`'s endless stream of aligned random crops of a pair's train split (see the module doc)."""

    def __init__(self, reader: PairReader, crop: int, batch: int, seed: int, rank: int, world: int,
                 prefetch: bool = True):
        super().__init__(reader, batch, seed, rank, world, prefetch)
        self.crop = crop
        fs, fd = get_space(reader.src).factor, get_space(reader.dst).factor
        self.scale = fs / fd  # dst pixels per src pixel
        self.grid = max(1, round(fd / math.gcd(fs, fd)))  # src offsets on this grid map to whole dst pixels

    def next(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(src crops (b/world, Cs, c, c), dst crops (b/world, Cd, c*s, c*s)) float32 for `step`."""
        a, b = self.tiles(self.local_batch)
        g = torch.Generator().manual_seed(step_seed(self.seed, step, self.rank, 1))
        _, _, hs, ws = a.shape
        c, cd = self.crop, int(self.crop * self.scale)
        if c > hs or c > ws:
            raise ValueError(f"crop {c} is larger than the source latents ({hs}x{ws}); pass a smaller --crop")
        ys = (torch.randint((hs - c) // self.grid + 1, (len(a),), generator=g) * self.grid).tolist()
        xs = (torch.randint((ws - c) // self.grid + 1, (len(a),), generator=g) * self.grid).tolist()
        src = np.stack([a[i, :, y : y + c, x : x + c] for i, (y, x) in enumerate(zip(ys, xs))])
        dst = np.stack([b[i, :, int(y * self.scale) : int(y * self.scale) + cd,
                          int(x * self.scale) : int(x * self.scale) + cd] for i, (y, x) in enumerate(zip(ys, xs))])
        return torch.from_numpy(src).float(), torch.from_numpy(dst).float()


@dataclass
class PairBatch:
    """The samples of one step that convert src -> dst."""

    src: str
    dst: str
    x: torch.Tensor  # (n, Cs, c*grid/fs, c*grid/fs) float32 raw src latents
    y: torch.Tensor  # (n, Cd, c*grid/fd, c*grid/fd) float32 raw dst latents, the same pixels


def crop_sides(spaces, crop: int, grid: int) -> dict[str, int]:
    """Each space's crop side in its own latent pixels, for a crop of `crop` working-grid pixels; ValueError unless
    every side is whole."""
    px = crop * grid
    coarsest = max(get_space(c).factor for c in spaces)
    if px % coarsest:
        raise ValueError(f"--crop {crop} (grid pixels of {grid} px: {px} px) must cover whole latent pixels of "
                         f"every space: a multiple of {max(1, coarsest // grid)} (the coarsest space is /{coarsest})")
    return {c: px // get_space(c).factor for c in spaces}


class UniversalStream(TileStream):
    """Rank `rank`'s stream for a universal run: each sample of a step is a tile, an ordered pair of the run's
    spaces drawn with `weights`, and a crop of `crop` working-grid pixels at a position every space can cut;
    a step's samples come grouped by pair. The draws are functions of (seed, step, rank)."""

    def __init__(self, reader: TileReader, pairs: list[tuple[str, str]], weights: list[float], crop: int, grid: int,
                 batch: int, seed: int, rank: int, world: int, prefetch: bool = True):
        super().__init__(reader, batch, seed, rank, world, prefetch)
        self.pairs, self.weights = pairs, torch.tensor(weights, dtype=torch.float64)
        self.sides = crop_sides(reader.spaces, crop, grid)
        self.px = crop * grid
        self.step_px = max(get_space(c).factor for c in reader.spaces)  # positions on whole pixels of every space
        self.index = {c: i for i, c in enumerate(reader.spaces)}

    def next(self, step: int) -> list[PairBatch]:
        """This rank's samples of `step`, a PairBatch per pair drawn (in the order of `pairs`)."""
        latents = self.tiles(self.local_batch)
        g = torch.Generator().manual_seed(step_seed(self.seed, step, self.rank, 3))
        n = len(latents[0])
        which = torch.multinomial(self.weights, n, replacement=True, generator=g).tolist()
        f0 = get_space(self.reader.spaces[0]).factor
        side_px = latents[0].shape[-1] * f0
        if self.px > side_px:
            raise ValueError(f"a crop of {self.px} px is larger than the tiles ({side_px} px); pass a smaller --crop")
        ys = (torch.randint((side_px - self.px) // self.step_px + 1, (n,), generator=g) * self.step_px).tolist()
        xs = (torch.randint((side_px - self.px) // self.step_px + 1, (n,), generator=g) * self.step_px).tolist()

        def cut(code: str, i: int) -> np.ndarray:
            f, c = get_space(code).factor, self.sides[code]
            return latents[self.index[code]][i, :, ys[i] // f : ys[i] // f + c, xs[i] // f : xs[i] // f + c]

        out = []
        for p, (src, dst) in enumerate(self.pairs):
            members = [i for i in range(n) if which[i] == p]
            if members:
                x = np.stack([cut(src, i) for i in members])
                y = np.stack([cut(dst, i) for i in members])
                out.append(PairBatch(src, dst, torch.from_numpy(x).float(), torch.from_numpy(y).float()))
        return out
