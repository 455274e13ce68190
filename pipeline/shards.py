"""One shard, start to finish, on the worker that encodes it: read its images, cut tiles, encode them with
every VAE, write its files. `ShardWorker` is the plain callable class Ray Data maps over shard numbers
(pipeline.run); no Ray import here, so a shard can be built in a bare process too:

    >>> w = ShardWorker(root="data/v1-xl", specs=[VAESpec("v1", "vae/v1", None, "float32")],
    ...                 shapes={"v1": [4, 128, 128]}, cut=CutParams(1024, 6, 512), device="cpu")
    >>> w.build_shard(3)          # writes latents/v1, tiles, images part-00003.parquet; returns its counts

What a worker holds: one shard's latents until they are written (64 images x 6 tiles x 128 KiB a space at
1024 px: 48 MiB per space) and at most `decode_threads + 1` decoded images. Files are written latents first,
and tiles (together: while they are written, each space's file bytes are held too, about as much again),
then images: an images file under its real name means the whole shard is on disk.
"""

from __future__ import annotations

import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa

from .encoder import TileEncoder, VAESpec
from .rows import Cut, CutParams, cut_image
from .schema import (
    LATENT_ROWS_PER_GROUP,
    TILES_SCHEMA,
    images_path,
    images_table,
    index_path,
    latent_table,
    latents_path,
    tile_key,
    tiles_path,
)
from .store import Store

T = TypeVar("T")
R = TypeVar("R")


def prefetch(fn: Callable[[T], R], items: Iterable[T], pool: ThreadPoolExecutor, ahead: int) -> Iterator[R]:
    """fn(item) for each item in order, computed up to `ahead` items ahead on `pool` (bounded memory)."""
    it, window = iter(items), deque()
    for item in it:
        window.append(pool.submit(fn, item))
        if len(window) > ahead:
            yield window.popleft().result()
    while window:
        yield window.popleft().result()


def _add(counts: dict[str, int], key: str, n: int = 1) -> None:
    if n:
        counts[key] = counts.get(key, 0) + n


class ShardWorker:
    """Encodes whole shards and writes their files where it runs. `__call__` takes a Ray Data batch of shard
    numbers and returns one row per shard: {"shard", "summary" (JSON counts), "error_kind" and "error" (the
    class name and message of the OSError that stopped it, or ""), "began"/"ended" (time.time() around the shard's
    work)}: metadata, never latents.

    What a shard's work is, is the subclass's `shard`: BuildShard (`data build`) or AddSpaceShard (`data
    add-space`)."""

    def __init__(self, root: str, specs: list[VAESpec], shapes: dict[str, list[int]], cut: CutParams,
                 store_std: bool = False, batch_size: int = 6, device: str = "cpu", threads: int = 0,
                 decode_threads: int = 1):
        import torch

        if threads:
            torch.set_num_threads(threads)  # a Ray actor's torch would otherwise use 1 thread
        self.store = Store(root)
        self.specs, self.shapes, self.cut, self.store_std = specs, shapes, cut, store_std
        self.encoder = TileEncoder(specs, device=device, batch_size=batch_size)
        self.pool = ThreadPoolExecutor(max(1, decode_threads), thread_name_prefix="decode")
        self.ahead = max(1, decode_threads)
        self.writers = ThreadPoolExecutor(4, thread_name_prefix="write")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shards = [int(s) for s in batch["shard"]]
        summaries, kinds, errors, began, ended = [], [], [], [], []
        for s in shards:
            began.append(time.time())  # wall clock: the driver compares it with when the shard landed
            summary, kind, error = "", "", ""
            try:
                summary = json.dumps(self.shard(s), sort_keys=True)
            except OSError as e:  # a full disk, an unreachable bucket: reported as data, so the driver can stop
                kind, error = type(e).__name__, str(e)  # the run cleanly and print one line (bugs still raise)
            summaries.append(summary)
            kinds.append(kind)
            errors.append(error)
            ended.append(time.time())
        column = lambda values: np.array(values, dtype=object)  # noqa: E731
        return {"shard": np.array(shards, np.int64), "summary": column(summaries), "error_kind": column(kinds),
                "error": column(errors), "began": np.array(began), "ended": np.array(ended)}

    def _cuts(self, images: list[tuple[str, str]]) -> Iterator[Cut]:
        return prefetch(lambda im: cut_image(im[1], im[0], self.cut), images, self.pool, self.ahead)

    def _encode(self, image_id: str, cut: Cut) -> tuple[list[int], dict]:
        """(candidate tile indices, {space: (latents, stds, finite)}) of one image: all its candidate tiles go
        through the VAEs together, so a latent never depends on which shard or run encoded it."""
        indices = list(cut.placement.indices)
        return indices, self.encoder.encode(cut.tiles, [tile_key(image_id, i) for i in indices])

    def shard(self, shard: int) -> dict:
        """Do the shard's work and write its files; returns its counts."""
        raise NotImplementedError


