"""Url lists: headerless CC3M TSV, TSV/CSV with a header, parquet; bad input is one clear UserError."""

from __future__ import annotations

import pandas as pd
import pytest

from pipeline.errors import UserError
from pipeline.sources import read_url_list, write_parquet

CC_ROWS = [
    ('a "quoted" caption, with commas', "http://example.com/a.jpg"),
    ("actor attends the premiere of the film", "https://example.com/b.jpg?x=1&y=2"),
    ("it's a dog", "http://example.com/c.png"),
    ("view of the sea", "http://example.com/d.jpg"),
]


def _tsv(path, rows, header=None):
    lines = ([header] if header else []) + [f"{c}\t{u}" for c, u in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_headerless_cc3m_tsv_and_count(tmp_path):
    p = _tsv(tmp_path / "Train_GCC-training.tsv", CC_ROWS)
    df = read_url_list(p, count=3)
    assert list(df.columns) == ["caption", "url"]
    assert list(df.itertuples(index=False, name=None)) == CC_ROWS[:3]  # quotes kept verbatim
    assert len(read_url_list(p, count=100)) == 4


@pytest.mark.parametrize("name,sep,header", [
    ("list.tsv", "\t", ("Caption", "URL")),
    ("list.csv", ",", ("text", "image_url")),
    ("list.txt", "\t", ("url", "caption")),  # any column order
])
def test_text_lists_with_a_header(tmp_path, name, sep, header):
    rows = [r if header[0].lower() in ("caption", "text") else (r[1], r[0]) for r in CC_ROWS[1:]]
    df = pd.DataFrame(rows, columns=list(header))
    df.to_csv(tmp_path / name, sep=sep, index=False)
    got = read_url_list(tmp_path / name, count=10)
    assert list(got.itertuples(index=False, name=None)) == CC_ROWS[1:]


def test_parquet_with_extra_columns(tmp_path):
    df = pd.DataFrame({"url": [u for _, u in CC_ROWS], "Caption": [c for c, _ in CC_ROWS],
                       "attributes": ["{}"] * 4, "junk": [1, 2, 3, 4]})
    df.to_parquet(tmp_path / "l.parquet")
    got = read_url_list(tmp_path / "l.parquet", count=2)
    assert list(got.columns) == ["caption", "url", "attributes"] and len(got) == 2
    out = write_parquet(got, tmp_path / "out" / "urls.parquet")
    assert pd.read_parquet(out).equals(got)


@pytest.mark.parametrize("make,message", [
    (lambda d: d / "nope.tsv", "does not exist"),
    (lambda d: d, "is a folder"),
    (lambda d: _write(d / "empty.tsv", b""), "is empty"),
    (lambda d: _write(d / "blank.tsv", b"\n\n"), "is empty"),
    (lambda d: _write(d / "bad.parquet", b"PAR1 this is not parquet"), "cannot read url list"),
    (lambda d: _write(d / "bin.tsv", bytes(range(256)) * 4), "cannot read url list"),
    (lambda d: _write(d / "latin1.csv", "caption,url\ncaf\xe9,http://x/y.jpg\n".encode("latin-1")), "not UTF-8"),
    (lambda d: _write(d / "cols.csv", b"title,link2\na,b\n"), "no url column"),
    (lambda d: _write(d / "cols2.csv", b"foo,url\na,http://x/y.jpg\n"), "no caption column"),
    (lambda d: _write(d / "urlonly.tsv", b"http://x/y.jpg\n"), "only a url column"),
    (lambda d: _write(d / "nourls.tsv", b"caption\turl\na\t\n"), "no rows with a url"),
])
def test_bad_lists_are_one_line_user_errors(tmp_path, make, message):
    with pytest.raises(UserError) as e:
        read_url_list(make(tmp_path), count=5)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_count_must_be_positive(tmp_path):
    with pytest.raises(UserError, match="at least 1"):
        read_url_list(_tsv(tmp_path / "a.tsv", CC_ROWS), count=0)


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.faults
def test_one_stray_byte_in_a_short_list_is_kept_and_counted(tmp_path):
    """17 rows, one caption in cp1252: kept with U+FFFD and counted; refused only when most rows are undecodable."""
    rows = b"".join(b"caption %d\thttp://x/%d.jpg\n" % (i, i) for i in range(16)) + b"a caf\xe9 sign\thttp://x/c.jpg\n"
    df = read_url_list(_write(tmp_path / "short.tsv", rows), count=100)
    assert len(df) == 17 and df["caption"].iloc[-1] == "a caf\ufffd sign" and df.attrs["issues"]["invalid_utf8"] == 1
    mostly = b"".join(b"caf\xe9 %d\thttp://x/%d.jpg\n" % (i, i) for i in range(9)) + rows[:200]
    with pytest.raises(UserError, match="not UTF-8"):
        read_url_list(_write(tmp_path / "cp1252.tsv", mostly), count=100)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_as_the_list_is_one_line(tmp_path, kind):
    """A named pipe (reading it would block) or /dev/zero (it never ends; both have size 0, so they
    were called "empty"): one line saying the list is not a regular file, through the CLI, nothing
    created."""
    import os
    import subprocess
    import sys

    src = tmp_path / "list.tsv"
    if kind == "fifo":
        os.mkfifo(src)
    else:
        src = "/dev/zero"
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    p = subprocess.run([sys.executable, "-m", "pipeline", "fetch", "--source", str(src), "--shards",
                        str(tmp_path / "shards")], capture_output=True, text=True, timeout=60,
                       env=env)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "not a regular file" in lines[0], p.stderr
    assert not (tmp_path / "shards").exists()
