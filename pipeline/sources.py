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


def _escaped(path: str) -> str:
    """A file name that is not valid UTF-8 (os keeps such bytes as surrogates), backslash-escaped."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _entry(path: str) -> dict[str, str]:
    """One listed file: {"uri", "status"} with status "" or "bad_file_name"."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return {"uri": _escaped(path), "status": "bad_file_name"}
    return {"uri": os.path.abspath(path), "status": ""}


def _walk(folder: str, recursive: bool = True) -> list[dict[str, str]]:
    found = []
    for dirpath, _dirs, files in os.walk(folder, followlinks=False):
        found.extend(_entry(os.path.join(dirpath, n)) for n in files if is_image_name(n))
        if not recursive:
            break
    return found


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


def check_sources(specs: list[str]) -> None:
    """Fail fast (before any Ray start-up) on a source that does not exist: a local path, or a URI whose object
    store, keys, bucket or prefix is wrong (one request each)."""
    from .objectstore import check_uri, explain

    for spec in specs:
        if "://" in spec:
            check_uri(spec, "--images")
            fs, base = pafs.FileSystem.from_uri(spec)
            try:
                missing = fs.get_file_info(base).type == pafs.FileType.NotFound
            except OSError as e:
                raise explain(e, spec, "--images") or e from None
            if missing:
                raise FileNotFoundError(f"image source not found: {spec} (no object or prefix of that name)")
        elif not glob.has_magic(spec) and not Path(spec).expanduser().exists():
            raise FileNotFoundError(f"image source not found: {spec} (a folder, glob, listing file or URI)")


def split_source(spec: str) -> list[dict[str, str]]:
    """A source -> pieces that can be listed in parallel (one Ray task each): a local folder becomes its own
    files plus one recursive walk per subfolder; anything else is one piece."""
    path = Path(spec).expanduser()
    if "://" in spec or not path.is_dir():
        return [{"kind": "spec", "path": spec}]
    subdirs = sorted(e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False))
    return [{"kind": "top", "path": str(path)}] + [{"kind": "walk", "path": d} for d in subdirs]


def list_piece(kind: str, path: str) -> list[dict[str, str]]:
    """The files of one piece from split_source(), as {"uri", "status"} rows (not sorted, not unique)."""
    if kind == "top":
        return _walk(path, recursive=False)
    if kind == "walk":
        return _walk(path)
    spec, local = path, Path(path).expanduser()
    if "://" in spec:
        return [{"uri": u, "status": ""} for u in _remote(spec)]
    if local.is_file() and local.suffix.lower() in LISTING_EXTENSIONS:
        return [{"uri": u, "status": ""} for u in _listing(local)]
    if local.is_file():
        return [{"uri": str(local.resolve()), "status": ""}]
    if glob.has_magic(spec):
        matches = [os.path.abspath(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)]
        return [_entry(p) for p in matches if os.path.isfile(p) and is_image_name(p)]
    raise FileNotFoundError(f"image source not found: {spec} (a folder, glob, listing file or URI)")


def list_sources(specs: list[str]) -> tuple[list[str], dict[str, int]]:
    """(sorted unique URIs, {skip reason: count}) for the given source specs, in this process. `data build`
    lists the same pieces on Ray workers instead (pipeline.index)."""
    check_sources(specs)
    uris: set[str] = set()
    bad: set[str] = set()
    for spec in specs:
        for piece in split_source(spec):
            for row in list_piece(piece["kind"], piece["path"]):
                (bad if row["status"] else uris).add(row["uri"])
    return sorted(uris), ({"bad_file_name": len(bad)} if bad else {})


def read_uri(uri: str) -> bytes:
    """The bytes at a local path or filesystem URI."""
    if "://" not in uri:
        with open(uri, "rb") as f:
            return f.read()
    fs, path = pafs.FileSystem.from_uri(uri)
    with fs.open_input_stream(path) as f:
        return f.read()