class BuildShard(ShardWorker):
    def shard(self, shard: int) -> dict:
        """Encode the shard's indexed images and write its latents, tiles and images files; returns its counts."""
        images = []
        if self.store.exists(index_path(shard)):  # no index part: no listed file fell into this shard
            index = self.store.read_table(index_path(shard)).to_pylist()
            images = [(r["image_id"], r["uri"]) for r in index if r["status"] == "ok"]  # sorted by image_id
        image_rows, tile_rows, skipped = [], [], {}
        lat = {s: [] for s in self.shapes}
        std = {s: [] for s in self.shapes}
        for (image_id, uri), cut in zip(images, self._cuts(images)):
            row = dict(image_id=image_id, uri=uri, width=0, height=0, resized_width=0, resized_height=0, tiles=0,
                       nonfinite=0, status=cut.status)
            if cut.status != "ok":
                _add(skipped, cut.status)
                image_rows.append(row)
                continue
            p = cut.placement
            indices, encoded = self._encode(image_id, cut)
            ok = np.logical_and.reduce([finite for _l, _s, finite in encoded.values()])  # (N,) every VAE finite
            kept = [i for i, good in zip(indices, ok) if good]
            _add(skipped, "nonfinite_tiles", len(indices) - len(kept))
            image_rows.append(dict(row, width=p.width, height=p.height, resized_width=p.resized_width,
                                   resized_height=p.resized_height, tiles=len(kept),
                                   nonfinite=len(indices) - len(kept)))
            boxes = dict(zip(indices, p.boxes))
            tile_rows += [dict(tile_key=tile_key(image_id, i), image_id=image_id, uri=uri, tile_index=i,
                               box=list(boxes[i])) for i in kept]
            for space, (latents, stds, _finite) in encoded.items():
                lat[space].append(latents[ok])
                if stds is not None:
                    std[space].append(stds[ok])
        keys = [t["tile_key"] for t in tile_rows]
        files = [(latents_path(space, shard), _latents(keys, lat[space], std[space] if self.store_std else None,
                                                       shape), LATENT_ROWS_PER_GROUP)
                 for space, shape in self.shapes.items()]
        files.append((tiles_path(shard), pa.Table.from_pylist(tile_rows, schema=TILES_SCHEMA), None))
        self.store.write_tables(files, self.writers)  # together: to S3 each file is a round trip
        summary = dict(images=len(image_rows), images_ok=sum(r["status"] == "ok" for r in image_rows),
                       tiles=len(tile_rows), skipped=dict(sorted(skipped.items())))
        self.store.write_table(images_path(shard), images_table(image_rows, summary))  # last: marks it done
        return summary

class AddSpaceShard(ShardWorker):
    """Adds the one space of `shapes` to finished shards: the tiles are re-derived from the sources and the
    recorded boxes, and only latents/{space}/part-*.parquet is written."""

    def shard(self, shard: int) -> dict:
        """Encode the space for the tiles the shard already has; returns its counts."""
        (code,) = self.shapes
        wanted = self.store.read_table(tiles_path(shard)).column("tile_key").to_pylist()
        rows = self.store.read_table(images_path(shard)).to_pylist()
        images = [(r["image_id"], r["uri"]) for r in rows if r["status"] == "ok" and r["tiles"]]
        found: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
        for (image_id, _uri), cut in zip(images, self._cuts(images)):
            if cut.status != "ok":  # the source changed or vanished since the build
                continue
            indices, encoded = self._encode(image_id, cut)
            latents, stds, finite = encoded[code]
            for j, i in enumerate(indices):
                if finite[j]:
                    found[tile_key(image_id, i)] = (latents[j], stds[j] if stds is not None else None)
        keys = [k for k in wanted if k in found]
        stds = [found[k][1][None] for k in keys] if self.store_std else None
        table = _latents(keys, [found[k][0][None] for k in keys], stds, self.shapes[code])
        self.store.write_table(latents_path(code, shard), table, LATENT_ROWS_PER_GROUP)
        return dict(tiles=len(keys), missing=len(wanted) - len(keys))


def _latents(keys: list[str], parts: list[np.ndarray], std_parts: list[np.ndarray] | None,
             shape: list[int]) -> pa.Table:
    """A latent table from per-image (n, C, h, w) fp16 parts (and std parts when stored)."""
    shape = tuple(shape)

    def join(p: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(p) if p else np.zeros((0, *shape), np.float16)

    return latent_table(keys, join(parts), join(std_parts) if std_parts is not None else None, shape)
