"""The per-image row functions Ray Data maps (plain numpy in, plain numpy out; no Ray import here).

    hash_batch   {uri}                       -> + image_id, bytes, status       (index stage, CPU tasks)
    cut_batch    {image_id, uri, shard}      -> + size, boxes, pixels, status   (decode + tile, CPU tasks)
    encode_rows  + pixels                    -> + latents of every space         (TileEncoder actors)

A row is one image; its tiles travel together, so the VAE's batching depends only on that image.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from .images import DEFAULT_MAX_PIXELS, Skip, image_tiles
from .schema import tile_key
from .sources import read_uri


def hash_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    ids, sizes, status = [], [], []
    for uri in batch["uri"]:
        try:
            data = read_uri(str(uri))
            ids.append(hashlib.sha256(data).hexdigest())
            sizes.append(len(data))
            status.append("ok")
        except (OSError, ValueError):  # permissions, vanished file, unreachable object
            ids.append("")
            sizes.append(-1)
            status.append("unreadable")
    return {"uri": batch["uri"], "image_id": np.array(ids, dtype=object), "bytes": np.array(sizes, np.int64),
            "status": np.array(status, dtype=object)}


def cut_one(uri: str, image_id: str, tile_size: int, max_tiles: int, min_size: int,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """One image's row: its placement and (N, T, T, 3) uint8 tiles as bytes, or its skip reason."""
    row = dict(status="ok", width=0, height=0, resized_width=0, resized_height=0, indices="[]", boxes="[]",
               pixels=b"")
    try:
        data = read_uri(uri)
    except OSError:
        return dict(row, status="unreadable")
    if hashlib.sha256(data).hexdigest() != image_id:  # the file changed since it was indexed
        return dict(row, status="unreadable")
    try:
        placement, tiles = image_tiles(data, tile_size, max_tiles, min_size, max_pixels)
    except Skip as e:
        return dict(row, status=e.reason)
    return dict(row, width=placement.width, height=placement.height, resized_width=placement.resized_width,
                resized_height=placement.resized_height, indices=json.dumps(list(placement.indices)),
                boxes=json.dumps([list(b) for b in placement.boxes]), pixels=tiles.tobytes())


def cut_batch(batch: dict[str, np.ndarray], tile_size: int, max_tiles: int, min_size: int,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> dict[str, np.ndarray]:
    rows = [cut_one(str(u), str(i), tile_size, max_tiles, min_size, max_pixels)
            for u, i in zip(batch["uri"], batch["image_id"])]
    out = {k: batch[k] for k in ("image_id", "uri", "shard")}
    for key in rows[0] if rows else ():
        values = [r[key] for r in rows]
        out[key] = np.array(values, dtype=object if isinstance(values[0], (str, bytes)) else np.int64)
    return out


def encode_rows(encoder, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Adds lat_{space} (fp16 bytes of the kept tiles), std_{space}, kept (tile indices) and
    nonfinite_{space} (tiles this VAE dropped) to each image row; drops the pixels."""
    out = {k: v for k, v in batch.items() if k != "pixels"}
    n = len(batch["image_id"])
    kept_col = []
    cols: dict[str, list] = {}
    for r in range(n):
        indices = json.loads(batch["indices"][r])
        keys = [tile_key(str(batch["image_id"][r]), i) for i in indices]
        pixels = np.frombuffer(batch["pixels"][r], np.uint8)
        if not indices:
            kept_col.append("[]")
            for spec in encoder.specs:
                cols.setdefault(f"lat_{spec.space}", []).append(b"")
                cols.setdefault(f"std_{spec.space}", []).append(b"")
                cols.setdefault(f"nonfinite_{spec.space}", []).append(0)
            continue
        side = math.isqrt(pixels.size // (3 * len(indices)))  # tiles are square
        tiles = pixels.reshape(len(indices), side, side, 3)
        encoded = encoder.encode(tiles, keys)
        ok = np.ones(len(indices), bool)
        for _lat, _std, finite in encoded.values():
            ok &= finite
        kept_col.append(json.dumps([i for i, good in zip(indices, ok) if good]))
        for space, (lat, std, finite) in encoded.items():
            cols.setdefault(f"lat_{space}", []).append(lat[ok].tobytes())
            cols.setdefault(f"std_{space}", []).append(std[ok].tobytes() if std is not None else b"")
            cols.setdefault(f"nonfinite_{space}", []).append(int((~finite).sum()))
    out["kept"] = np.array(kept_col, dtype=object)
    for key, values in cols.items():
        out[key] = np.array(values, dtype=np.int64 if key.startswith("nonfinite_") else object)
    return out
