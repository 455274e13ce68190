"""The dataset contract between pipeline/ (writes) and trainer/ (reads): layout, Parquet schemas, manifest.

A dataset is a folder (local or any pyarrow filesystem URI):

    DIR/manifest.json                    what was built, from what, with which VAEs (this module's Manifest)
    DIR/index/part-00000.parquet         every listed source of the shard: uri, image_id (sha256 of its bytes),
                                         status (ok, duplicate, unreadable, bad_file_name)
    DIR/images/part-00000.parquet        one row per unique image of the shard: size, tiles, status/skip reason;
                                         written last, so it marks the shard done; its footer holds the
                                         shard's counts (shard_summary)
    DIR/tiles/part-00000.parquet         one row per tile: key, image id, source uri, tile index, box
    DIR/latents/{space}/part-00000.parquet   tile_key + latent (fp16 arrow.fixed_shape_tensor (C, h, w)),
                                         rows in the same order as tiles/part-00000.parquet

Everything is readable with plain pyarrow (no Ray):

    >>> import pyarrow.parquet as pq
    >>> t = pq.read_table("DIR/latents/xl/part-00000.parquet")
    >>> t["latent"].combine_chunks().to_numpy_ndarray().shape      # (N, 4, 128, 128) float16

Shards are ranges of the sha256 space: an image's shard is `shard_of(image_id, shards)`, with
`shards = ceil(listed files / shard_size)`, so a shard holds `shard_size` images on average (not exactly),
every worker can place an image without asking anyone, and shard order is image-id order. A shard's files
depend only on the data: rebuilding, resuming after a crash, or adding a space produces the same bytes.
Every file is written to a temporary name and renamed into place, so a file under its real name is always
complete.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

FORMAT = "latent-interposer-dataset"
LATENT_ROWS_PER_GROUP = 64  # latents/ files are written in row groups of this many tiles: a reader that wants a
#                            few tiles (validation, evaluation) reads only their groups, not the whole shard
FORMAT_VERSION = 2
MANIFEST = "manifest.json"
SUMMARY_KEY = b"interposer.shard"  # images/part-*.parquet footer: the shard's counts as JSON

INDEX_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("image_id", pa.string()),  # sha256 hex of the bytes; "" when unreadable
    ("bytes", pa.int64()),  # file size; -1 when unreadable
    ("status", pa.string()),  # "ok" (encoded), "duplicate" (same bytes as an earlier URI), "unreadable",
    #                           "bad_file_name" (not valid UTF-8; the uri is backslash-escaped)
])  # fmt: skip
IMAGES_SCHEMA = pa.schema([
    ("image_id", pa.string()),  # sha256 hex of the file's bytes
    ("uri", pa.string()),  # the source it was read from (the first in sort order, for duplicates)
    ("width", pa.int32()), ("height", pa.int32()),  # after EXIF orientation; 0 when unreadable
    ("resized_width", pa.int32()), ("resized_height", pa.int32()),  # the image the tiles were cut from
    ("tiles", pa.int32()),  # tiles written
    ("nonfinite", pa.int32()),  # tiles dropped: a VAE gave NaN/inf even in fp32
    ("status", pa.string()),  # "ok" or the skip reason (see SKIP_REASONS)
])  # fmt: skip
TILES_SCHEMA = pa.schema([
    ("tile_key", pa.string()),  # f"{image_id}-{tile_index:02d}": the key every latent file aligns on
    ("image_id", pa.string()),
    ("uri", pa.string()),
    ("tile_index", pa.int16()),  # position among the image's candidate tiles
    ("box", pa.list_(pa.int32(), 4)),  # (left, top, right, bottom) in the resized image
])  # fmt: skip

SKIP_REASONS = {
    "unreadable": "the file could not be read",
    "not_an_image": "not an image format Pillow knows",
    "corrupt": "truncated or corrupt image data",
    "decompression_bomb": "more pixels than --max-pixels",
    "too_small": "short side below --min-size",
    "nonfinite_tiles": "a VAE gave NaN/inf even in fp32 (counted per tile, not per image)",
}


def tile_key(image_id: str, tile_index: int) -> str:
    return f"{image_id}-{tile_index:02d}"


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def shard_of(key: str, shards: int) -> int:
    """The shard of a sha256 hex key: shard s holds keys in [s, s+1) * 2**64 / shards (top 64 bits)."""
    return (int(key[:16], 16) * shards) >> 64


def index_path(shard: int) -> str:
    return f"index/{part_name(shard)}"


def images_path(shard: int) -> str:
    return f"images/{part_name(shard)}"


def tiles_path(shard: int) -> str:
    return f"tiles/{part_name(shard)}"


def latents_path(space: str, shard: int) -> str:
    return f"latents/{space}/{part_name(shard)}"


def latent_schema(shape: tuple[int, ...], with_std: bool) -> pa.Schema:
    tensor = pa.fixed_shape_tensor(pa.float16(), list(shape))
    fields = [("tile_key", pa.string()), ("latent", tensor)]
    if with_std:
        fields.append(("latent_std", tensor))
    return pa.schema(fields)


def latent_table(keys: list[str], latents: np.ndarray, stds: np.ndarray | None, shape: tuple[int, ...]) -> pa.Table:
    """keys + (N, C, h, w) fp16 latents (and stds) -> a table of latent_schema."""
    schema = latent_schema(shape, stds is not None)
    tensor = schema.field("latent").type

    def column(values: np.ndarray) -> pa.Array:
        values = np.ascontiguousarray(values, dtype=np.float16).reshape((len(keys), *shape))
        flat = pa.array(values.reshape(-1), pa.float16())  # storage: fixed-size lists of C*h*w halves
        storage = pa.FixedSizeListArray.from_arrays(flat, int(np.prod(shape)))
        return pa.ExtensionArray.from_storage(tensor, storage)

    columns = [pa.array(keys, pa.string()), column(latents)]
    if stds is not None:
        columns.append(column(stds))
    return pa.Table.from_arrays(columns, schema=schema)


def read_latents(table: pa.Table, column: str = "latent") -> np.ndarray:
    """(N, C, h, w) float16 from a latent table's tensor column."""
    return table[column].combine_chunks().to_numpy_ndarray()


