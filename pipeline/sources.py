"""Url lists: the headerless CC3M TSV, TSV/CSV with a header, parquet -> one normalised (caption, url) parquet."""

from __future__ import annotations

import csv
import os
import re
import stat
import warnings
from pathlib import Path

import pandas as pd

from pipeline.errors import UserError

CAPTION_ALIASES = ("caption", "captions", "text", "title", "alt", "alt_text", "alttext", "description", "txt")
URL_ALIASES = ("url", "image_url", "img_url", "imageurl", "image", "link", "uri", "src", "image_link")
EXTRA_COLUMNS = ("attributes", "references")  # carried into the shards' json when present
# Invalid UTF-8 bytes are read as lone surrogates (surrogateescape), so they can be counted exactly, then
# shown as U+FFFD. When most rows hold such bytes the file is in another encoding: refused (a few stray
# bytes in a short list are kept and counted, as in a long one).
_BAD_BYTE = re.compile("[\udc80-\udcff]")
MAX_INVALID_UTF8_SHARE = 0.5


def _pick(columns, aliases) -> str | None:
    lower = {str(c).strip().lower(): c for c in columns}
    for a in aliases:
        if a in lower:
            return lower[a]
    return None


def _looks_like_url(v) -> bool:
    return isinstance(v, str) and v.strip().lower().startswith(("http://", "https://", "ftp://", "file://"))


def _read_text(path: Path, count: int) -> pd.DataFrame:
    name = path.name.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError as e:
        raise UserError(f"cannot read url list {path}: {e.strerror or e}") from None
    if b"\x00" in head:
        raise UserError(f"cannot read url list {path}: it is binary, not a TSV/CSV text file")
    if len(head) == 65536 and b"\n" in head:
        head = head[: head.rfind(b"\n")]  # never judge the encoding by a character cut in half
    # Only the separator is judged here; stray invalid bytes are counted per row in read_url_list.
    first = head.decode("utf-8", errors="replace").splitlines()[0] if head.strip() else ""
    if not first.strip():
        raise UserError(f"url list {path} is empty")
    if name.endswith((".tsv", ".tsv.gz", ".txt")):
        sep = "\t"
    elif name.endswith((".csv", ".csv.gz")):
        sep = ","
    else:
        sep = "\t" if "\t" in first else ","
    fields = next(csv.reader([first], delimiter=sep))
    has_header = not any(_looks_like_url(f) for f in fields)
    kw = dict(sep=sep, dtype=str, keep_default_na=False, nrows=count, encoding="utf-8",
              encoding_errors="surrogateescape", on_bad_lines="warn")
    if sep == "\t":
        kw["quoting"] = csv.QUOTE_NONE  # CC3M captions contain bare quotes
    try:
        with warnings.catch_warnings(record=True) as caught:  # one "Skipping line N" per malformed line
            warnings.simplefilter("always", pd.errors.ParserWarning)
            df = pd.read_csv(path, header=0 if has_header else None, **kw)
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError, ValueError, OSError) as e:
        raise UserError(f"cannot read url list {path}: {str(e).splitlines()[0]}") from None
    df.attrs["malformed_lines"] = sum(str(w.message).count("Skipping line") for w in caught)
    if not has_header:
        # CC3M's Train_GCC-training.tsv: caption TAB url, no header. Generally: the url column is the one
        # holding urls, the caption the first other one.
        url_idx = next(i for i, f in enumerate(fields) if _looks_like_url(f))
        cap_idx = next((i for i in range(len(fields)) if i != url_idx), None)
        if cap_idx is None:
            raise UserError(f"url list {path} has no header and only a url column: need caption and url")
        df = df.rename(columns={url_idx: "url", cap_idx: "caption"})
    return df


