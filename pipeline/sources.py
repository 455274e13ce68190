"""Image sources -> a sorted list of URIs, and reading a URI's bytes. No Ray here.

A source is any of:
  - a local folder (searched recursively; image extensions in any case; symlinked folders not followed,
    so a symlink loop cannot trap the walk),
  - a glob ("photos/**/*.jpg"),
  - a listing file: .txt/.lst (one URI per line, '#' comments) or .csv/.parquet (a column named uri, url,
    path, file or image, or the only column); relative paths are relative to the listing file,
  - a single image file,
  - a remote URI that pyarrow filesystems read (s3://bucket/prefix/, gs://...): a prefix or one object.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import pyarrow.fs as pafs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif")
LISTING_EXTENSIONS = (".txt", ".lst", ".csv", ".parquet")
URI_COLUMNS = ("uri", "url", "path", "file", "image")


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _walk(folder: Path) -> tuple[list[str], int]:
    found, bad_names = [], 0
    for dirpath, _dirs, files in os.walk(folder, followlinks=False):
        for name in files:
            if not is_image_name(name):
                continue
            path = os.path.join(dirpath, name)
            try:
                path.encode("utf-8")
            except UnicodeEncodeError:  # a file name that is not valid UTF-8 (kept as surrogates by os)
                bad_names += 1
                continue
            found.append(os.path.abspath(path))
    return found, bad_names


def _listing(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".lst"):
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        uris = [line for line in lines if line and not line.startswith("#")]
    else:
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        table = pq.read_table(path) if suffix == ".parquet" else pacsv.read_csv(path)
        names = [n for n in URI_COLUMNS if n in table.column_names]
        if not names and table.num_columns != 1:
            raise ValueError(f"{path}: no column named {', '.join(URI_COLUMNS)} (columns: {table.column_names})")
        uris = [str(u) for u in table.column(names[0] if names else 0).to_pylist() if u]
    base = path.parent
    return [u if "://" in u or os.path.isabs(u) else str((base / u).resolve()) for u in uris]


def _remote(uri: str) -> list[str]:
    fs, base = pafs.FileSystem.from_uri(uri)
    scheme = uri.split("://", 1)[0]
    info = fs.get_file_info(base)
    if info.type == pafs.FileType.File:
        return [uri]
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"source not found: {uri}")
    infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    return [f"{scheme}://{i.path}" for i in infos if i.type == pafs.FileType.File and is_image_name(i.path)]


def list_sources(specs: list[str]) -> tuple[list[str], dict[str, int]]:
    """(sorted unique URIs, {skip reason: count}) for the given source specs."""
    uris: set[str] = set()
    skipped: dict[str, int] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if "://" in spec:
            uris.update(_remote(spec))
        elif path.is_dir():
            found, bad = _walk(path)
            uris.update(found)
            if bad:
                skipped["bad_file_name"] = skipped.get("bad_file_name", 0) + bad
        elif path.is_file() and path.suffix.lower() in LISTING_EXTENSIONS:
            uris.update(_listing(path))
        elif path.is_file():
            uris.add(str(path.resolve()))
        elif glob.has_magic(spec):
            matches = [os.path.abspath(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)]
            uris.update(p for p in matches if os.path.isfile(p) and is_image_name(p))
        else:
            raise FileNotFoundError(f"image source not found: {spec} (a folder, glob, listing file or URI)")
    return sorted(uris), skipped


def read_uri(uri: str) -> bytes:
    """The bytes at a local path or filesystem URI."""
    if "://" not in uri:
        with open(uri, "rb") as f:
            return f.read()
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as f:
        return f.read()
