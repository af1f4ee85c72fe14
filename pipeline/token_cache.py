"""Caption token ids paid once: cached inside the store, per tokenizer and max_len, reused,
extended or rebuilt by what they cover (no torch).

Letters: N rows of the store index, W the longest caption in ids (EOS included, <= max_len).

Where: `<store>/.tokens/<tokenizer>-L<max_len>-<key digest>/` holds `manifest.json` and two .npy
files (ids [N, W], lengths [N]). Inside the store, so it moves, copies and is deleted
(`--overwrite`) with the data it was made from; zarr never reads a folder without a zarr.json.

What a cache is trusted for: its key (the tokenizer's identity: name, vocabulary size, special ids,
a digest of its whole definition, the `tokenizers` version, how captions are encoded; and max_len)
must equal this run's, its files must match their crc32c, and each done shard's rows are reused only
when the shard's name, row count and caption digest are those the cache recorded. Anything else is
tokenised again and the cache rewritten (a new store, a re-encoded shard, an extended store: only
its new rows are tokenised). Files are written under temp names and renamed, the manifest last.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pipeline.osutil import atomic_write, atomic_write_text, fsync_dir

FORMAT = "cappa-tokens/1"
FOLDER = ".tokens"
ENCODE = 1  # bump when Tokenizer.encode_ids changes the ids a caption gets: every cache is rebuilt
_STALE_TMP_S = 3600  # temp files of a writer killed this long ago are removed


@dataclass
class TokenIds:
    """Every index row's caption ids, padded with EOS, and lengths (EOS included)."""

    ids: np.ndarray  # [N, W] uint16 (a vocabulary of <= 65,536 ids) or int32
    lengths: np.ndarray  # int32 [N]
    cache: str  # "hit" | "extended" | "built" | "unwritable" | "not cached"


def tokenize(tok, captions, max_len: int, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Captions -> (ids [N, W], lengths int32 [N]): `tok.encode_ids` of each (ids + EOS, at most
    max_len), padded with EOS. Chunks bound the tokenizer's temporary Python lists."""
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32
    parts = []
    for i in range(0, len(captions), chunk):
        rows = tok.encode_ids([str(c) for c in captions[i:i + chunk]], max_len)
        lengths = np.fromiter(map(len, rows), dtype=np.int32, count=len(rows))
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype,
                           count=int(lengths.sum()))
        ids = np.full((len(rows), max(int(lengths.max(initial=1)), 1)), tok.eos_id, dtype=dtype)
        ids[np.arange(ids.shape[1]) < lengths[:, None]] = flat  # row-major: each row's ids in order
        parts.append((ids, lengths))
    width = max((p[0].shape[1] for p in parts), default=1)
    ids = np.full((len(captions), width), tok.eos_id, dtype=dtype)
    at = 0
    for part, _ in parts:
        ids[at:at + len(part), :part.shape[1]] = part
        at += len(part)
    lengths = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
    return ids, lengths


def cache_key(tok, max_len: int) -> dict:
    """What the ids depend on besides the captions; a cache with another key is never read."""
    backend = getattr(tok.hf, "backend_tokenizer", None)  # a fast tokenizer's whole definition
    text = backend.to_str() if backend is not None else \
        json.dumps(sorted(tok.hf.get_vocab().items()))
    try:
        import tokenizers

        version = tokenizers.__version__
    except ImportError:  # a slow tokenizer without the library
        version = None
    # The fields of trained_run.tokenizer_record (not imported: it brings torch) and the definition.
    record = {"name": tok.name, "vocab_size": tok.vocab_size, "mask_id": tok.mask_id,
              "bos_id": tok.bos_id, "eos_id": tok.eos_id}
    return {"tokenizer": {**record, "class": type(tok.hf).__name__,
                          "definition_sha256": hashlib.sha256(text.encode()).hexdigest()},
            "tokenizers": version, "encode": ENCODE, "max_len": int(max_len)}


def cache_folder(store: Path, key: dict) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(key["tokenizer"]["name"]))[-40:]
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return Path(store) / FOLDER / f"{name}-L{key['max_len']}-{digest}"


def shard_prints(index) -> list[list]:
    """[shard name, rows, caption digest] per done shard with rows, in index order: what a cache's
    rows were made from. The digest covers each caption's length and text, so no two caption
    lists share it."""
    c, n, names = index.store.shard_capacity, len(index), index.store.shards
    shard = index.rows // c
    starts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1]]) if n else np.zeros(0, np.int64)
    out = []
    for lo, hi in zip(starts.tolist(), np.r_[starts[1:], n].tolist()):
        caps = index.captions.values[lo:hi]
        h = hashlib.sha256(np.strings.str_len(caps).astype("<i8").tobytes())
        h.update("".join(caps.tolist()).encode("utf-8", "surrogatepass"))
        out.append([names[int(shard[lo])], hi - lo, h.hexdigest()[:32]])
    return out


def _crc(a: np.ndarray) -> int:
    import google_crc32c  # zarr's checksum library

    return int(google_crc32c.value(np.ascontiguousarray(a).reshape(-1).view(np.uint8)))


