import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from interposer.pipeline.sources import list_sources


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return str(path)


def test_folders_globs_and_listing_files(tmp_path):
    a = _touch(tmp_path / "imgs" / "a.JPG")
    b = _touch(tmp_path / "imgs" / "deep" / "b.png")
    _touch(tmp_path / "imgs" / "notes.txt")
    c = _touch(tmp_path / "other" / "c.webp")
    d = _touch(tmp_path / "listed" / "d.jpeg")
    (tmp_path / "list.txt").write_text("# my list\nlisted/d.jpeg\n\n")
    pq.write_table(pa.table({"uri": [c]}), tmp_path / "list.parquet")
    (tmp_path / "list.csv").write_text(f"path,caption\n{a},hello\n")
    uris, skipped = list_sources([str(tmp_path / "imgs"), str(tmp_path / "list.txt"),
                                  str(tmp_path / "list.parquet"), str(tmp_path / "list.csv")])
    assert uris == sorted([a, b, c, d]) and skipped == {}
    assert list_sources([str(tmp_path / "imgs" / "**" / "*.png")])[0] == [b]


def test_missing_source_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="image source not found"):
        list_sources([str(tmp_path / "nope")])


def test_symlink_loop_and_bad_names(tmp_path):
    a = _touch(tmp_path / "imgs" / "a.png")
    os.symlink(tmp_path / "imgs", tmp_path / "imgs" / "loop")
    bad = os.path.join(os.fsencode(tmp_path / "imgs"), b"caf\xe9.png")
    with open(bad, "wb") as f:
        f.write(b"x")
    uris, skipped = list_sources([str(tmp_path / "imgs")])
    assert uris == [a] and skipped == {"bad_file_name": 1}
