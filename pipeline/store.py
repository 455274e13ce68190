"""Where a dataset lives: a local folder or any pyarrow filesystem URI (s3://, gs://), written atomically.

Local files are written to a temporary name beside their target and renamed into place; object stores make
an object visible only once its upload completes. Either way a reader never sees half a file.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from interposer.files import write_bytes_durably

PARQUET_OPTIONS = dict(compression="zstd", write_statistics=False)  # same table -> same bytes


def table_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **PARQUET_OPTIONS)
    return buf.getvalue()


class StoreWriteError(OSError):
    """A dataset file could not be written (the message names it)."""


class Store:
    def __init__(self, root: str | os.PathLike):
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

    def is_empty_or_missing(self) -> bool:
        info = self.fs.get_file_info(self.base)
        if info.type == pafs.FileType.NotFound:
            return True
        return not self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def read_table(self, rel: str) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.read_bytes(rel)))

    def read_footer(self, rel: str) -> pq.FileMetaData:
        """A Parquet file's footer (row count, key-value metadata) without reading its data."""
        with self.fs.open_input_file(self.path(rel)) as f:
            return pq.read_metadata(f)

    def remove_folder(self, rel: str) -> None:
        self.fs.delete_dir_contents(self.path(rel), missing_dir_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        try:
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            if self.local:
                write_bytes_durably(target, data)
            else:  # object stores make an object visible only once its upload completes
                with self.fs.open_output_stream(target) as f:
                    f.write(data)
        except OSError as e:  # disk full, read-only, a file where a folder should be: say which file
            raise StoreWriteError(f"cannot write {target}: {e.strerror or e}; nothing half-written was left, "
                                  "fix this and rerun the same command to go on") from e

    def write_table(self, rel: str, table: pa.Table) -> None:
        self.write_bytes(rel, table_bytes(table))

    def shards_present(self, folder: str) -> set[int]:
        """Shard numbers with a part-NNNNN.parquet file in `folder`, from one listing."""
        return {int(n[5:-8]) for n in self.list(folder) if n.startswith("part-") and n.endswith(".parquet")}

    def list(self, rel: str) -> list[str]:
        """Names of the files directly in folder `rel` (no temporaries): one listing call, not one per file."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File and not i.base_name.startswith("."))

    def remove_temporaries(self) -> int:
        """Delete what a killed run left half-written (local folders only); returns how many."""
        if not self.local or not Path(self.base).is_dir():
            return 0
        stale = list(Path(self.base).rglob(".*.tmp"))
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)