def _read(folder: Path, key: dict) -> tuple[Optional[dict], Optional[str]]:
    """(the cache: manifest + ids + lengths, None) or (None, why it cannot be trusted); (None,
    None) when there is none. The ids are mapped, not copied: pages are read as batches need
    them."""
    f = folder / "manifest.json"
    if not f.is_file():
        return None, None
    try:
        m = json.loads(f.read_text())
        if m.get("format") != FORMAT or m.get("key") != key:
            return None, "was made for another tokenizer, max_len or format"
        rows, width = int(m["rows"]), int(m["width"])
        ids = np.load(folder / m["files"]["ids"]["file"], mmap_mode="r", allow_pickle=False)
        lengths = np.load(folder / m["files"]["lengths"]["file"], allow_pickle=False)
        if ids.shape != (rows, width) or lengths.shape != (rows,) or lengths.dtype != np.int32 \
                or ids.dtype not in (np.uint16, np.int32):
            return None, "holds arrays of other shapes than its manifest says"
        files = m["files"]
        if _crc(ids) != files["ids"]["crc32c"] or _crc(lengths) != files["lengths"]["crc32c"]:
            return None, "fails its checksum (crc32c)"
        shards = [[str(s), int(k), str(d)] for s, k, d in m["shards"]]
        if sum(k for _, k, _ in shards) != rows or \
                (rows and not 1 <= lengths.min() <= lengths.max() <= width):
            return None, "holds rows its manifest does not account for"
    except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, whatever broke in it
        return None, f"is unreadable ({type(e).__name__})"
    return {"shards": shards, "ids": ids, "lengths": lengths}, None


def lookup(index, tok, max_len: int) -> Optional[TokenIds]:
    """The cached ids when the cache covers exactly this index (no writes, no tokenising): for
    readers that would rather tokenise a subset than build the whole cache, and ranks other than
    0 (which never write)."""
    key = cache_key(tok, max_len)
    old, _ = _read(cache_folder(index.store.path, key), key)
    if old is None or old["shards"] != shard_prints(index):
        return None
    return TokenIds(old["ids"], old["lengths"], "hit")


def caption_token_ids(index, tok, max_len: int, say: Callable[[str], None] = print,
                      write: bool = True) -> TokenIds:
    """Every index row's ids: from the cache where it covers the row's shard, tokenised
    otherwise; the cache is then rewritten to cover this index (`write`: rank 0 only). A cache
    that cannot be written is one note line: the ids are then kept in memory for this run."""
    key = cache_key(tok, max_len)
    folder = cache_folder(index.store.path, key)
    prints = shard_prints(index)
    old, why = _read(folder, key)
    if why:
        say(f"note: the token cache {folder} {why}: captions tokenised again")
    if old is not None and old["shards"] == prints:
        return TokenIds(old["ids"], old["lengths"], "hit")
    ids, lengths, reused = _assemble(index, tok, max_len, prints, old)
    cache = "extended" if reused else "built"
    if not write:
        return TokenIds(ids, lengths, "not cached")
    try:
        _write(folder, key, prints, ids, lengths)
    except OSError as e:
        say(f"note: cannot write the token cache in {folder} ({e.strerror or type(e).__name__}): "
            "captions tokenised in memory for this run")
        cache = "unwritable"
    return TokenIds(ids, lengths, cache)


def _assemble(index, tok, max_len: int, prints: list[list], old: Optional[dict]):
    """(ids, lengths, rows reused): the cache's rows for the shards it covers as recorded, the
    rest tokenised (in one call, so batches stay large)."""
    at, offset = {}, 0
    for s, k, d in (old["shards"] if old else []):
        at[(s, k, d)] = offset
        offset += k
    spans, lo = [], 0  # (index positions [lo, hi), cache offset or None)
    for s, k, d in prints:
        spans.append((lo, lo + k, at.get((s, k, d))))
        lo += k
    new = np.concatenate([np.arange(a, b) for a, b, o in spans if o is None]
                         or [np.zeros(0, np.int64)])  # positions to tokenise
    new_ids, new_len = tokenize(tok, index.captions.values[new], max_len)
    lengths = np.zeros(len(index), np.int32)
    lengths[new] = new_len
    for a, b, o in spans:
        if o is not None:
            lengths[a:b] = old["lengths"][o:o + b - a]
    dtype = new_ids.dtype if old is None else old["ids"].dtype
    ids = np.full((len(index), max(int(lengths.max(initial=1)), 1)), tok.eos_id, dtype=dtype)
    ids[new, :new_ids.shape[1]] = new_ids  # new_ids is at most as wide: its rows are among these
    w = min(ids.shape[1], old["ids"].shape[1]) if old else 0  # the columns past w are padding
    for a, b, o in spans:
        if o is not None:
            ids[a:b, :w] = old["ids"][o:o + b - a, :w]
    return ids, lengths, len(index) - len(new)


def _write(folder: Path, key: dict, prints: list[list], ids: np.ndarray,
           lengths: np.ndarray) -> None:
    """Data files under new names, then the manifest (renamed into place), then the files no
    manifest names any more: a reader sees the old cache or the whole new one."""
    folder.mkdir(parents=True, exist_ok=True)
    tag, files = uuid.uuid4().hex[:8], {}
    for name, arr in (("ids", ids), ("lengths", lengths)):
        file = f"{name}-{tag}.npy"

        def save(tmp: Path, arr=arr) -> None:
            with open(tmp, "wb") as f:
                np.save(f, arr, allow_pickle=False)
                f.flush()
                os.fsync(f.fileno())

        atomic_write(folder / file, save)
        files[name] = {"file": file, "crc32c": _crc(arr)}
    manifest = {"format": FORMAT, "key": key, "rows": int(len(lengths)), "width": int(ids.shape[1]),
                "shards": prints, "files": files}
    atomic_write_text(folder / "manifest.json", json.dumps(manifest))
    fsync_dir(folder)
    keep = {f["file"] for f in files.values()}
    for p in folder.iterdir():
        old_tmp = p.name.endswith(".tmp") and time.time() - p.stat().st_mtime > _STALE_TMP_S
        if (p.suffix == ".npy" and p.name not in keep) or old_tmp:
            p.unlink(missing_ok=True)  # a reader that mapped it keeps its pages until it is done