@dataclass
class SpaceEntry:
    """One latent space of a dataset: which VAE made its latents, and how."""

    vae: str  # Hub repo id or local folder the VAE was loaded from
    subfolder: str | None  # subfolder of `vae`, if any
    vae_class: str  # diffusers class
    dtype: str  # precision the encoder ran in ("bfloat16", "float32", ...)
    fingerprint: str  # "sha256:..." of the VAE's weights (names, dtypes, shapes, bytes)
    channels: int
    factor: int
    latent_shape: list[int]  # (C, tile/factor, tile/factor)
    latent: str = "mean"  # "mean" of the encoder distribution, or a "sample" seeded by tile key
    store_std: bool = False  # whether latent_std columns are stored
    tiles: int = 0  # tiles with a latent of this space (fewer than the dataset's only if added later and
    #                 its VAE gave NaN/inf on some: join on tile_key)
    space: dict | None = None  # the full space definition (interposer.spaces.LatentSpace.to_dict()): a space
    #                            defined by its VAE is known from here to add-space, train and eval
    code: dict | None = None  # a VAE that runs its own code: {code file: "sha256:..."}; later commands loading
    #                           this VAE refuse other code (and still need --trust-remote-code themselves)


@dataclass
class Manifest:
    tile_size: int
    max_tiles: int
    min_size: int
    max_pixels: int
    shard_size: int
    sources: list[str]
    spaces: dict[str, SpaceEntry]
    shards: int = 0  # set once the index is written: ceil(listed / shard_size)
    indexed: bool = False  # index/ is complete (listing and hashing are not repeated)
    index_counts: dict[str, Any] = field(default_factory=dict)  # listed, unique_images, duplicates, {reason: n}
    counts: dict[str, Any] = field(default_factory=dict)  # listed, unique, images_ok, tiles, skipped{reason: n}
    args: dict[str, Any] = field(default_factory=dict)  # the resolved command-line arguments
    complete: bool = False
    package_version: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = MANIFEST) -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e})") from e
        if data.get("format") != FORMAT:
            raise ValueError(f"{where}: not a latent-interposer dataset manifest")
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{where}: dataset format version {data.get('format_version')} is not "
                             f"{FORMAT_VERSION}; rebuild it with this version")
        data["spaces"] = {k: SpaceEntry(**v) for k, v in data["spaces"].items()}
        return cls(**data)

    def identity(self) -> dict[str, Any]:
        """What determines the dataset's bytes; a rerun must match it exactly."""
        return dict(tile_size=self.tile_size, max_tiles=self.max_tiles, min_size=self.min_size,
                    max_pixels=self.max_pixels, shard_size=self.shard_size, sources=self.sources)

    def fingerprint(self) -> str:
        """sha256 of the identity and each space's VAE: what a trainer checkpoint pins."""
        ident = dict(self.identity(), spaces={k: (v.fingerprint, v.dtype, v.latent) for k, v in self.spaces.items()})
        return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


