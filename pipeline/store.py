"""Where a dataset lives: a local folder or any pyarrow filesystem URI (s3://, gs://), written atomically.

Local files are written to a temporary name beside their target and renamed into place; object stores make
an object visible only once its upload completes. Either way a reader never sees half a file.
"""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


from .schema import DatasetFiles

PARQUET_OPTIONS = dict(compression="zstd", write_statistics=False)  # same table -> same bytes


def table_bytes(table: pa.Table, row_group_size: int | None = None) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size, **PARQUET_OPTIONS)
    return buf.getvalue()


class StoreWriteError(OSError):
    """A dataset file could not be written (the message names it)."""


class Store(DatasetFiles):
    """A dataset folder with atomic writes (reads: schema.DatasetFiles)."""

    def is_empty_or_missing(self) -> bool:
        info = self.fs.get_file_info(self.base)
        if info.type == pafs.FileType.NotFound:
            return True
        return not self.fs.get_file_info(pafs.FileSelector(self.base, allow_not_found=True))

    def remove_folder(self, rel: str) -> None:
        self.fs.delete_dir_contents(self.path(rel), missing_dir_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        try:
            super().write_bytes(rel, data)
        except OSError as e:  # disk full, read-only, a file where a folder should be: say which file
            raise StoreWriteError(f"cannot write {self.path(rel)}: {e.strerror or e}; nothing half-written was left, "
                                  "fix this and rerun the same command to go on") from e

    def write_table(self, rel: str, table: pa.Table, row_group_size: int | None = None) -> None:
        self.write_bytes(rel, table_bytes(table, row_group_size))

    def write_tables(self, files: list[tuple[str, pa.Table, int | None]], pool: ThreadPoolExecutor) -> None:
        """Write several (rel, table, row_group_size) files at once on `pool` (to an object store each file is
        a round trip: together they cost about one); returns once all are written, raises the first error."""
        futures = [pool.submit(self.write_table, *f) for f in files]
        wait(futures)
        for f in futures:
            f.result()

    def shards_present(self, folder: str) -> set[int]:
        """Shard numbers with a part-NNNNN.parquet file in `folder`, from one listing."""
        return {int(n[5:-8]) for n in self.list(folder) if n.startswith("part-") and n.endswith(".parquet")}

    def remove_temporaries(self) -> int:
        """Delete what a killed run left half-written (local folders only); returns how many."""
        if not self.local or not Path(self.base).is_dir():
            return 0
        stale = list(Path(self.base).rglob(".*.tmp"))
        for p in stale:
            p.unlink(missing_ok=True)
        return len(stale)
