"""Per-image functions the workers run (plain numpy and Pillow; no Ray import here).

    hash_batch     {uri, status}   -> + image_id, bytes, shard       (index stage: Ray Data tasks)
    cut_image      (uri, image_id) -> placement + (N, T, T, 3) tiles  (encode stage: inside a ShardWorker)
    cut_one        the same as one flat row (evaluation and tests re-derive a stored tile with it)
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from .images import DEFAULT_MAX_PIXELS, Placement, Skip, image_tiles
from .schema import shard_of
from .sources import read_uri


def hash_batch(batch: dict[str, np.ndarray], shards: int) -> dict[str, np.ndarray]:
    """Read and sha256 each listed file once; place it in its shard. An unreadable file (or a bad file name)
    is placed by the hash of its URI, so every listed file is recorded in exactly one index part."""
    ids, sizes, status, shard = [], [], [], []
    for uri, listed in zip(batch["uri"], batch["status"]):
        uri, image_id, size = str(uri), "", -1
        if listed:  # bad_file_name: not read
            state = str(listed)
        else:
            try:
                data = read_uri(uri)
                image_id, size, state = hashlib.sha256(data).hexdigest(), len(data), "ok"
            except (OSError, ValueError):  # permissions, vanished file, unreachable object
                state = "unreadable"
        ids.append(image_id)
        sizes.append(size)
        status.append(state)
        shard.append(shard_of(image_id or hashlib.sha256(f"uri:{uri}".encode()).hexdigest(), shards))
    return {"uri": batch["uri"], "image_id": np.array(ids, dtype=object), "bytes": np.array(sizes, np.int64),
            "status": np.array(status, dtype=object), "shard": np.array(shard, np.int64)}


@dataclass(frozen=True)
class CutParams:
    """How a dataset cuts its tiles (the manifest's identity fields)."""

    tile_size: int
    max_tiles: int
    min_size: int
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass
class Cut:
    status: str  # "ok" or a skip reason (schema.SKIP_REASONS)
    placement: Placement | None = None
    tiles: np.ndarray | None = None  # (N, T, T, 3) uint8


def cut_image(uri: str, image_id: str, params: CutParams) -> Cut:
    """Read one indexed image, check it is still the indexed bytes, decode it and cut its tiles."""
    try:
        data = read_uri(uri)
    except OSError:
        return Cut("unreadable")
    if hashlib.sha256(data).hexdigest() != image_id:  # the file changed since it was indexed
        return Cut("unreadable")
    try:
        placement, tiles = image_tiles(data, params.tile_size, params.max_tiles, params.min_size, params.max_pixels)
    except Skip as e:
        return Cut(e.reason)
    return Cut("ok", placement, tiles)


def cut_one(uri: str, image_id: str, tile_size: int, max_tiles: int, min_size: int,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """One image's row: its placement and (N, T, T, 3) uint8 tiles as bytes, or its skip reason."""
    cut = cut_image(uri, image_id, CutParams(tile_size, max_tiles, min_size, max_pixels))
    row = dict(status=cut.status, width=0, height=0, resized_width=0, resized_height=0, indices="[]", boxes="[]",
               pixels=b"")
    if cut.placement is None:
        return row
    p = cut.placement
    return dict(row, width=p.width, height=p.height, resized_width=p.resized_width, resized_height=p.resized_height,
                indices=json.dumps(list(p.indices)), boxes=json.dumps([list(b) for b in p.boxes]),
                pixels=cut.tiles.tobytes())