def _read_parquet(path: Path, count: int) -> pd.DataFrame:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UserError(f"cannot read url list {path} as parquet: {str(e).splitlines()[0]}") from None
    names = pf.schema_arrow.names
    cap, url = _pick(names, CAPTION_ALIASES), _pick(names, URL_ALIASES)
    if cap is None or url is None:
        _missing(path, names, cap, url)
    cols = [cap, url] + [c for c in names if c in EXTRA_COLUMNS]
    batches, n = [], 0
    for b in pf.iter_batches(batch_size=min(max(count, 1), 65536), columns=cols):  # never read a huge file whole
        batches.append(b.to_pandas())
        n += b.num_rows
        if n >= count:
            break
    df = pd.concat(batches, ignore_index=True) if batches else pd.DataFrame(columns=cols)
    return df.head(count)


def _missing(path: Path, columns, cap, url) -> None:
    want = " and ".join(n for n, c in (("caption", cap), ("url", url)) if c is None)
    found = ", ".join(str(c) for c in list(columns)[:8]) or "none"
    raise UserError(f"url list {path} has no {want} column (found: {found})")


def read_url_list(path: str | Path, count: int) -> pd.DataFrame:
    """The first `count` rows of a url list as a DataFrame with columns caption, url (+ attributes if present)."""
    path = Path(path)
    if count < 1:
        raise UserError(f"--count must be at least 1 (got {count})")
    if not path.exists():
        raise UserError(f"url list {path} does not exist")
    if path.is_dir():
        raise UserError(f"url list {path} is a folder, not a file")
    if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would block the read, /dev/zero never end
        raise UserError(f"url list {path} is not a regular file (a pipe, device or socket): "
                        "save the list to a file first")
    if path.stat().st_size == 0:
        raise UserError(f"url list {path} is empty")
    if path.suffix.lower() in (".parquet", ".pq"):
        df = _read_parquet(path, count)
    else:
        df = _read_text(path, count)
    cap, url = _pick(df.columns, CAPTION_ALIASES), _pick(df.columns, URL_ALIASES)
    if cap is None or url is None:
        _missing(path, df.columns, cap, url)
    extra = [c for c in df.columns if str(c).lower() in EXTRA_COLUMNS]
    malformed = int(df.attrs.get("malformed_lines", 0))
    out = df[[cap, url] + extra].copy()
    out.columns = ["caption", "url"] + [str(c).lower() for c in extra]
    out["caption"] = out["caption"].fillna("").astype(str)
    out["url"] = out["url"].fillna("").astype(str).str.strip()
    n_read = len(out)
    out = out[out["url"] != ""].reset_index(drop=True)
    if out.empty:
        raise UserError(f"url list {path} has no rows with a url")
    bad = out["caption"].str.contains(_BAD_BYTE) | out["url"].str.contains(_BAD_BYTE)
    n_bad = int(bad.sum())
    if n_bad > MAX_INVALID_UTF8_SHARE * len(out):
        raise UserError(f"cannot read url list {path}: it is not UTF-8 text ({n_bad} of {len(out)} rows have "
                        "invalid bytes); convert it first, e.g. `iconv -f cp1252 -t utf-8`")
    if n_bad:
        for col in ("caption", "url"):
            out[col] = out[col].str.replace(_BAD_BYTE, "\ufffd", regex=True)
    # What the list itself got wrong (img2dataset's stats count what went wrong fetching): fetch records it.
    out.attrs["issues"] = {
        "invalid_utf8": n_bad,  # rows kept, each invalid byte shown as U+FFFD
        "empty_caption": int((out["caption"].str.strip() == "").sum()),  # kept: the image is still fetched
        "duplicate_url": int(out["url"].duplicated().sum()),  # kept: each row is its own sample
        "no_url": n_read - len(out),  # dropped before fetching
        "malformed_lines": malformed,  # wrong field count (e.g. a tab inside a caption): skipped
    }
    return out


def write_parquet(df: pd.DataFrame, path: Path) -> Path:
    """The normalised list as parquet (img2dataset's TSV reader wants a header; parquet is unambiguous)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), tmp)
    os.replace(tmp, path)
    return path