class DatasetFiles:
    """A folder of files, local or through a pyarrow filesystem URI (s3://, gs://): what dataset readers
    (the trainer, evaluation) need, and whole-file writes (a training run's own folder). pipeline.store.Store
    adds what building a dataset needs."""

    def __init__(self, root: str | Path):
        root = str(root)
        if "://" not in root:
            root = str(Path(root).expanduser().resolve())
        self.uri = root
        self.fs, self.base = pafs.FileSystem.from_uri(root)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str) -> str:
        return f"{self.base.rstrip('/')}/{rel}"

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_table(self, rel: str, columns: list[str] | None = None) -> pa.Table:
        # Through Arrow's own file, never a buffer over Python bytes: Arrow's pool threads would release such a
        # buffer (taking the GIL) even while the interpreter exits, which aborts the process ("terminate called
        # without an active exception", exit 134).
        with self.fs.open_input_file(self.path(rel)) as f:
            return pq.ParquetFile(f).read(columns=columns)

    def parquet_file(self, rel: str) -> pq.ParquetFile:
        """An open Parquet file: its footer is read, its row groups are read on demand."""
        return pq.ParquetFile(self.fs.open_input_file(self.path(rel)))

    def read_footer(self, rel: str) -> pq.FileMetaData:
        """A Parquet file's footer (row count, key-value metadata) without reading its data."""
        with self.fs.open_input_file(self.path(rel)) as f:
            return pq.read_metadata(f)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file: atomically and fsynced locally; object stores show an object only once its
        upload completes. Either way a reader never sees half a file."""
        from interposer.files import write_bytes_durably

        target = self.path(rel)
        if self.local:
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            write_bytes_durably(target, data)
        else:  # no folders in an object store: a "folder" marker would be one more request per file
            with self.fs.open_output_stream(target) as f:
                f.write(data)

    def list(self, rel: str) -> list[str]:
        """Names of the files directly in folder `rel` (no temporaries): one listing call, not one per file."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith("."))


def read_manifest(data: str, flag: str = "--data") -> Manifest:
    """The manifest of the dataset at `data` (a folder or pyarrow filesystem URI); one line if there is none."""
    from .objectstore import check_uri

    check_uri(data, flag)
    files = DatasetFiles(data)
    if not files.exists(MANIFEST):
        raise FileNotFoundError(f"{flag} {data}: no {MANIFEST}; not a dataset (build one with `interposer data build`)")
    return Manifest.from_json(files.read_bytes(MANIFEST).decode(), f"{data}/{MANIFEST}")


def register_manifest_spaces(manifest: Manifest) -> Manifest:
    """Make the spaces a dataset defined by their VAEs known in this process (registry spaces need nothing):
    what a command calls before it names them (--src/--dst, eval, add-space); returns the manifest. A name the
    process already knows with other latents is refused, naming both."""
    from interposer.spaces import is_builtin, register_space

    for code, entry in manifest.spaces.items():
        if entry.space is not None and not is_builtin(code):
            register_space(entry.space)
    return manifest


def images_table(rows: list[dict], summary: dict[str, Any]) -> pa.Table:
    """A shard's images file: its rows, and its counts in the footer (read back with shard_summary)."""
    table = pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)
    return table.replace_schema_metadata({SUMMARY_KEY: json.dumps(summary, sort_keys=True).encode()})


def shard_summary(metadata: dict[bytes, bytes] | None) -> dict[str, Any]:
    """The counts a shard's images file carries in its footer (see SUMMARY_KEY)."""
    return json.loads((metadata or {}).get(SUMMARY_KEY, b"{}"))
