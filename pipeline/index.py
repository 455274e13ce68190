"""The index stage of `data build`: list every source, read and sha256 every file once, and write each
shard's index part (index/part-NNNNN.parquet), all on Ray workers. The driver sees counts only.

    split sources into pieces (a folder: its files + one walk per subfolder)   Ray Data flat_map
    list each piece                                                            Ray Data flat_map
    count the listing -> shards = ceil(listed / shard_size)                    one number to the driver
    read + sha256 + place each file in shard_of(image_id, shards)              Ray Data map_batches
    group by shard: sort, mark duplicates, write index part                    groupby + map_groups
    -> one row of counts per shard to the driver

Duplicates (the same bytes under several URIs) share an image id, hence a shard, so each index part can
decide alone which URI is encoded: the first in sort order.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa

from .rows import hash_batch
from .schema import INDEX_SCHEMA, index_path
from .sources import list_piece, split_source
from .store import Store

HASH_CPUS = 0.5  # a hashing task mostly waits on I/O: two share a core


def _split_row(row: dict) -> list[dict]:
    return split_source(row["source"])


def _list_row(row: dict) -> list[dict]:
    return list_piece(row["kind"], row["path"])


def write_index_part(group: dict[str, np.ndarray], root: str) -> dict[str, np.ndarray]:
    """One shard's listed files (a Ray Data group) -> its index part on disk, and one row of counts."""
    shard = int(group["shard"][0])
    rows = {}  # uri -> row: the same URI listed by two sources is one file
    for uri, image_id, size, status in zip(group["uri"], group["image_id"], group["bytes"], group["status"]):
        rows[str(uri)] = (str(image_id), int(size), str(status))
    seen: set[str] = set()
    table_rows, counts = [], dict(listed=len(rows), unique_images=0, duplicates=0, skipped={})
    for uri, (image_id, size, status) in sorted(rows.items(), key=lambda kv: (kv[1][0], kv[0])):
        if status == "ok" and image_id in seen:
            status = "duplicate"
            counts["duplicates"] += 1
        elif status == "ok":
            seen.add(image_id)
            counts["unique_images"] += 1
        else:
            counts["skipped"][status] = counts["skipped"].get(status, 0) + 1
        table_rows.append(dict(uri=uri, image_id=image_id, bytes=size, status=status))
    Store(root).write_table(index_path(shard), pa.Table.from_pylist(table_rows, schema=INDEX_SCHEMA))
    return {"shard": np.array([shard], np.int64), "counts": np.array([json.dumps(counts)], dtype=object)}


def add_counts(total: dict, counts: dict) -> None:
    """Sum count dicts (numbers, and a nested {reason: n} under "skipped") into `total`."""
    for key, value in counts.items():
        if isinstance(value, dict):
            add_counts(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value


def build_index(ray, sources: list[str], shard_size: int, store: Store, before_write=None) -> tuple[int, dict]:
    """List, hash and place every file; write index/. Returns (shards, counts). `before_write()` runs once the
    listing is known to be non-empty and before anything is written (the caller writes its manifest there)."""
    pieces = ray.data.from_items([{"source": s} for s in sources]).flat_map(_split_row)
    listed = pieces.flat_map(_list_row).materialize()  # URIs stay in the object store, spread over the cluster
    n = listed.count()
    if n == 0:
        raise ValueError(f"no images found in {', '.join(sources)} (extensions: jpg, png, webp, ...)")
    shards = max(1, math.ceil(n / shard_size))
    if before_write is not None:
        before_write(shards)
    store.remove_folder("index")  # a stopped indexing run may have left parts of another listing
    hashed = listed.map_batches(hash_batch, batch_size=64, num_cpus=HASH_CPUS, fn_kwargs=dict(shards=shards))
    # Ray's default of 200 shuffle partitions is 200 tasks even for a 5-shard trial
    grouped = hashed.groupby("shard", num_partitions=max(1, min(shards, 200)))
    parts = grouped.map_groups(write_index_part, batch_format="numpy", fn_kwargs=dict(root=store.uri))
    total: dict = {}
    for row in parts.iter_rows():
        add_counts(total, json.loads(row["counts"]))
    total["skipped"] = dict(sorted(total.get("skipped", {}).items()))
    return shards, total
